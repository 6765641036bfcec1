"""PNG plots of the ``analysis`` record of runs: task-vector cosine heatmaps, per-layer update norms, CKA drift
curves, accumulation versus retention, and geometry statistics versus forgetting (matplotlib, Agg).

Per-run arrays may be given for one run or stacked over seeds (one more leading axis); :func:`seed_mean` averages
them, ignoring ``None`` / ``nan`` entries. The scatter plots take the rows of
:func:`~avalanche_merge.analysis.report.report_rows` (``<key>_mean`` / ``<key>_std`` columns, fractions).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .plots import _pyplot


def seed_mean(values, ndim: int) -> np.ndarray:
    """``values`` as a float array of ``ndim`` dimensions (``None`` becomes ``nan``); when it has one more axis,
    the seeds, the ``nan``-ignoring mean over that axis. Raises ``ValueError`` for ragged input or another rank."""
    a = np.array(values, dtype=float)
    if a.ndim == ndim + 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-nan slices stay nan
            a = np.nanmean(a, axis=0)
    if a.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D array (or {ndim + 1}-D over seeds), got shape {a.shape}")
    return a


def probe_mean(cka) -> np.ndarray:
    """``T x L`` mean over probes (ignoring undefined entries) of a ``T x L x P`` CKA record, or its mean over
    seeds when ``S x T x L x P``."""
    a = seed_mean(cka, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=-1)


def block_prefix(name: str) -> str:
    """The block a parameter belongs to: its name up to the first numeric component (``blocks.0.attn.q.weight``
    -> ``blocks.0``), else its module (``head.weight`` -> ``head``; ``cls_token`` stays)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def group_norms(norms, names: list[str], *, max_rows: int = 30) -> tuple[np.ndarray, list[str], bool]:
    """Per-layer norms as ``layers x experiences``: ``norms`` is ``T x len(names)`` (or over seeds). With more than
    ``max_rows`` names, tensors are grouped by :func:`block_prefix` into ``sqrt(sum of squares)`` (the norm of the
    block's concatenated update). Returns ``(matrix, row_names, grouped)``."""
    a = seed_mean(norms, 2)
    if a.shape[1] != len(names):
        raise ValueError(f"norms have {a.shape[1]} columns but {len(names)} names were given")
    if len(names) <= max_rows:
        return a.T, list(names), False
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for k, n in enumerate(names):
        groups.setdefault(block_prefix(n), []).append(k)
    m = np.stack([np.sqrt(np.nansum(a[:, idx] ** 2, axis=1)) for idx in groups.values()])
    return m, list(groups), True


def _save(plt, fig, path: Path) -> Path:
    from .plots import save_figure

    written = save_figure(fig, path)  # PNG, or the formats of an enclosing ``figure_formats`` block
    plt.close(fig)
    return written[0]


def _exp_ticks(ax, n: int, axis: str = "x") -> None:
    ticks = list(range(n)) if n <= 20 else list(range(0, n, math.ceil(n / 20)))
    getattr(ax, f"set_{axis}ticks")(ticks, [str(t + 1) for t in ticks], fontsize=7)


def plot_cosine_heatmap(matrix, path: Path, *, title: str = "task-vector cosine similarity") -> Path:
    """Heatmap of the ``T x T`` cosine similarity of the experiences' task vectors (or their mean over seeds,
    ``S x T x T``), diverging colours from -1 to 1, values written in the cells up to ``T = 16``."""
    plt = _pyplot()
    m = seed_mean(matrix, 2)
    t = m.shape[0]
    side = max(3.4, 2.2 + 0.45 * t)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r", aspect="equal")
    if t <= 16:
        for i in range(t):
            for j in range(m.shape[1]):
                v = m[i, j]
                text = "-" if not np.isfinite(v) else f"{v:.2f}".replace("-0.00", "0.00")
                ax.text(j, i, text, ha="center", va="center",
                        fontsize=7 if t <= 8 else 5, color="white" if np.isfinite(v) and abs(v) > 0.6 else "black")
    _exp_ticks(ax, m.shape[1], "x")
    _exp_ticks(ax, t, "y")
    ax.set_xlabel("experience")
    ax.set_ylabel("experience")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="cosine similarity", fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_layer_norms(norms, names: list[str], path: Path, *, title: str = "per-layer update norm") -> Path:
    """Heatmap of per-layer update norms (rows: layers, columns: experiences) from ``T x len(names)`` norms (or
    ``S x T x len(names)`` over seeds). The colour scale is logarithmic when the non-zero values span more than a
    factor 100 (zeros, frozen tensors, are left blank); many names are grouped by block (:func:`group_norms`)
    and the title says so."""
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    m, rows, grouped = group_norms(norms, names)
    if grouped:
        title = f"{title}\n({len(names)} tensors grouped into {len(rows)} blocks: sqrt of summed squares)"
    positive = m[np.isfinite(m) & (m > 0)]
    log = positive.size > 0 and positive.max() > 100 * positive.min()
    shown = np.where(m > 0, m, np.nan) if log else m
    width = 2.8 + 0.45 * m.shape[1] + 0.055 * max(len(r) for r in rows)
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.2 * len(rows)))
    cmap = plt.get_cmap("magma").with_extremes(bad="#dddddd")
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if log else None
    im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _exp_ticks(ax, m.shape[1], "x")
    ax.set_yticks(range(len(rows)), rows, fontsize=6 if len(rows) > 20 else 7)
    ax.set_xlabel("experience trained")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="L2 norm" + (" (log scale)" if log else ""))
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_cka_curves(cka, layers: list[str], path: Path, *, title: str = "representation drift (CKA)",
                    learned=None) -> Path:
    """CKA drift curves: x = experiences trained (1..T), y = linear CKA between the pretrained and the current
    features averaged over the probes (``cka``: ``T x L x P`` or ``S x T x L x P`` over seeds), one line per
    layer (darker: deeper). With ``learned`` (same shape), a second panel shows CKA between the features right
    after each probe's experience was learned and now, averaged over the earlier probes."""
    plt = _pyplot()
    pre = probe_mean(cka)
    if pre.shape[1] != len(layers):
        raise ValueError(f"CKA has {pre.shape[1]} layers but {len(layers)} names were given")
    panels = [(pre, "CKA vs pretrained (mean over probes)")]
    if learned is not None:
        panels.append((probe_mean(learned), "CKA vs just-learned (mean over earlier probes)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.2, 4), squeeze=False)
    colours = plt.get_cmap("viridis")(np.linspace(0.9, 0.0, max(len(layers), 2)))
    x = np.arange(1, pre.shape[0] + 1)
    for ax, (m, name) in zip(axes[0], panels):
        for k, layer in enumerate(layers):
            ax.plot(x, m[:, k], marker="o", ms=3, color=colours[k], label=layer)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("experiences trained")
        ax.set_xticks(x if len(x) <= 20 else x[:: math.ceil(len(x) / 20)])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("linear CKA")
    axes[0][-1].legend(fontsize=6 if len(layers) > 8 else 7, loc="center left", bbox_to_anchor=(1.01, 0.5),
                       title="layer", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path)


def _points(rows: list[dict], x_key: str, y_key: str) -> list[tuple[str, float, float, float, float]]:
    out = []
    for r in rows:
        x, y = r.get(f"{x_key}_mean", math.nan), r.get(f"{y_key}_mean", math.nan)
        if x is not None and y is not None and np.isfinite(x) and np.isfinite(y):
            out.append((r["method"], x, y, r.get(f"{x_key}_std") or 0.0, r.get(f"{y_key}_std") or 0.0))
    return out


def _scatter(ax, points, xscale: float, yscale: float) -> None:
    colours = _pyplot().get_cmap("tab10").colors
    for k, (_, x, y, sx, sy) in enumerate(points):
        ax.errorbar(xscale * x, yscale * y, xerr=xscale * sx, yerr=yscale * sy, fmt="os^Dv"[k // 10 % 5], ms=5,
                    color=colours[k % 10], elinewidth=0.8, capsize=2, alpha=0.9)
    ax.margins(0.12)  # room for the labels at the edges
    ax.grid(alpha=0.3)


_OFFSETS = ((5, 3), (5, -3), (-5, 3), (-5, -3), (0, 7), (0, -7), (10, 0), (-10, 0), (8, 10), (-8, -10), (8, -10),
            (-8, 10))


def _label_points(ax, points, xscale: float, yscale: float) -> None:
    """Method labels beside their points, each at the candidate offset that overlaps the labels already placed,
    the markers and the axes border least (greedy; call after the layout is final)."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    xy = [(xscale * x, yscale * y) for _, x, y, _, _ in points]
    taken = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in ax.transData.transform(xy)] if xy else []
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))

    def cost(bb) -> float:
        area = sum(max(0.0, min(bb.x1, o.x1) - max(bb.x0, o.x0)) * max(0.0, min(bb.y1, o.y1) - max(bb.y0, o.y0))
                   for o in taken)
        inside = Bbox.intersection(bb, frame)
        outside = bb.width * bb.height - (inside.width * inside.height if inside is not None else 0.0)
        return area + 4 * outside

    for (label, *_), pos in zip(points, xy):
        best = None
        for dx, dy in _OFFSETS:
            t = ax.annotate(label, pos, xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.6},
                            ha="left" if dx > 0 else "right" if dx < 0 else "center",
                            va="bottom" if dy > 0 else "top" if dy < 0 else "center")
            bb = t.get_window_extent(renderer)
            c = cost(bb)
            if best is None or c < best[0]:
                if best is not None:
                    best[1].remove()
                best = (c, t, bb)
            else:
                t.remove()
            if c == 0:
                break
        taken.append(best[2])


def plot_accumulation_retention(rows: list[dict], path: Path, title: str = "accumulation vs retention") -> Path:
    """Scatter of knowledge accumulation (mean accuracy on the adaptation tasks after the last step) against
    retention (mean accuracy on the held-out tasks), one labelled point per method with +- std error bars, in
    the style of Roth et al. 2024; the pretrained model is a black star with dotted guides when the rows carry
    ``pretrained_accumulation`` / ``pretrained_retention``. Raises ``ValueError`` when no row has both values."""
    plt = _pyplot()
    points = _points(rows, "accumulation", "retention")
    if not points:
        raise ValueError("no row has both accumulation and retention (were held-out tasks configured?)")
    fig, ax = plt.subplots(figsize=(6.5, 5))
    _scatter(ax, points, 100, 100)
    pre = _points([{**r, "method": "pretrained"} for r in rows], "pretrained_accumulation", "pretrained_retention")
    if pre:
        px, py = np.mean([p[1] for p in pre]), np.mean([p[2] for p in pre])
        ax.plot(100 * px, 100 * py, marker="*", ms=13, color="black", ls="none", label="pretrained (no training)")
        ax.axvline(100 * px, ls=":", lw=0.8, color="black")
        ax.axhline(100 * py, ls=":", lw=0.8, color="black")
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("accumulation: accuracy on the adaptation tasks (%)")
    ax.set_ylabel("retention: accuracy on held-out tasks (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _label_points(ax, points, 100, 100)
    return _save(plt, fig, path)


def plot_geometry_vs_forgetting(rows: list[dict], x_key: str, path: Path, title: str = "", *,
                                xlabel: str | None = None) -> Path:
    """Scatter across methods of a per-method statistic (``x_key``, e.g. ``mean_step_cosine``) against Chaudhry
    forgetting (%), labelled by method with +- std error bars; the title gives the Pearson r and the number of
    methods. Raises ``ValueError`` when no row has both values."""
    from .report import correlations

    plt = _pyplot()
    points = _points(rows, x_key, "forgetting")
    if not points:
        raise ValueError(f"no row has both {x_key} and forgetting")
    c = correlations(rows, x_key, "forgetting")
    r = "n/a" if not np.isfinite(c["pearson"]) else f"{c['pearson']:.2f}"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    _scatter(ax, points, 1, 100)
    ax.set_xlabel(xlabel or x_key)
    ax.set_ylabel("forgetting, Chaudhry max-based (%)")
    ax.set_title(f"{title}\nPearson r = {r} (n = {c['n']} methods)".strip(), fontsize=9)
    fig.tight_layout()
    _label_points(ax, points, 1, 100)
    return _save(plt, fig, path)


__all__ = ["block_prefix", "group_norms", "plot_accumulation_retention", "plot_cka_curves", "plot_cosine_heatmap",
           "plot_geometry_vs_forgetting", "plot_layer_norms", "probe_mean", "seed_mean"]
