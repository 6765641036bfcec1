r"""OPCM: orthogonal-projection continual merging (Tang et al., "Merging Models on the Fly Without Retraining: A
Sequential Approach to Scalable Continual Model Merging", arXiv 2501.09522, 2025).

Task vectors arrive one at a time. For every linear weight, the new task vector ``tau`` is cleaned of its
components along the merged task vector's singular directions, then added to an (unnormalised) running sum ``S``;
the merged task vector is ``S / lambda_t`` with ``lambda_t = ||S|| / mean_i ||tau_i||`` (global norms), so the merge
keeps the average task-vector norm. Other parameters (biases, norms, embeddings) are summed without projection.
The first task vector is the first merge (``lambda_1 = 1``).

The projection, as published (FusionBench's reference code): with the *full* SVD ``Delta = U_f diag(s) V_f^T`` of
the previous merged task vector (``m x n``, ``k = min(m, n)``), the split rank ``r`` is the first index where
``cumsum(s) / sum(s) > alpha``; ``P = U_f^T tau V_f`` has its diagonal and its top-left ``r x r`` block zeroed;
``tau' = U_f P V_f^T``.

Cheapest exact formulation (used here). Since ``U_f P V_f^T = tau`` before zeroing, the result is
``tau' = tau - U_f (P o 1_Z) V_f^T`` with ``Z = {(i, i): i < k} U {(i, j): i, j < r}``. Every index in ``Z`` is below
``k``, so only the first ``k`` columns of ``U_f`` and ``V_f`` enter, i.e. the *reduced* SVD ``U (m x k)``,
``V (n x k)``; the ``m x m`` and ``n x n`` factors are never needed. With ``A = U^T tau`` (``k x n``, one ``kmn``
product), the block is ``B = A V_{:, :r}`` and the diagonal ``p_i = sum_j A_ij V_ji``; then

    ``tau' = tau - U_{:, :r} (B V_{:, :r}^T) - (U_{:, r:} * p_{r:}) V_{:, r:}^T``

which costs a reduced SVD plus about ``2kmn`` flops, against a full SVD plus four products with the ``m x m`` and
``n x n`` factors in the published code. The result is identical up to floating-point rounding
(``opcm_project_full_svd`` below is the published formulation, kept for tests and benchmarks).

One documented difference: when the previous merged weight is exactly zero (a frozen layer), the published code
divides 0 by 0 and removes ``tau``'s entries along an arbitrary LAPACK basis; here ``tau`` passes unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import check_range
from .continual import ContinualMerger
from .spectral import reduced_svd
from .task_vector import TaskVector

_HALF = (torch.float16, torch.bfloat16)


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """First index ``i`` with ``cumsum(s)[i] / sum(s) > alpha`` (0 if none), as in the published code."""
    above = (s.cumsum(0) / s.sum()) > alpha
    return int(above.float().argmax())


def _check_pair(merged: torch.Tensor, task: torch.Tensor, alpha: float) -> None:
    if merged.dim() != 2 or merged.shape != task.shape:
        raise ValueError(f"OPCM projects 2-D weights of equal shape, got {tuple(merged.shape)} and "
                         f"{tuple(task.shape)}")
    check_range("alpha", alpha, 0.0, 1.0)


def opcm_project(merged: torch.Tensor, task: torch.Tensor, alpha: float) -> torch.Tensor:
    """Project ``task`` away from ``merged``'s singular directions (reduced-SVD formulation, see module doc).

    Args:
        merged: the previous merged task vector of one linear weight (``m x n``); any positive scale.
        task: the new task vector of that weight.
        alpha: threshold in [0, 1] on the cumulative singular-value share that fixes the split rank.

    Returns:
        The cleaned task vector, same shape and dtype as ``task`` (half-precision inputs are projected in fp32).
    """
    _check_pair(merged, task, alpha)
    if not merged.any():
        return task.clone()
    if task.dtype in _HALF or merged.dtype in _HALF:  # no half-precision SVD; fp32 accumulation
        return opcm_project(merged.float(), task.float(), alpha).to(task.dtype)
    u, s, vh = reduced_svd(merged)
    v = vh.mT
    r = split_rank(s, alpha)
    a = u.mT @ task  # k x n
    diag = (a * vh).sum(dim=1)  # p_i = u_i^T tau v_i
    out = task - (u[:, r:] * diag[r:]) @ vh[r:]
    if r:
        out -= u[:, :r] @ ((a[:r] @ v[:, :r]) @ vh[:r])
    return out


def opcm_project_full_svd(merged: torch.Tensor, task: torch.Tensor, alpha: float) -> torch.Tensor:
    """The published formulation with full ``U`` and ``V`` (reference for tests and benchmarks only)."""
    _check_pair(merged, task, alpha)
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    v = vh.mT
    r = split_rank(s, alpha)
    p = u.mT @ task @ v
    p.diagonal().fill_(0)
    p[:r, :r] = 0
    return u @ p @ v.mT


def linear_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the ``weight`` of every ``nn.Linear`` in ``model`` (what OPCM projects)."""
    return [f"{name}.weight" if name else "weight" for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear)]


@dataclass(kw_only=True)
class OPCM(ContinualMerger):
    """Orthogonal-projection continual merging (Tang et al., 2025); keeps one running sum and the norms.

    Args:
        alpha: split threshold in [0, 1] on the cumulative singular-value share (paper default 0.5).
        linear: which entries are projected: a collection of names (e.g. :func:`linear_weight_names`), a
            predicate ``(name, tensor) -> bool``, or None for every 2-D entry.
        project: the projection function (``opcm_project``; ``opcm_project_full_svd`` gives the same result
            slower).
    """

    alpha: float = 0.5
    linear: Collection[str] | Callable[[str, torch.Tensor], bool] | None = None
    project: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = opcm_project
    norms: list[float] = field(default_factory=list, init=False)
    _sum: TaskVector | None = field(default=None, init=False, repr=False)
    _lambda: float = field(default=1.0, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)
        if not (self.linear is None or callable(self.linear) or isinstance(self.linear, Collection)):
            raise TypeError(f"linear must be names, a predicate or None, got {type(self.linear).__name__}")

    def _is_linear(self, name: str, t: torch.Tensor) -> bool:
        if self.linear is None:
            return t.dim() == 2
        if callable(self.linear):
            return bool(self.linear(name, t))
        return name in self.linear

    def _add(self, task_vector: TaskVector) -> None:
        if isinstance(self.linear, Collection) and not callable(self.linear):
            unknown = sorted(set(self.linear) - set(task_vector.keys()))
            if unknown:
                raise ValueError(f"linear names {unknown[0]!r}, which is not in the task vector")
        self.norms.append(task_vector.norm())
        if self._sum is None:
            self._sum = task_vector * 1.0
            self._lambda = 1.0
            return
        new = {}
        for name, prev in self._sum.items():
            tau = task_vector[name]
            if self._is_linear(name, tau) and tau.dim() == 2:
                tau = self.project(prev, tau, self.alpha)
            new[name] = prev + tau
        self._sum = TaskVector._trusted(new)
        total = self._sum.norm()
        mean_norm = sum(self.norms) / len(self.norms)
        self._lambda = total / mean_norm if mean_norm > 0 else 1.0

    @property
    def lambda_t(self) -> float:
        """The current normaliser ``||S|| / mean_i ||tau_i||`` (1 after the first task)."""
        return self._lambda

    @property
    def merged(self) -> TaskVector:
        self._require_tasks()
        if self._lambda == 0:
            return self._sum * 1.0
        return self._sum * (1.0 / self._lambda)
