"""Continual-learning metrics computed from an accuracy matrix.

``R[i][j]`` is the accuracy on test experience ``j`` after training experience ``i`` (``T x T``; a method
that trains once on everything, like Joint, has a single row). Definitions:

- final accuracy: ``mean_j R[T-1][j]``.
- average incremental accuracy (Rebuffi et al., iCaRL, CVPR 2017): ``mean_i mean_{j<=i} R[i][j]``.
- backward transfer (Lopez-Paz & Ranzato, GEM, NeurIPS 2017): ``mean_{j<T-1} (R[T-1][j] - R[j][j])``.
- forgetting (Chaudhry et al., RWalk, ECCV 2018): ``mean_{j<T-1} max_{j<=l<T-1} R[l][j] - R[T-1][j]``, the drop
  from the best accuracy ever reached on ``j`` after learning it.
- average accuracy after step ``i`` (Chaudhry et al. 2018; GEM's ACC at ``i = T-1``): ``mean_{j<=i} R[i][j]``.
- forward transfer against the pretrained model: ``mean_{j>=1} (R[j-1][j] - b_j)`` with ``b`` the accuracy of the
  model before any training (the zero-shot / pretrained row). GEM (Lopez-Paz & Ranzato 2017) defines FWT with
  ``b`` from a *randomly initialised* model; for a pretrained backbone the pretrained model is the reference that
  says whether earlier experiences helped or hurt the next one.
- knowledge accumulation and retention (Roth et al., "A Practitioner's Guide to Continual Multimodal
  Pretraining", NeurIPS 2024 D&B): accumulation is the mean accuracy on the adaptation tasks, retention the mean
  accuracy on held-out probe tasks that are never trained on, and their geometric mean summarises the trade-off.
  :func:`accumulation_retention` gives them after every step and their change from the pretrained model.

How these differ from Avalanche's built-ins (avalanche-lib 0.6):

- ``forgetting_metrics`` reports ``R[j][j] - R[T-1][j]`` (accuracy right after training ``j`` minus last), and
  ``bwt_metrics`` its negative, averaged over ``j < T-1``; that is GEM's BWT, not Chaudhry's forgetting, which
  takes the *best* earlier accuracy and is never smaller.
- ``forward_transfer_metrics`` takes ``b`` from the first evaluation the strategy runs (the pretrained model if
  you evaluate before training, else nothing: it needs ``eval_every > -1``), and averages over the experiences
  evaluated so far; ours is a function of the stored matrix and the pretrained row.
- Avalanche's ``accuracy_metrics(stream=True)`` is the accuracy over the pooled test stream (weighted by
  experience size, all experiences including unseen ones); ``final_accuracy`` here is the unweighted mean over
  experiences, and ``average_accuracy`` the mean over the experiences seen so far.
- Avalanche has no average incremental accuracy, no max-based forgetting and no held-out retention metric.

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


def average_accuracy(R, step: int | None = None) -> float:
    """Mean accuracy over the experiences seen after training step ``step`` (default: the last one)."""
    m = _as_matrix(R)
    if m.shape[0] == 1:
        return float(m[0].mean())
    i = m.shape[0] - 1 if step is None else step
    if not 0 <= i < m.shape[0]:
        raise ValueError(f"step must be in [0, {m.shape[0] - 1}], got {step}")
    return float(m[i, : i + 1].mean())


def _row(values, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.shape[0] != n:
        raise ValueError(f"{name} must hold one accuracy per experience ({n}), got {v.shape[0]}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or Inf")
    return v


def forward_transfer(R, pretrained) -> float:
    """Mean over ``j >= 1`` of ``R[j-1][j] - pretrained[j]``: accuracy on experience ``j`` just before training it,
    minus the pretrained model's accuracy on it (``nan`` for a single row)."""
    m = _as_matrix(R)
    t = m.shape[0]
    b = _row(pretrained, m.shape[1], "pretrained")
    if t == 1:
        return math.nan
    return float(np.mean([m[j - 1, j] - b[j] for j in range(1, t)]))


def accumulation_retention(R, held_out, *, pretrained=None, held_out_pretrained=None) -> dict:
    """Knowledge accumulation versus retention of held-out ability (Roth et al. 2024), after every step.

    Args:
        R: the accuracy matrix on the adaptation experiences (``T x T``, or the first rows of it during a stream).
        held_out: ``T x K`` accuracies on ``K`` held-out probe tasks after every step (never trained on).
        pretrained: the pretrained model's accuracy on each adaptation experience (optional).
        held_out_pretrained: its accuracy on each held-out task (optional).

    Returns:
        ``accumulation`` / ``retention`` / ``geometric_mean`` lists (one per step: mean of ``R[i]``, mean of
        ``held_out[i]``, their geometric mean), the final values as ``final_*``, and, when the pretrained rows are
        given, ``pretrained_accumulation`` / ``pretrained_retention`` and the final ``accumulation_gain`` /
        ``retention_change`` against them.

    Raises:
        ValueError: ``held_out`` is not ``T x K`` with ``K >= 1``, or a row has the wrong length.
    """
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.size == 0 or not np.all(np.isfinite(m)):
        raise ValueError(f"R must be a non-empty finite 2-D accuracy matrix, got shape {m.shape}")
    h = np.asarray(held_out, dtype=float)
    if h.ndim != 2 or h.shape[0] != m.shape[0] or h.shape[1] == 0:
        raise ValueError(f"held_out must be a {m.shape[0]} x K matrix (one row per training step, K >= 1), got "
                         f"shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("held_out contains NaN or Inf")
    acc, ret = m.mean(axis=1), h.mean(axis=1)
    geo = np.sqrt(np.clip(acc, 0, None) * np.clip(ret, 0, None))
    out = {"accumulation": acc.tolist(), "retention": ret.tolist(), "geometric_mean": geo.tolist(),
           "final_accumulation": float(acc[-1]), "final_retention": float(ret[-1]),
           "final_geometric_mean": float(geo[-1])}
    if pretrained is not None:
        out["pretrained_accumulation"] = float(_row(pretrained, m.shape[1], "pretrained").mean())
        out["accumulation_gain"] = float(acc[-1]) - out["pretrained_accumulation"]
    if held_out_pretrained is not None:
        out["pretrained_retention"] = float(_row(held_out_pretrained, h.shape[1], "held_out_pretrained").mean())
        out["retention_change"] = float(ret[-1]) - out["pretrained_retention"]
    return out


def summarize_matrix(R) -> dict[str, float]:
    """All scalar metrics of this module, keyed by their summary-column names."""
    return {
        "final_acc": final_accuracy(R),
        "avg_inc_acc": average_incremental_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
    }
