"""Plots of stored runs: accuracy-matrix heatmaps and accuracy over experiences (matplotlib, Agg).

Every plot function takes ``formats`` (any of ``png``, ``pdf``, ``svg``; :data:`FORMATS`) and writes one file per
format next to ``path`` (PNG at :data:`PNG_DPI` dpi; PDF and SVG are vector).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..evaluation.matrix import accuracy_seen_so_far


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


FORMATS = ("png", "pdf", "svg")
PNG_DPI = 200
_default_formats: list[tuple[str, ...]] = [("png",)]


@contextmanager
def figure_formats(formats):
    """Within the block, plots saved without explicit ``formats`` are written in ``formats`` (``report`` uses it)."""
    _default_formats.append(check_formats(formats))
    try:
        yield _default_formats[-1]
    finally:
        _default_formats.pop()


def check_formats(formats) -> tuple[str, ...]:
    """Validate figure formats: a non-empty sequence (or comma-separated string) of ``png``, ``pdf``, ``svg``."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",")]
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if not formats or bad:
        raise ValueError(f"figure formats must be a non-empty list of {', '.join(FORMATS)}; got {list(formats)}")
    return formats


def save_figure(fig, path: Path, formats=None) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix of ``formats`` (default: those of :func:`figure_formats`, else
    PNG); returns the written files, the one with ``path``'s own suffix first when it is among them."""
    path = Path(path)
    formats = check_formats(formats if formats is not None else _default_formats[-1])
    own = path.suffix.lstrip(".")
    formats = (own, *[f for f in formats if f != own]) if own in formats else formats
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=PNG_DPI, bbox_inches="tight",
                    metadata={"Date": None} if fmt == "svg" else ({"CreationDate": None} if fmt == "pdf" else None))
        written.append(target)
    return written


def plot_accuracy_matrix(matrix, path: Path, *, title: str = "", experience_names: list[str] | None = None,
                         formats=None) -> Path:
    """Heatmap of ``R[i][j]`` (rows: after training experience i; columns: test experience j), in %."""
    plt = _pyplot()
    m = 100 * np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * m.shape[1], 1.0 + 0.5 * m.shape[0]))
    im = ax.imshow(m, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < 60 else "black")
    names = experience_names or [str(j) for j in range(m.shape[1])]
    ax.set_xticks(range(m.shape[1]), names, rotation=45, ha="right", fontsize=7)
    rows = names if m.shape[0] == m.shape[1] else ["all"]
    ax.set_yticks(range(m.shape[0]), rows, fontsize=7)
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    written = save_figure(fig, path, formats)
    plt.close(fig)
    return written[0]


def _line_styles(n: int) -> list[tuple]:
    """``n`` distinct (colour, dash, marker) triples: tab10 colours, then new dashes and markers."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    dashes, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    return [(colors[i % 10], dashes[(i // 10) % 4], markers[(i // 10) % 4]) for i in range(n)]


def plot_accuracy_curves(results: list[dict], path: Path, *, title: str = "", formats=None) -> Path:
    """Mean accuracy on the experiences seen so far, and on all experiences, after each training experience.

    One line per method (mean over seeds, shaded +- std). Methods trained once (Joint) are drawn as a
    horizontal dashed line at their final accuracy; where the pretrained model can already classify (not
    class-incremental), its mean accuracy before training is a dotted line.
    """
    plt = _pyplot()
    by_method: OrderedDict[str, list[dict]] = OrderedDict()
    for r in results:
        by_method.setdefault(r["label"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    n = max(len(r["accuracy_matrix"][0]) for r in results)
    x = np.arange(1, n + 1)
    pretrained = [np.mean(r["pretrained_accuracy"]) for r in results if r.get("pretrained_accuracy")]
    if pretrained and all(r["scenario_type"] != "class_incremental" for r in results):
        axes[1].axhline(100 * np.mean(pretrained), ls=":", lw=1.2, color="black", label="pretrained (no training)")
    styles = _line_styles(len(by_method))
    for (label, runs), (color, dash, marker) in zip(by_method.items(), styles, strict=True):
        mats = [np.asarray(r["accuracy_matrix"], dtype=float) for r in runs]
        if mats[0].shape[0] == 1:
            final = 100 * np.mean([m.mean() for m in mats])
            for ax in axes:
                ax.axhline(final, ls="--", lw=1, color="gray", label=f"{label} (trained once)")
            continue
        seen = 100 * np.array([accuracy_seen_so_far(m) for m in mats])
        overall = 100 * np.array([m.mean(axis=1) for m in mats])
        for ax, curves in ((axes[0], seen), (axes[1], overall)):
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(x, mean, marker=marker, ms=3, ls=dash, color=color, label=label)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.08 if len(by_method) > 8 else 0.15)
    axes[0].set_title("accuracy on experiences seen so far", fontsize=9)
    axes[1].set_title("accuracy on all experiences", fontsize=9)
    for ax in axes:
        ax.set_xlabel("experiences trained")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[1].get_legend_handles_labels()
    columns = 1 if len(labels) <= 16 else 2
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95), ncol=columns,
               frameon=False)  # outside the axes: it never hides a curve
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    written = save_figure(fig, path, formats)
    plt.close(fig)
    return written[0]


def plot_runs(results: list[dict], out_dir: Path, *, formats=None) -> list[Path]:
    """All plots for a set of runs: a heatmap per (benchmark, method) and curves per benchmark.

    The curves are small multiples, one row per method family with the reference baselines on every row
    (:func:`~avalanche_merge.analysis.family_plots.plot_family_curves`).
    """
    from .family_plots import plot_family_curves

    formats = check_formats(formats if formats is not None else _default_formats[-1])
    written = []
    by_bench: OrderedDict[str, list[dict]] = OrderedDict()
    for r in results:
        by_bench.setdefault(r["benchmark"], []).append(r)
    for bench, runs in by_bench.items():
        written += plot_family_curves(runs, out_dir / f"{bench}_accuracy_curves.png", title=bench, formats=formats)
        labels = list(OrderedDict.fromkeys(r["label"] for r in runs))
        for label in labels:
            mats = [np.asarray(r["accuracy_matrix"], dtype=float) for r in runs if r["label"] == label]
            mean = np.mean(mats, axis=0)
            all_names = {tuple(r["experience_names"]) for r in runs if r["label"] == label}
            names = list(all_names.pop()) if len(all_names) == 1 else None  # class orders differ across seeds
            written.append(plot_accuracy_matrix(mean, out_dir / f"{bench}_{label}_matrix.png",
                                                title=f"{bench} / {label} (mean of {len(mats)} seeds)",
                                                experience_names=names, formats=formats))
    return written
