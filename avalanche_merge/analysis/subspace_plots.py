"""PNG heatmaps of the subspace overlap and interference matrices (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .plots import _pyplot


def _square(matrix, labels: Sequence[str] | None, what: str) -> tuple[np.ndarray, list[str]]:
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{what} must be a non-empty square matrix, got shape {m.shape}")
    names = [str(i) for i in range(m.shape[0])] if labels is None else [str(x) for x in labels]
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} labels for a {m.shape[0]} x {m.shape[0]} {what}")
    return m, names


def _heatmap(m: np.ndarray, names: list[str], path: Path | str, *, title: str, xlabel: str, ylabel: str,
             cmap: str, vmin: float, vmax: float, bar: str, fmt: str) -> Path:
    plt = _pyplot()
    path = Path(path)
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * n, 1.2 + 0.5 * n))
    im = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    mid = (vmin + vmax) / 2
    span = (vmax - vmin) or 1.0
    for i in range(n):
        for j in range(n):
            if np.isfinite(m[i, j]):
                dark = abs(m[i, j] - mid) > 0.3 * span if cmap == "RdBu_r" else m[i, j] < mid
                ax.text(j, i, format(m[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=bar)
    fig.tight_layout()
    from .plots import save_figure

    written = save_figure(fig, path)  # PNG, or the formats of an enclosing ``figure_formats`` block
    plt.close(fig)
    return written[0]


def plot_overlap_matrix(matrix, path: Path | str, *, labels: Sequence[str] | None = None,
                        title: str = "subspace overlap of the task updates") -> Path:
    """Heatmap of a ``T x T`` overlap matrix in [0, 1] (:func:`~avalanche_merge.analysis.subspace.overlap_matrix`),
    values annotated, ``nan`` cells blank. Returns ``path``."""
    m, names = _square(matrix, labels, "overlap matrix")
    return _heatmap(m, names, path, title=title, xlabel="task", ylabel="task", cmap="viridis", vmin=0.0, vmax=1.0,
                    bar="mean cos² of principal angles", fmt=".2f")


def plot_interference(matrix, path: Path | str, *, labels: Sequence[str] | None = None,
                      title: str = "interference (loss increase on earlier tasks)") -> Path:
    """Heatmap of ``I[i, j] = L[i, j] - L[j, j]``
    (:func:`~avalanche_merge.evaluation.interference.interference_matrix`): red = the loss on earlier task ``j``
    went up after training ``i``, blue = it went down; colour scale symmetric around 0. Returns ``path``."""
    m, names = _square(matrix, labels, "interference matrix")
    finite = m[np.isfinite(m)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    bound = bound or 1.0
    return _heatmap(m, names, path, title=title, xlabel="earlier task j (loss measured)",
                    ylabel="after training task i", cmap="RdBu_r", vmin=-bound, vmax=bound,
                    bar="loss increase", fmt=".3g")


__all__ = ["plot_interference", "plot_overlap_matrix"]
