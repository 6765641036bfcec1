"""Accuracy curves as small multiples: one row per method family, the reference baselines on every row.

A figure with every method on two axes is unreadable past a dozen lines. Here each family (merging, LoRA,
sparse, retrieval, ...) gets its own row, drawn against the same few baselines (``naive``, ``replay``,
``cumulative``, ``joint``, and the pretrained model where it can classify), so that every row answers "does this
family beat the baselines". Left column: accuracy on the experiences seen so far; right column: accuracy on all
experiences. Legends sit outside the axes, to the right of each row.

Every method keeps one colour in every figure: a method's colour depends only on its family and its rank among
that family's registered methods (:func:`method_style`), and baselines are drawn in dark neutral colours with
their own dashes, so the same baseline looks the same on every row and in every figure.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..evaluation.matrix import accuracy_seen_so_far
from .plots import _pyplot, save_figure

REFERENCE_BASELINES = ("naive", "replay", "cumulative", "joint")
BASELINE_FAMILY = "baseline"
# Dark, neutral colours for the baselines (never used for a family's methods); dashes tell them apart in grey print.
_BASELINE_STYLES = {
    "naive": ("#000000", "-", "x"),
    "replay": ("#6b4c2a", "--", "+"),
    "cumulative": ("#7f7f7f", ":", "."),
    "der": ("#3d3d6b", "-.", "1"),
    "ewc": ("#555555", (0, (5, 1, 1, 1)), "2"),
    "lwf": ("#8c6d31", (0, (1, 2)), "3"),
    "si": ("#4d4d4d", (0, (3, 1, 1, 1, 1, 1)), "4"),
    "slda": ("#2f4f4f", (0, (6, 2)), "|"),
    "joint": ("#7f7f7f", "--", None),
}
_FAMILY_ORDER = ("merging", "lora", "sparse", "retrieval", "prompt", "zeroshot", "tta")


def _palette() -> list:
    import matplotlib

    # tab10 without its grey (index 7), which is reserved for baselines, then Dark2 for families beyond 9 methods
    tab = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 7]
    return tab + list(matplotlib.colormaps["Dark2"].colors)


def method_families(methods: Iterable[str]) -> dict[str, str]:
    """``{method: family}`` from the method registry; methods it does not know are in family ``"other"``."""
    try:
        from ..strategies import METHODS
    except Exception:  # noqa: BLE001 - plotting must work on stored results without the training stack
        return {m: "other" for m in methods}
    return {m: (METHODS.get(m).family if m in METHODS else "other") for m in methods}


def _family_ranks(family: str) -> list[str]:
    try:
        from ..strategies import METHODS
    except Exception:  # noqa: BLE001
        return []
    return [n for n in METHODS.names() if METHODS.get(n).family == family]


def method_style(method: str, family: str, label: str | None = None) -> tuple:
    """``(colour, dash, marker)`` of a method, the same in every figure.

    Baselines get fixed neutral styles; a family's methods get the palette colour of their rank among the
    family's registered methods (alphabetical, so adding a method to another family changes nothing here). An
    ablation label (``inflora-shared``) keeps its method's colour with a dashed line.
    """
    if family == BASELINE_FAMILY and method in _BASELINE_STYLES:
        colour, dash, marker = _BASELINE_STYLES[method]
    else:
        ranks = _family_ranks(family)
        rank = ranks.index(method) if method in ranks else sum(map(ord, method))  # unregistered: stable, by name
        palette = _palette()
        colour, dash, marker = palette[rank % len(palette)], "-", "os^Dv<>ph*"[rank % 10]
    if label is not None and label != method:
        dash = "--"
    return colour, dash, marker


def _curves(runs: Sequence[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    mats = [np.asarray(r["accuracy_matrix"], dtype=float) for r in runs]
    if mats[0].shape[0] == 1:
        return None
    seen = 100 * np.array([accuracy_seen_so_far(m) for m in mats])
    overall = 100 * np.array([m.mean(axis=1) for m in mats])
    return seen, overall


def plot_family_curves(results: list[dict], path: Path, *, title: str = "", formats: Sequence[str] | None = None,
                       baselines: Sequence[str] = REFERENCE_BASELINES) -> list[Path]:
    """One row per family (its methods + ``baselines``), seen-so-far and all-experience accuracy; mean +- std.

    Args:
        results: stored run records of one benchmark (``label``, ``method``, ``accuracy_matrix``, ...).
        path: output path; its suffix is replaced by each of ``formats``.
        title: figure title.
        formats: any of ``png``, ``pdf``, ``svg`` (default: PNG, or an enclosing ``figure_formats`` block's).
        baselines: baseline methods drawn on every row (those present in ``results``); every baseline also has
            its own row.

    Returns:
        The written files.
    """
    plt = _pyplot()
    fig = family_figure(results, title=title, baselines=baselines)
    written = save_figure(fig, path, formats)
    plt.close(fig)
    return written


def family_figure(results: list[dict], *, title: str = "", baselines: Sequence[str] = REFERENCE_BASELINES):
    """The matplotlib figure of :func:`plot_family_curves` (not saved; the caller closes it)."""
    if not results:
        raise ValueError("no runs to plot")
    plt = _pyplot()
    by_label: OrderedDict[str, list[dict]] = OrderedDict()
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    method_of = {label: runs[0]["method"] for label, runs in by_label.items()}
    family_of = method_families(set(method_of.values()))
    rows: OrderedDict[str, list[str]] = OrderedDict()
    present = sorted({family_of[m] for m in method_of.values()},
                     key=lambda f: (f == BASELINE_FAMILY, _FAMILY_ORDER.index(f) if f in _FAMILY_ORDER else 99, f))
    for fam in present:
        rows[fam] = [label for label, m in method_of.items() if family_of[m] == fam]
    refs = [label for label, m in method_of.items() if m in baselines and family_of[m] == BASELINE_FAMILY]
    n = max(len(r["accuracy_matrix"][0]) for r in results)
    x = np.arange(1, n + 1)
    pretrained = [np.mean(r["pretrained_accuracy"]) for r in results if r.get("pretrained_accuracy")]
    show_pretrained = bool(pretrained) and all(r["scenario_type"] != "class_incremental" for r in results)

    fig, axes = plt.subplots(len(rows), 2, figsize=(9.5, 2.6 * len(rows) + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    for (fam, labels), row in zip(rows.items(), axes, strict=True):
        drawn = labels + [r for r in refs if r not in labels]
        for label in drawn:
            method = method_of[label]
            colour, dash, marker = method_style(method, family_of[method], label)
            is_ref = label not in labels
            curves = _curves(by_label[label])
            for col, ax in enumerate(row):
                if curves is None:  # trained once (Joint): its final accuracy as a horizontal line
                    final = 100 * np.mean([np.mean(r["accuracy_matrix"]) for r in by_label[label]])
                    ax.axhline(final, ls=dash, lw=1.0, color=colour, label=f"{label} (trained once)")
                    continue
                mean, std = curves[col].mean(0), curves[col].std(0)
                ax.plot(x, mean, ls=dash, color=colour, marker=marker, ms=3.5, lw=1.0 if is_ref else 1.6,
                        alpha=0.75 if is_ref else 1.0, label=label)
                if not is_ref:
                    ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.12, lw=0)
        if show_pretrained:
            row[1].axhline(100 * np.mean(pretrained), ls=(0, (1, 1)), lw=1.0, color="#999999",
                           label="pretrained (no training)")
        row[0].set_ylabel(f"{fam}\naccuracy (%)", fontsize=9)
        handles, names = row[1].get_legend_handles_labels()
        row[1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                      borderaxespad=0.0)  # outside the axes: it never hides a curve
    axes[0][0].set_title("accuracy on experiences seen so far", fontsize=9)
    axes[0][1].set_title("accuracy on all experiences", fontsize=9)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        ax.set_xticks(x)
    for ax in axes[-1]:
        ax.set_xlabel("experiences trained")
    height = fig.get_size_inches()[1]
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 - 0.05 / height)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - (0.35 / height if title else 0.0)))  # the title above the columns'
    return fig
