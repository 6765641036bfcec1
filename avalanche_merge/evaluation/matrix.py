"""Continual-learning metrics computed from an accuracy matrix.

``R[i][j]`` is the accuracy on test experience ``j`` after training experience ``i`` (``T x T``; a method
that trains once on everything, like Joint, has a single row). Definitions:

- final accuracy: ``mean_j R[T-1][j]``.
- average incremental accuracy (Rebuffi et al., iCaRL, CVPR 2017): ``mean_i mean_{j<=i} R[i][j]``.
- backward transfer (Lopez-Paz & Ranzato, GEM, NeurIPS 2017): ``mean_{j<T-1} (R[T-1][j] - R[j][j])``.
- forgetting (Chaudhry et al., RWalk, ECCV 2018): ``mean_{j<T-1} max_{j<=l<T-1} R[l][j] - R[T-1][j]``, the drop
  from the best accuracy ever reached on ``j`` after learning it. Avalanche's ``forgetting_metrics`` instead
  reports ``R[j][j] - R[T-1][j]`` (initial minus last), which is never larger than this one.

Metrics that need more than one row return ``nan`` for single-row matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _as_matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty 2-D array, got shape {m.shape}")
    if m.shape[0] > 1 and m.shape[0] != m.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T x T) or a single row, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("accuracy matrix contains NaN or Inf")
    return m


def final_accuracy(R) -> float:
    """Mean accuracy over all experiences after the last training step."""
    return float(_as_matrix(R)[-1].mean())


def average_incremental_accuracy(R) -> float:
    """Mean over training steps of the mean accuracy on the experiences seen so far (iCaRL)."""
    m = _as_matrix(R)
    if m.shape[0] == 1:
        return math.nan
    return float(np.mean([m[i, : i + 1].mean() for i in range(m.shape[0])]))


def backward_transfer(R) -> float:
    """Mean change of accuracy on earlier experiences between learning them and the end (GEM's BWT)."""
    m = _as_matrix(R)
    t = m.shape[0]
    if t == 1:
        return math.nan
    return float(np.mean([m[t - 1, j] - m[j, j] for j in range(t - 1)]))


def forgetting(R) -> float:
    """Chaudhry's max-based forgetting: best accuracy after learning ``j`` minus final accuracy, averaged."""
    m = _as_matrix(R)
    t = m.shape[0]
    if t == 1:
        return math.nan
    return float(np.mean([m[j : t - 1, j].max() - m[t - 1, j] for j in range(t - 1)]))


def accuracy_seen_so_far(R) -> list[float]:
    """``mean_{j<=i} R[i][j]`` for every training step ``i`` (the curve behind average incremental accuracy)."""
    m = _as_matrix(R)
    if m.shape[0] == 1:
        return [float(m[0].mean())]
    return [float(m[i, : i + 1].mean()) for i in range(m.shape[0])]


def summarize_matrix(R) -> dict[str, float]:
    """All scalar metrics of this module, keyed by their summary-column names."""
    return {
        "final_acc": final_accuracy(R),
        "avg_inc_acc": average_incremental_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
    }
