"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024; github.com/liangyanshuo/InfLoRA).

Each task t gets a new LoRA adapter whose down-projection ``A_t`` (peft's ``lora_A``, r x d_in) is fixed before
training and never trained: its rows are the top-r eigenvectors of the new task's input covariance with the old
tasks' input space M removed, ``(I - MM^T) C_t (I - MM^T)`` (the paper's left singular vectors of
``(I - MM^T) H_t``). Only ``B_t`` (zero init) and the head train, so ``delta W_t x = B_t A_t x`` is ~0 for inputs
x of old tasks (they lie in M, and ``A_t M = 0``). After the task, M grows by DualGPM
(:class:`~avalanche_merge.lora.subspace.DualGPM`) with the threshold ``lamb + (lame - lamb) * t / T``.

Paper and code differ in the spectrum; the default follows the authors' code, which reproduces the published
numbers, and ``energy="eigenvalues"`` gives the paper's reading:

- ``energy="squared"`` (default; ``update_DualGPM`` and the ``A`` initialisation of the authors' code): the code
  runs its SVD on the covariance ``C`` itself, so DualGPM's energy is measured on the *squared* eigenvalues of
  ``C`` and ``A`` takes the top left singular vectors of ``(I - MM^T) C``, i.e. the eigenvectors of
  ``P C^2 P``. Both are the paper's formulas applied to ``C^2`` instead of ``C``, which is how we compute them.
  At the same threshold it keeps far fewer directions in M (issue 13: 3-9 of 64 instead of 16-33 on TinyViT),
  so the new adapter sees more of its inputs' energy.
- ``energy="eigenvalues"`` (the paper: SVD of the input matrix ``H``, whose squared singular values are the
  eigenvalues of ``C``): the DualGPM/GPM criterion on the eigenvalues of ``C``, ``A`` from ``P C P``.

The threshold schedule is the code's ``lamb + (lame - lamb) * t / T`` with ``t`` the 0-based index of the task
just trained and ``T`` = ``total_tasks``, which is taken from the stream when not given (a value smaller than
the stream is an error: the schedule would end early). ``A`` is scaled by ``a_scale`` (the code's ``1/sqrt(3)``;
1 gives orthonormal rows). Rows of ``A`` that would have to lie in M (fewer than r free directions) are set to
zero. The code's first-task count keeps one direction fewer than the smallest count that reaches the threshold
(GPM's loop); we keep the smallest count that reaches it (the paper's Eq. 5), as in
:func:`~avalanche_merge.lora.subspace.gpm_update`.

Defaults are the authors' CIFAR-100 / ImageNet-R configs: rank 10 on ``k`` and ``v``, Adam at 5e-4, thresholds
0.95 -> 1.0. The head protocol is ``per_task`` (their ``classifier_pool``: one linear head per task, trained on
its classes, concatenated at test time); see :mod:`avalanche_merge.protocol`.

Written for this package: peft has no data-dependent frozen ``lora_A`` or input-subspace memory; peft only
holds the layers (see :mod:`avalanche_merge.lora.adapters`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..config import check_range
from .adapters import activate
from .config import LoRAConfig, check_positive_int, check_threshold
from .learner import ContinualLoRA
from .registry import register_learner
from .subspace import DualGPM, collect_covariances, eigh_descending, inflora_threshold

ENERGIES = ("squared", "eigenvalues")


def energy_matrix(cov: torch.Tensor, energy: str) -> torch.Tensor:
    """The matrix whose spectrum InfLoRA's criterion and initialisation use: ``C @ C`` (code) or ``C`` (paper)."""
    if energy not in ENERGIES:
        raise ValueError(f"energy must be one of {list(ENERGIES)}, got {energy!r}")
    c = cov.detach().to(torch.float64)
    c = (c + c.T) / 2
    return c @ c if energy == "squared" else c


@dataclass(kw_only=True)
class InfLoRAConfig(LoRAConfig):
    """InfLoRA options (defaults: the authors' CIFAR-100 config: rank 10 on k and v, Adam 5e-4).

    Args:
        threshold: DualGPM energy threshold after the first task (their ``lamb``), in (0, 1].
        threshold_end: the threshold the schedule approaches at task ``total_tasks`` (their ``lame``), in (0, 1].
        total_tasks: number of tasks of the schedule (their ``total_sessions``), >= 1, or ``None`` to take it
            from the stream (the Avalanche plugin does; in your own loop call ``set_stream_length``). A task
            beyond it raises an error.
        energy: ``"squared"`` (the authors' code: DualGPM energy and ``A`` on the squared spectrum of the input
            covariance) or ``"eigenvalues"`` (the paper's text).
        a_scale: factor on the orthonormal rows of ``A`` (the code's ``1/sqrt(3)``), > 0.
    """

    rank: int = 10
    target_modules: tuple[str, ...] = ("k", "v")
    lr: float | None = 5e-4
    threshold: float = 0.95
    threshold_end: float = 1.0
    total_tasks: int | None = None
    energy: str = "squared"
    a_scale: float = 1 / math.sqrt(3)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_threshold("threshold", self.threshold)
        check_threshold("threshold_end", self.threshold_end)
        if self.total_tasks is not None:
            check_positive_int("total_tasks", self.total_tasks)
        if self.energy not in ENERGIES:
            raise ValueError(f"energy must be one of {list(ENERGIES)}, got {self.energy!r}")
        check_range("a_scale", self.a_scale, 0.0, None, low_open=True)


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
    conv_targets = False  # input subspaces of nn.Linear layers

    def __init__(self, model, *, config: InfLoRAConfig | None = None) -> None:
        super().__init__(model, config=config)
        self.memory: dict[str, DualGPM] = {}
        self.total_tasks: int | None = self.config.total_tasks

    def set_stream_length(self, n_tasks: int) -> None:
        """Take the schedule's ``total_tasks`` from the stream; a configured value smaller than it is an error."""
        check_positive_int("n_tasks", n_tasks)
        if self.config.total_tasks is None:
            self.total_tasks = n_tasks
        elif self.config.total_tasks < n_tasks:
            raise ValueError(f"total_tasks={self.config.total_tasks} is smaller than the stream's {n_tasks} "
                             f"experiences: InfLoRA's threshold schedule would end early (omit total_tasks to take "
                             f"it from the stream)")

    def _setup_task(self, inputs: Iterable | None) -> None:
        if self.total_tasks is not None and self.task >= self.total_tasks:
            raise ValueError(f"task {self.task} is beyond total_tasks={self.total_tasks} of InfLoRA's threshold "
                             f"schedule")
        activate(self.model, self.adapters)  # inputs through the earlier adapters (the new B is zero)
        covs = collect_covariances(self.model, self.targets, inputs)
        new = self.adapters[-1]
        layers = self.layers()
        with torch.no_grad():
            for name, cov in covs.items():
                weight = layers[name].lora_A[new].weight
                a = subspace_init(energy_matrix(cov, self.config.energy), self.memory.get(name), weight.shape[0])
                weight.copy_((self.config.a_scale * a).to(dtype=weight.dtype, device=weight.device))

    def _activate(self) -> None:
        super()._activate()
        for layer in self.layers().values():
            for name in layer.lora_A:
                if name in self.adapters:  # not a user's own peft adapter
                    layer.lora_A[name].requires_grad_(False)  # A is fixed by the data; only B trains

    def threshold(self, task: int) -> float:
        """The DualGPM threshold applied after task ``task`` (0-based): ``lamb + (lame - lamb) * task / T``."""
        cfg: InfLoRAConfig = self.config
        if self.total_tasks is None:
            raise ValueError("InfLoRA's threshold schedule needs total_tasks: set it in the config or call "
                             "set_stream_length(n) before the first task")
        return inflora_threshold(cfg.threshold, cfg.threshold_end, task, self.total_tasks)

    def _finish_task(self, inputs: Iterable | None) -> None:
        covs = collect_covariances(self.model, self.targets, inputs)
        threshold = self.threshold(self.task)
        for name, cov in covs.items():
            self.memory.setdefault(name, DualGPM(cov.shape[0])).update(energy_matrix(cov, self.config.energy),
                                                                       threshold)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"{layer}::{k}": v for layer, m in self.memory.items() for k, v in m.state().items()}
        if self.total_tasks is not None:
            state["total_tasks"] = torch.tensor([self.total_tasks], dtype=torch.int64)
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        state = dict(state)
        total = state.pop("total_tasks", None)
        self.total_tasks = self.config.total_tasks if total is None else int(total[0])
        for key, value in state.items():
            layer, _, part = key.rpartition("::")
            if layer not in self.targets or part not in ("stored", "retain"):
                raise ValueError(f"InfLoRA state has unexpected key {key!r} (targets: {self.targets[:4]})")
            grouped.setdefault(layer, {})[part] = value
        self.memory = {layer: DualGPM.from_state(parts) for layer, parts in grouped.items()}
