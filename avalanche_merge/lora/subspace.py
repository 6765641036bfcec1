"""Input subspaces of old tasks (pure torch): input covariances, the GPM energy criterion and DualGPM.

- :class:`InputCovariance` / :func:`collect_covariances`: the uncentred covariance ``C = X X^T / n`` of the
  inputs ``X`` (d x n, every token a column) of chosen layers, accumulated in float64 by forward pre-hooks.
- :func:`gpm_update`: the basis update of GPM (Saha, Garg & Roy, "Gradient Projection Memory for Continual
  Learning", ICLR 2021). The energy of a direction is its share of ``||X||_F^2 = trace(C)``; the eigenvalues of
  ``C`` are the squared singular values of the representation matrix ``X`` of the paper, so everything is done on
  ``C`` (d x d) instead of ``X`` (d x n). Task 1: the smallest k whose top-k eigenvalues reach
  ``threshold * trace(C)`` (paper Eq. 5; the authors' code keeps one direction fewer). Later tasks: the basis
  ``U`` already captures ``trace(U^T C U)``; the fewest top eigenvectors of ``(I-UU^T) C (I-UU^T)`` are added
  until the captured energy reaches ``threshold * trace(C)`` (Eq. 8-9).
- :class:`DualGPM`: the memory of InfLoRA (Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for
  Continual Learning", CVPR 2024; ``update_DualGPM`` of github.com/liangyanshuo/InfLoRA): the same criterion,
  but once the old tasks' space M has more than d/2 dimensions its orthogonal complement is stored instead,
  and later updates remove directions from the complement.
- :func:`gpm_threshold` / :func:`inflora_threshold`: the two papers' threshold schedules.

Written for this package: peft has no notion of input subspaces or gradient projection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial

import torch
from torch import nn

from .config import check_positive_int, check_threshold

_TOL = 1e-10  # relative energy below which a direction counts as empty


def gpm_threshold(threshold: float, increment: float, task: int) -> float:
    """GPM's schedule ``min(1, threshold + increment * task)`` (task from 0; CIFAR-100: 0.97 + 0.003 t)."""
    check_threshold("threshold", threshold)
    if not increment >= 0:
        raise ValueError(f"threshold_increment must be >= 0, got {increment}")
    return min(1.0, threshold + increment * task)


def inflora_threshold(start: float, end: float, task: int, total_tasks: int) -> float:
    """InfLoRA's schedule ``start + (end - start) * task / total_tasks`` (their ``lamb``, ``lame``; task from 0).

    Tasks beyond ``total_tasks`` keep ``end``.
    """
    check_threshold("threshold", start)
    check_threshold("threshold_end", end)
    check_positive_int("total_tasks", total_tasks)
    return start + (end - start) * min(task, total_tasks) / total_tasks


# -- input covariances -------------------------------------------------------------------------------------
class InputCovariance:
    """Accumulate ``sum x x^T`` (float64) and the token count of the inputs of ``modules``.

    For a peft LoRA layer the hook sits on its ``base_layer`` (the layer input, before any adapter). Inputs of
    shape ``[..., d]`` count every leading index as one sample. Use as a context manager or ``start()``/``stop()``.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {n: 0 for n in self.modules}
        self._handles: list = []

    def _hook(self, name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        xx = x.T @ x
        self.sums[name] = self.sums[name] + xx if name in self.sums else xx
        self.counts[name] += x.shape[0]

    def start(self) -> InputCovariance:
        if self._handles:
            raise RuntimeError("InputCovariance already started")
        for name, module in self.modules.items():
            base = getattr(module, "base_layer", None)
            target = base if isinstance(base, nn.Module) else module
            self._handles.append(target.register_forward_pre_hook(partial(self._hook, name)))
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> InputCovariance:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def covariances(self) -> dict[str, torch.Tensor]:
        """``sum x x^T / count`` per module (CPU, float64)."""
        missing = [n for n, c in self.counts.items() if c == 0]
        if missing:
            raise RuntimeError(f"no input reached modules {missing[:4]}")
        return {n: (self.sums[n] / self.counts[n]).cpu() for n in self.modules}


def collect_covariances(model: nn.Module, module_names: Iterable[str], inputs: Iterable) -> dict[str, torch.Tensor]:
    """Input covariances of ``module_names`` over the batches ``inputs`` (eval mode, no grad; mode restored)."""
    from .learner import run_model  # lazy: keeps this module free of peft

    stats = InputCovariance({n: model.get_submodule(n) for n in module_names})
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), stats:
            for batch in inputs:
                run_model(model, batch)
    finally:
        model.train(training)
    return stats.covariances()


# -- GPM -----------------------------------------------------------------------------------------------------
def _symmetric(cov: torch.Tensor) -> torch.Tensor:
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be a square matrix, got shape {tuple(cov.shape)}")
    cov = cov.detach().to(torch.float64)
    return (cov + cov.T) / 2


def eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0, descending) and eigenvectors (columns) of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0).clamp_min(0), vectors.flip(1)


def directions_needed(values: torch.Tensor, needed: float, total: float) -> int:
    """Fewest leading ``values`` (descending energies) whose sum reaches ``needed`` (tolerance ``1e-10 total``)."""
    tol = _TOL * total
    if needed <= tol:
        return 0
    available = int((values > tol).sum())
    k = int((values.cumsum(0) < needed - tol).sum()) + 1
    return min(k, available)


def complement(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (d x (d-k)) of the orthogonal complement of the orthonormal ``basis`` (d x k)."""
    q = torch.linalg.qr(basis, mode="complete").Q
    return q[:, basis.shape[1]:]


def gpm_update(cov: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """GPM: extend the orthonormal ``basis`` (d x k, or None) so that it captures ``threshold`` of the energy.

    Returns an orthonormal float64 basis whose first k columns are ``basis`` (unchanged if it already captures
    enough).
    """
    check_threshold("threshold", threshold)
    c = _symmetric(cov)
    d = c.shape[0]
    u = torch.zeros(d, 0, dtype=torch.float64) if basis is None else basis.detach().to(torch.float64).cpu()
    if u.shape[0] != d:
        raise ValueError(f"basis has dimension {u.shape[0]}, the covariance {d}")
    c = c.cpu()
    total = float(torch.trace(c))
    if total <= 0:
        return u
    captured = float(torch.trace(u.T @ c @ u))
    projector = torch.eye(d, dtype=torch.float64) - u @ u.T
    values, vectors = eigh_descending(projector @ c @ projector)
    k = min(directions_needed(values, threshold * total - captured, total), d - u.shape[1])
    if k == 0:
        return u
    new = vectors[:, :k]
    new = torch.linalg.qr(new - u @ (u.T @ new)).Q  # exact orthogonality to u despite rounding
    return torch.cat([u, new], dim=1)


def project_rows(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``matrix - matrix U U^T``: the rows of ``matrix`` (.. x d) without their part in span(U) (d x k); half-
    precision inputs are projected in fp32 and cast back."""
    if matrix.dtype in (torch.float16, torch.bfloat16):
        return project_rows(matrix.float(), basis).to(matrix.dtype)
    u = basis.to(device=matrix.device, dtype=matrix.dtype)
    return matrix - (matrix @ u) @ u.T


class DualGPM:
    """The old tasks' input space M of one layer (d-dimensional inputs), as stored by InfLoRA.

    ``stored`` holds an orthonormal basis of M while dim M <= d/2 and of its orthogonal complement afterwards
    (``retain``), so the stored matrix never has more than d/2 columns. Both modes apply the GPM criterion:
    after a task, M gains the fewest directions for ``trace(P_M C) >= threshold * trace(C)``.
    """

    def __init__(self, dim: int) -> None:
        check_positive_int("dim", dim)
        self.dim = dim
        self.stored = torch.zeros(dim, 0, dtype=torch.float64)
        self.retain = False  # True: ``stored`` spans the complement of M

    @property
    def rank(self) -> int:
        """dim M."""
        return self.dim - self.stored.shape[1] if self.retain else self.stored.shape[1]

    def basis(self) -> torch.Tensor:
        """An orthonormal basis of M (d x dim M), whichever way it is stored."""
        return complement(self.stored) if self.retain else self.stored

    def complement_basis(self) -> torch.Tensor:
        """An orthonormal basis of the complement of M."""
        return self.stored if self.retain else complement(self.stored)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """``x - M M^T x`` for ``x`` of shape (d,) or (d, n) (half-precision ``x``: computed in fp32)."""
        if x.dtype in (torch.float16, torch.bfloat16):
            return self.project_out(x.float()).to(x.dtype)
        s = self.stored.to(device=x.device, dtype=x.dtype)
        if self.retain:
            return s @ (s.T @ x)
        return x - s @ (s.T @ x)

    def update(self, cov: torch.Tensor, threshold: float) -> None:
        """Grow M with a task's input covariance ``cov`` (d x d) by the GPM criterion at ``threshold``."""
        check_threshold("threshold", threshold)
        c = _symmetric(cov).cpu()
        if c.shape[0] != self.dim:
            raise ValueError(f"covariance has dimension {c.shape[0]}, the memory {self.dim}")
        if not self.retain:
            self.stored = gpm_update(c, self.stored, threshold)
            if self.stored.shape[1] > self.dim / 2:
                self.stored, self.retain = complement(self.stored), True
            return
        total = float(torch.trace(c))
        if total <= 0:
            return
        n = self.stored
        inner = n.T @ c @ n  # C restricted to the complement of M (m x m)
        values, vectors = eigh_descending((inner + inner.T) / 2)
        r = directions_needed(values, threshold * total - (total - float(torch.trace(inner))), total)
        self.stored = n @ vectors[:, r:]  # the complement loses the r directions that M gains

    def state(self) -> dict[str, torch.Tensor]:
        return {"stored": self.stored.contiguous(), "retain": torch.tensor([int(self.retain)])}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> DualGPM:
        stored = state["stored"].to(torch.float64)
        memory = cls(stored.shape[0])
        memory.stored, memory.retain = stored.clone(), bool(int(state["retain"][0]))
        return memory
