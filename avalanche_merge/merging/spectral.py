"""Offline merges that work on the singular value decomposition of each weight matrix.

- :func:`tsv`: Task Singular Vectors merging, TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task
  Interference in Model Merging", CVPR 2025).
- :func:`iso_c` and :func:`iso_cts`: isotropic merging in the common (and task-specific) subspace (Marczak et al.,
  "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025).

Only 2-D entries (weight matrices) not listed in ``exclude`` are decomposed; every other entry (biases, norms,
embeddings of other ranks) is averaged, as in the papers' reference code. Returned task vectors are applied with
``merged.apply_to(pretrained, scaling=alpha)`` (the papers use ``alpha = 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from .task_vector import TaskVector, check_task_vectors


def _is_matrix(name: str, t: torch.Tensor, exclude: Collection[str]) -> bool:
    return t.dim() == 2 and name not in exclude


def _check_exclude(exclude: Collection[str] | None, tv: TaskVector) -> frozenset[str]:
    names = frozenset(exclude or ())
    unknown = sorted(names - set(tv.keys()))
    if unknown:
        raise ValueError(f"exclude names {unknown[0]!r}, which is not a parameter of the task vectors")
    return names


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for x in tensors[1:]:
        out.add_(x)
    return out


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return _sum(tensors).div_(len(tensors))


def _merge_entries(task_vectors: Sequence[TaskVector], exclude: Collection[str] | None,
                   matrix_fn: Callable[[list[torch.Tensor]], torch.Tensor]) -> TaskVector:
    """``matrix_fn`` over the T values of every 2-D entry not excluded; the mean over every other entry."""
    tvs = check_task_vectors(task_vectors)
    skip = _check_exclude(exclude, tvs[0])
    merged = {}
    for name, first in tvs[0].items():
        mats = [tv[name] for tv in tvs]
        merged[name] = matrix_fn(mats) if _is_matrix(name, first, skip) else _mean(mats)
    return TaskVector._trusted(merged)


def reduced_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(m, full_matrices=False)``, retried in float64 when LAPACK's divide-and-conquer fails to
    converge (it can on exactly rank-deficient fp32 inputs, e.g. a task vector with a subspace projected out)."""
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor ``U V^T`` of ``m = U S V^T``: the closest matrix with orthonormal columns (or rows)
    in Frobenius norm (orthogonal Procrustes), used by TSV-M and Iso-CTS to whiten concatenated bases."""
    u, _, vh = reduced_svd(m)
    return u @ vh


def _tsv_matrix(mats: list[torch.Tensor]) -> torch.Tensor:
    n_tasks = len(mats)
    k = max(1, int(min(mats[0].shape) / n_tasks))
    us, ss, vhs = [], [], []
    for m in mats:
        u, s, vh = reduced_svd(m)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u = polar_factor(torch.cat(us, dim=1))
    vh = polar_factor(torch.cat(vhs, dim=0))
    return (u * torch.cat(ss)) @ vh


def tsv(task_vectors: Sequence[TaskVector], *, exclude: Collection[str] | None = None) -> TaskVector:
    """TSV-M: keep each task's top ``min(m, n) // T`` singular triplets of every weight matrix, whiten the
    concatenated left and right singular bases with their polar factors (removing inter-task interference), and
    rebuild ``U_perp diag(S) V_perp^T``; other entries are averaged.

    When ``T > min(m, n)`` each task keeps one triplet (the reference code would keep none).

    Args:
        task_vectors: the task vectors.
        exclude: names of 2-D entries to average instead (e.g. an embedding).

    Raises:
        ValueError: incompatible task vectors, or ``exclude`` names an unknown parameter.
    """
    return _merge_entries(task_vectors, exclude, _tsv_matrix)


def isotropic(m: torch.Tensor) -> torch.Tensor:
    """``U (mean(S) I) V^T`` for ``m = U S V^T``: the same singular subspaces with a flat spectrum."""
    u, s, vh = reduced_svd(m)
    return (u * s.mean()) @ vh


def iso_c(task_vectors: Sequence[TaskVector], *, exclude: Collection[str] | None = None) -> TaskVector:
    """Iso-C: the sum of the task vectors' weight matrices with its singular values replaced by their mean;
    other entries are averaged.

    Raises:
        ValueError: incompatible task vectors, or ``exclude`` names an unknown parameter.
    """
    return _merge_entries(task_vectors, exclude, lambda mats: isotropic(_sum(mats)))


def _iso_cts_matrix(mats: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    n_tasks, full = len(mats), min(mats[0].shape)
    # round the task-specific budget to a multiple of T, as the reference code does; when rounding up would
    # exceed the matrix rank (few dimensions, many tasks) round down instead (all-common when T > min(m, n))
    budget = round((full - int(full * common_fraction)) / n_tasks) * n_tasks
    if budget > full:
        budget = (full // n_tasks) * n_tasks
    common, per_task = full - budget, budget // n_tasks
    u, s, vh = reduced_svd(_sum(mats))
    uc, sc, vhc = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    if per_task > 0:
        for m in mats:
            specific = m - uc @ (uc.T @ m)  # remove the common subspace
            ut, st, vht = reduced_svd(specific)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    u_all = polar_factor(torch.cat([*us, uc], dim=1))
    vh_all = polar_factor(torch.cat([*vhs, vhc], dim=0))
    flat = torch.cat([*ss, sc]).mean()
    return (u_all * flat) @ vh_all


def iso_cts(task_vectors: Sequence[TaskVector], *, common_fraction: float = 0.8,
            exclude: Collection[str] | None = None) -> TaskVector:
    """Iso-CTS: the top ``common_fraction`` of the summed matrix's singular directions (common subspace) plus,
    per task, the top directions of its task vector with the common subspace projected out; the concatenated
    bases are whitened (polar factor) and given one flat singular value, the mean of the kept ones.

    Args:
        task_vectors: the task vectors.
        common_fraction: share of ``min(m, n)`` given to the common subspace, in (0, 1] (paper: 0.8).
        exclude: names of 2-D entries to average instead.

    Raises:
        ValueError: ``common_fraction`` out of range, incompatible task vectors, or an unknown ``exclude`` name.
    """
    if isinstance(common_fraction, bool) or not isinstance(common_fraction, (int, float)):
        raise TypeError(f"common_fraction must be a number, got {type(common_fraction).__name__}")
    if not 0.0 < common_fraction <= 1.0:
        raise ValueError(f"common_fraction must be in (0, 1], got {common_fraction}")
    return _merge_entries(task_vectors, exclude, lambda mats: _iso_cts_matrix(mats, common_fraction))
