"""Subspaces of low-rank updates: principal angles, overlap between tasks' LoRA updates (pure torch / numpy).

A LoRA update ``delta W = scaling * B A`` (``out x in``, the shape of ``nn.Linear.weight``) acts on two
subspaces: its *input* subspace, the row space of ``delta W`` (spanned by the rows of ``A``; inputs orthogonal to
it are not changed), and its *output* subspace, the column space (spanned by the columns of ``B``). The
continual LoRA methods argue about these subspaces: O-LoRA (Wang et al., Findings of EMNLP 2023) penalises
``A_i A_t^T`` so that the tasks' input subspaces are orthogonal, InfLoRA (Liang & Li, CVPR 2024) designs ``A_t``
to avoid the input subspace of earlier tasks. This module measures them.

Two subspaces are compared by their principal angles ``0 <= theta_1 <= ... <= theta_k <= pi/2``,
``k = min(dim)`` (Björck & Golub, "Numerical methods for computing angles between linear subspaces", Math.
Comp. 27(123), 1973): with orthonormal bases ``Q_u``, ``Q_v``, ``cos theta_i`` are the singular values of
``Q_u^T Q_v``. The *overlap* is the mean ``cos^2 theta_i = ||Q_u^T Q_v||_F^2 / k``: 1 when the smaller subspace
lies in the other, 0 when they are orthogonal. It is the normalised subspace similarity of LoRA (Hu et al.,
ICLR 2022, Sec. 7.2).

Conventions: ``side="input"`` (the default, the side O-LoRA and InfLoRA constrain) uses the row space of
``delta W``, ``side="output"`` its column space. An update that is exactly zero (a fresh peft adapter, whose
``B`` is 0) has no subspace: its overlaps are ``nan`` (``lora_overlap(..., source="factors")`` uses ``A`` or
``B`` themselves instead). No Avalanche import here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

SIDES = ("input", "output")


def _eps(dtype: Any) -> float:
    """Machine epsilon of a torch or numpy floating dtype (float64's for anything else)."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps if dtype.is_floating_point else float(np.finfo(np.float64).eps)
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else float(np.finfo(np.float64).eps)


def _as_matrix(x: Any, name: str) -> tuple[torch.Tensor, float]:
    """``x`` as a float64 2-D tensor (more dims flattened to ``(shape[0], -1)``) and the eps of its dtype."""
    eps = _eps(x.dtype) if hasattr(x, "dtype") else _eps(np.float64)
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim < 2:
        raise ValueError(f"{name} must be a matrix (2-D, or a conv weight with more dims), got shape "
                         f"{tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1).to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t, eps


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def _check_truncation(rank: int | None, energy: float | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1] or None, got {energy!r}")


def orthonormal_basis(matrix: Any, *, rank: int | None = None, energy: float | None = None,
                      rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis (``n x k`` float64 tensor) of the column space of ``matrix``, by SVD.

    ``k`` is the numerical rank (singular values above ``rtol * sigma_max``; default ``rtol = max(n, m) * eps``
    of the input's dtype, as ``numpy.linalg.matrix_rank``), lowered to ``rank`` and to the fewest leading
    directions holding a fraction ``energy`` of ``sum sigma^2`` (the threshold of GPM, Saha et al., ICLR 2021).
    A zero matrix gives ``k = 0``.
    """
    _check_truncation(rank, energy)
    m, eps = _as_matrix(matrix, "matrix")
    if m.numel() == 0:
        return m.new_zeros((m.shape[0], 0))
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    tol = (max(m.shape) * eps if rtol is None else rtol) * (s[0] if s.numel() else 0.0)
    k = int((s > tol).sum()) if s.numel() and s[0] > 0 else 0
    if energy is not None and k:
        power = s[:k].pow(2)
        cum = torch.cumsum(power, 0) / power.sum()
        k = min(k, int((cum < energy - 1e-12).sum()) + 1)
    if rank is not None:
        k = min(k, rank)
    return u[:, :k]


def update_subspace(delta: Any, rank: int | None = None, energy: float | None = None, *, side: str = "input",
                    rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis of the input (row) or output (column) subspace of an update ``delta W`` (``out x in``).

    Returns an ``in x k`` (``side="input"``) or ``out x k`` (``side="output"``) float64 tensor; ``k`` as in
    :func:`orthonormal_basis` (numerical rank, optionally truncated by ``rank`` / ``energy``).
    """
    _check_side(side)
    m, _ = _as_matrix(delta, "delta")
    eps = _eps(delta.dtype) if hasattr(delta, "dtype") else None
    if rtol is None and eps is not None:
        rtol = max(m.shape) * eps
    return orthonormal_basis(m.T if side == "input" else m, rank=rank, energy=energy, rtol=rtol)


def principal_angles(U: Any, V: Any) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spaces of ``U`` (``n x p``) and ``V`` (``n x q``).

    Björck & Golub (1973): orthonormalise both (SVD, numerical rank), ``cos theta`` = singular values of
    ``Q_u^T Q_v`` clipped to [0, 1]. Angles below 45 degrees are taken from the sines (singular values of
    ``Q_v - Q_u Q_u^T Q_v``), which are accurate for small angles where ``arccos`` is not (Knyazev & Argentati,
    SIAM J. Sci. Comput. 23(6), 2002). Returns ``min(rank U, rank V)`` angles (none if either is zero).
    """
    u, _ = _as_matrix(U, "U")
    v, _ = _as_matrix(V, "V")
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"U and V must have the same number of rows, got shapes {tuple(u.shape)} and "
                         f"{tuple(v.shape)}")
    qu, qv = orthonormal_basis(U), orthonormal_basis(V)
    k = min(qu.shape[1], qv.shape[1])
    if k == 0:
        return np.zeros(0)
    if qu.shape[1] < qv.shape[1]:
        qu, qv = qv, qu
    cross = qu.T @ qv  # p x q with p >= q
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending: ascending angles
    sin = torch.linalg.svdvals(qv - qu @ cross).clamp(0.0, 1.0).flip(0)  # ascending: ascending angles
    theta = torch.where(cos.pow(2) >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return theta.cpu().numpy()


def _basis_overlap(qa: torch.Tensor, qb: torch.Tensor) -> float:
    """Mean ``cos^2`` of the principal angles between two orthonormal bases (nan if either is empty)."""
    k = min(qa.shape[1], qb.shape[1])
    if k == 0:
        return math.nan
    return float(min(1.0, (qa.T @ qb.to(qa.device)).pow(2).sum().item() / k))


def _check_pair(a: torch.Tensor, b: torch.Tensor, side: str, what: str) -> None:
    axis = 1 if side == "input" else 0
    if a.shape[axis] != b.shape[axis]:
        raise ValueError(f"{what}: shape mismatch, {tuple(a.shape)} vs {tuple(b.shape)} (the {side} dimensions "
                         f"differ)")


def subspace_overlap(delta_a: Any, delta_b: Any, *, side: str = "input", rank: int | None = None,
                     energy: float | None = None) -> float:
    """Mean ``cos^2`` of the principal angles between the ``side`` subspaces of two updates.

    1: the smaller subspace lies in the other; 0: orthogonal; ``nan`` if either update is zero. Invariant to
    scaling the updates and to any change of basis (``B A = (B M)(M^{-1} A)``).
    """
    _check_side(side)
    a, _ = _as_matrix(delta_a, "delta_a")
    b, _ = _as_matrix(delta_b, "delta_b")
    _check_pair(a, b, side, "subspace_overlap")
    return _basis_overlap(update_subspace(delta_a, rank, energy, side=side),
                          update_subspace(delta_b, rank, energy, side=side))


def overlap_matrix_from_bases(bases_per_task: Sequence[Mapping[str, torch.Tensor]]
                              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`overlap_matrix` over precomputed orthonormal bases ``{layer: n x k}`` (one dict per task)."""
    t = len(bases_per_task)
    if t == 0:
        raise ValueError("need at least one task")
    layers: list[str] = []
    for i, bases in enumerate(bases_per_task):
        if not bases:
            raise ValueError(f"task {i} has no layers")
        layers += [name for name in bases if name not in layers]
    for i in range(t):
        for j in range(i + 1, t):
            if not any(name in bases_per_task[j] for name in bases_per_task[i]):
                raise ValueError(f"tasks {i} and {j} share no layer")
    per_layer = {name: np.full((t, t), np.nan) for name in layers}
    for name, m in per_layer.items():
        present = [i for i in range(t) if name in bases_per_task[i]]
        for i in present:
            qi = bases_per_task[i][name]
            m[i, i] = 1.0 if qi.shape[1] else math.nan
            for j in (j for j in present if j > i):
                qj = bases_per_task[j][name]
                if qi.shape[0] != qj.shape[0]:
                    raise ValueError(f"layer {name!r}: shape mismatch between tasks {i} and {j} (subspaces of "
                                     f"dimension {qi.shape[0]} and {qj.shape[0]})")
                m[i, j] = m[j, i] = _basis_overlap(qi, qj)
    stacked = np.stack(list(per_layer.values()))
    with warnings.catch_warnings():  # all-nan cells (zero updates) stay nan
        warnings.simplefilter("ignore", RuntimeWarning)
        matrix = np.nanmean(stacked, axis=0)
    return matrix, per_layer


def overlap_matrix(deltas_per_task: Sequence[Mapping[str, Any]], *, side: str = "input", rank: int | None = None,
                   energy: float | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pairwise subspace overlap of the tasks' updates ``[{layer: delta W}, ...]``.

    Returns ``(M, per_layer)``: ``per_layer[layer]`` is the ``T x T`` overlap at that layer (``nan`` where a task
    lacks the layer or its update there is zero), ``M`` its unweighted mean over the layers two tasks share
    (ignoring ``nan``). Symmetric, with ones on the diagonal (``nan`` for an all-zero task).
    """
    _check_side(side)
    _check_truncation(rank, energy)
    bases = [{name: update_subspace(d, rank, energy, side=side) for name, d in task.items()}
             for task in deltas_per_task]
    return overlap_matrix_from_bases(bases)


def lora_overlap(model: torch.nn.Module, *, side: str = "input", adapters: Sequence[str] | None = None,
                 source: str = "delta", rank: int | None = None, energy: float | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`overlap_matrix` of the peft LoRA adapters of ``model`` (default: all, in creation order).

    ``source="delta"`` compares ``delta W = scaling B A`` (:func:`~avalanche_merge.lora.adapters.adapter_deltas`);
    ``source="factors"`` compares the rows of ``A`` (input side) or the columns of ``B`` (output side), which is
    defined for untrained adapters too (``B = 0``) and equals the ``delta`` answer when ``B``, ``A`` have full rank.
    """
    from ..lora.adapters import adapter_deltas, adapter_names, adapter_state

    if source not in ("delta", "factors"):
        raise ValueError(f"source must be 'delta' or 'factors', got {source!r}")
    names = adapter_names(model) if adapters is None else list(adapters)
    if not names:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters")
    missing = [n for n in names if n not in adapter_names(model)]
    if missing:
        raise ValueError(f"unknown adapters {missing}; the model has {adapter_names(model)}")
    if source == "delta":
        return overlap_matrix([adapter_deltas(model, n) for n in names], side=side, rank=rank, energy=energy)
    part = "lora_A" if side == "input" else "lora_B"
    factors = [{k.rsplit(".", 1)[0]: v for k, v in adapter_state(model, n).items() if k.endswith("." + part)}
               for n in names]
    return overlap_matrix(factors, side=side, rank=rank, energy=energy)  # rows of A (r x in) / columns of B


def lora_snapshot(model: torch.nn.Module) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """``{(layer, adapter): (A, B, scaling)}`` clones of every peft LoRA adapter (small: the factors only)."""
    from ..lora.adapters import lora_layers

    return {(name, a): (layer.lora_A[a].weight.detach().clone(), layer.lora_B[a].weight.detach().clone(),
                        float(layer.scaling[a]))
            for name, layer in lora_layers(model).items() for a in layer.lora_A}


def lora_update_since(model: torch.nn.Module, snapshot: Mapping[tuple[str, str], tuple]) -> dict[str, torch.Tensor]:
    """Change of the summed update of the *active* adapters since ``snapshot`` (:func:`lora_snapshot`), per layer.

    Computed adapter by adapter in float64, so adapters that did not change (frozen earlier tasks) contribute an
    exact zero; a new adapter counts from zero. Works for one shared adapter (plain sequential LoRA) and for one
    adapter per task alike. Every LoRA layer is present (a zero matrix where nothing changed); float64.
    """
    from ..lora.adapters import lora_layers

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            if not layer.lora_A:
                continue
            first = next(iter(layer.lora_A))
            total = torch.zeros(layer.lora_B[first].weight.shape[0], layer.lora_A[first].weight.shape[1],
                                dtype=torch.float64, device=layer.lora_A[first].weight.device)
            for a in layer.active_adapters:
                if a not in layer.lora_A:
                    continue
                A, B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, float(layer.scaling[a])
                old = snapshot.get((name, a))
                if old is not None and torch.equal(old[0], A) and torch.equal(old[1], B) and old[2] == s:
                    continue
                change = s * (B.double() @ A.double())
                if old is not None:
                    change = change - old[2] * (old[1].double() @ old[0].double())
                total = total + change
            out[name] = total
    return out


__all__ = ["lora_overlap", "lora_snapshot", "lora_update_since", "orthonormal_basis", "overlap_matrix",
           "overlap_matrix_from_bases", "principal_angles", "subspace_overlap", "update_subspace"]
