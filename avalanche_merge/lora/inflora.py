"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024; github.com/liangyanshuo/InfLoRA).

Each task t gets a new LoRA adapter whose down-projection ``A_t`` (peft's ``lora_A``, r x d_in) is fixed before
training and never trained: its rows are the top-r eigenvectors of the new task's input covariance with the old
tasks' input space M removed, ``(I - MM^T) C_t (I - MM^T)`` (the paper's left singular vectors of
``(I - MM^T) H_t``). Only ``B_t`` (zero init) and the head train, so ``delta W_t x = B_t A_t x`` is ~0 for inputs
x of old tasks (they lie in M, and ``A_t M = 0``). After the task, M grows by DualGPM
(:class:`~avalanche_merge.lora.subspace.DualGPM`) with the threshold ``lamb + (lame - lamb) * t / T``.

Differences from the authors' code, on purpose: their code runs the SVD of the covariance C itself rather than
of the input matrix H, so both the initialisation and the energy criterion see the squared spectrum of C; we
follow the paper (spectrum of C = squared singular values of H). They scale ``A`` by ``1/sqrt(3)``; we keep
orthonormal rows. Rows of ``A`` that would have to lie in M (fewer than r free directions) are set to zero.

Written for this package: peft has no data-dependent frozen ``lora_A`` or input-subspace memory; peft only
holds the layers (see :mod:`avalanche_merge.lora.adapters`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .adapters import activate
from .config import LoRAConfig, check_positive_int, check_threshold
from .learner import ContinualLoRA
from .registry import register_learner
from .subspace import DualGPM, collect_covariances, eigh_descending, inflora_threshold


@dataclass(kw_only=True)
class InfLoRAConfig(LoRAConfig):
    """InfLoRA options (defaults: the authors' CIFAR-100 config).

    Args:
        threshold: DualGPM energy threshold after the first task (their ``lamb``), in (0, 1].
        threshold_end: the threshold the schedule approaches at task ``total_tasks`` (their ``lame``), in (0, 1].
        total_tasks: number of tasks of the schedule (their ``total_sessions``), >= 1; later tasks use
            ``threshold_end``.
    """

    threshold: float = 0.95
    threshold_end: float = 1.0
    total_tasks: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_threshold("threshold", self.threshold)
        check_threshold("threshold_end", self.threshold_end)
        check_positive_int("total_tasks", self.total_tasks)


def subspace_init(cov: torch.Tensor, memory: DualGPM | None, rank: int) -> torch.Tensor:
    """InfLoRA's ``A`` (rank x d, float64): top eigenvectors of ``cov`` projected off the memory's space M.

    A small multiple of the complement projector is added before the eigendecomposition so that directions of
    the complement with no energy still rank above M; rows that can only come from M are zero.
    """
    d = cov.shape[0]
    c = cov.detach().to(torch.float64).cpu()
    c = (c + c.T) / 2
    eye = torch.eye(d, dtype=torch.float64)
    projector = eye if memory is None else memory.project_out(eye)
    projected = projector @ c @ projector
    eps = 1e-9 * max(float(torch.linalg.matrix_norm(c, ord=2)), 1e-30)
    values, vectors = eigh_descending(projected + eps * projector)
    a = vectors[:, :rank].T.clone()
    a[values[:rank] < eps / 2] = 0  # only M left: a zero row cannot interfere
    if a.shape[0] < rank:  # rank > d
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], d)])
    return a


@register_learner
class InfLoRA(ContinualLoRA):
    """InfLoRA (Liang & Li, CVPR 2024): per-task adapters with a frozen A outside the old tasks' input space."""

    name = "inflora"
    config_cls = InfLoRAConfig
    per_task = True
    needs_inputs = True

    def __init__(self, model, *, config: InfLoRAConfig | None = None) -> None:
        super().__init__(model, config=config)
        self.memory: dict[str, DualGPM] = {}

    def _setup_task(self, inputs: Iterable | None) -> None:
        activate(self.model, self.adapters)  # inputs through the earlier adapters (the new B is zero)
        covs = collect_covariances(self.model, self.targets, inputs)
        new = self.adapters[-1]
        layers = self.layers()
        with torch.no_grad():
            for name, cov in covs.items():
                weight = layers[name].lora_A[new].weight
                a = subspace_init(cov, self.memory.get(name), weight.shape[0])
                weight.copy_(a.to(dtype=weight.dtype, device=weight.device))

    def _activate(self) -> None:
        super()._activate()
        for layer in self.layers().values():
            for name in layer.lora_A:
                layer.lora_A[name].requires_grad_(False)  # A is fixed by the data; only B trains

    def threshold(self, task: int) -> float:
        cfg: InfLoRAConfig = self.config
        return inflora_threshold(cfg.threshold, cfg.threshold_end, task, cfg.total_tasks)

    def _finish_task(self, inputs: Iterable | None) -> None:
        covs = collect_covariances(self.model, self.targets, inputs)
        threshold = self.threshold(self.task)
        for name, cov in covs.items():
            self.memory.setdefault(name, DualGPM(cov.shape[0])).update(cov, threshold)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"{layer}::{k}": v for layer, m in self.memory.items() for k, v in m.state().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            layer, _, part = key.rpartition("::")
            if layer not in self.targets or part not in ("stored", "retain"):
                raise ValueError(f"InfLoRA state has unexpected key {key!r} (targets: {self.targets[:4]})")
            grouped.setdefault(layer, {})[part] = value
        self.memory = {layer: DualGPM.from_state(parts) for layer, parts in grouped.items()}
