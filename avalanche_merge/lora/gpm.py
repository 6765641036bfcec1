"""Gradient Projection Memory (Saha, Garg & Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021),
on LoRA adapters (``"gpm_lora"``) and on the full weights of the target layers (``"gpm"``).

After each task, every target layer keeps an orthonormal basis U of its old tasks' inputs (the GPM energy
criterion at ``min(1, threshold + threshold_increment * t)``; CIFAR-100 in the paper: 0.97 + 0.003 t, see
:func:`~avalanche_merge.lora.subspace.gpm_update`). While a later task trains, the gradient of the protected
weight is projected, ``g <- g - g U U^T``, so the update ``delta W`` satisfies ``delta W U = 0`` and the layer's
outputs on old inputs do not change (up to the energy left outside U).

- :class:`GPMLoRA`: a new peft adapter per task; its ``lora_A`` starts projected off U and its gradient is
  projected (``B A x = 0`` for old x); ``lora_B`` is free. The earlier adapters are frozen.
- :class:`GPMFineTune`: no adapters; the target layers' weights train with projected gradients, their biases
  stay frozen (the paper's networks have no biases in the projected layers; a bias update would shift every
  old output), the head trains freely.

The paper uses plain SGD, for which the projected gradient keeps every step in the allowed set. Adaptive
optimizers (Adam, AdamW's decay) rescale the gradient per entry and leave it, so the constrained quantity
(``A`` for ``gpm_lora``; ``W - W_start`` for ``gpm``) is also projected back right after every optimizer step
(``after_step``; a no-op for SGD), so that the model satisfies the constraint whenever it is used, mid-task
evaluations included. (Until issue 13 it was projected back before the next step's gradient projection, which
left up to 34% of an Adam update in the protected subspace between steps.) Written for this package: peft has no
gradient projection or input memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import check_range
from .config import LoRAConfig, check_threshold
from .learner import ContinualLoRA
from .registry import register_learner
from .subspace import collect_covariances, gpm_threshold, gpm_update, project_rows


@dataclass(kw_only=True)
class GPMConfig(LoRAConfig):
    """GPM options (the paper's thresholds for CIFAR-100; the adapted layers are our choice: the paper's networks
    (AlexNet, ResNet-18) protect every layer, it has no ViT protocol; rank 4 on q, k and v as before issue 13).

    Args:
        threshold: energy threshold after the first task, in (0, 1].
        threshold_increment: added to the threshold per task (capped at 1), >= 0.
    """

    rank: int = 4
    target_modules: tuple[str, ...] = ("q", "k", "v")
    threshold: float = 0.97
    threshold_increment: float = 0.003

    def __post_init__(self) -> None:
        super().__post_init__()
        check_threshold("threshold", self.threshold)
        check_range("threshold_increment", self.threshold_increment, 0.0)


class _GPMMemory(ContinualLoRA):
    """Per-layer input bases, their update after a task and their save / load (shared by both learners)."""

    config_cls = GPMConfig
    needs_inputs = True
    conv_targets = False  # input subspaces of nn.Linear layers

    def __init__(self, model: nn.Module, *, config: GPMConfig | None = None) -> None:
        super().__init__(model, config=config)
        self.bases: dict[str, torch.Tensor] = {}  # layer -> orthonormal U (d_in x k), float64, CPU
        self._cast: dict[tuple, torch.Tensor] = {}

    def threshold(self, task: int) -> float:
        cfg: GPMConfig = self.config
        return gpm_threshold(cfg.threshold, cfg.threshold_increment, task)

    def basis_like(self, layer: str, ref: torch.Tensor) -> torch.Tensor | None:
        """Layer's basis in ``ref``'s dtype and device (cached), or None when it has none."""
        basis = self.bases.get(layer)
        if basis is None or basis.shape[1] == 0:
            return None
        key = (layer, ref.dtype, ref.device)
        if key not in self._cast:
            self._cast[key] = basis.to(dtype=ref.dtype, device=ref.device)
        return self._cast[key]

    def _finish_task(self, inputs: Iterable | None) -> None:
        self._enforce()
        covs = collect_covariances(self.model, self.targets, inputs)
        threshold = self.threshold(self.task)
        for name, cov in covs.items():
            self.bases[name] = gpm_update(cov, self.bases.get(name), threshold)
        self._cast.clear()

    def _enforce(self) -> None:
        """Project the constrained weights back into the allowed set (undoes what an adaptive optimizer added)."""

    def after_step(self) -> None:
        """Restore the constraint right after the optimizer step (Adam/AdamW leave the projected gradient)."""
        self._enforce()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"basis::{layer}": u.contiguous() for layer, u in self.bases.items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        bases = {}
        for key, value in state.items():
            kind, _, layer = key.partition("::")
            if kind != "basis" or layer not in self.targets:
                raise ValueError(f"{type(self).__name__} state has unexpected key {key!r} "
                                 f"(targets: {self.targets[:4]})")
            bases[layer] = value.to(torch.float64).clone()
        self.bases = bases
        self._cast.clear()


@register_learner
class GPMLoRA(_GPMMemory):
    """GPM on LoRA (Saha et al., ICLR 2021): per-task adapters whose A gradient is projected off old inputs."""

    name = "gpm_lora"
    per_task = True

    def _a_weights(self) -> dict[str, torch.Tensor]:
        new = self.adapters[-1]
        return {n: layer.lora_A[new].weight for n, layer in self.layers().items() if new in layer.lora_A}

    def _setup_task(self, inputs: Iterable | None) -> None:
        self._enforce()  # the new A (Kaiming init) starts off the old input space

    def _enforce(self) -> None:
        with torch.no_grad():
            for name, a in self._a_weights().items():
                u = self.basis_like(name, a)
                if u is not None:
                    a.copy_(project_rows(a, u))

    def after_backward(self) -> None:
        for name, a in self._a_weights().items():
            u = self.basis_like(name, a)
            if u is not None and a.grad is not None:
                a.grad.copy_(project_rows(a.grad, u))


@register_learner
class GPMFineTune(_GPMMemory):
    """GPM (Saha et al., ICLR 2021): the target layers' weights train with gradients projected off old inputs."""

    name = "gpm"

    def __init__(self, model: nn.Module, *, config: GPMConfig | None = None) -> None:
        super().__init__(model, config=config)
        self._start: dict[str, torch.Tensor] = {}  # weights at the start of the task

    def _weights(self) -> dict[str, nn.Parameter]:
        return {n: self.model.get_submodule(n).weight for n in self.targets}

    def begin_task(self, inputs: Iterable | None = None) -> list[nn.Parameter]:
        """Start the next task: no adapter; the target weights (not biases) and the head become trainable."""
        if self.needs_inputs and inputs is None:
            raise ValueError(f"{type(self).__name__}.begin_task needs the new task's inputs")
        self.task += 1
        self._start = {n: w.detach().clone() for n, w in self._weights().items()}
        self._activate()
        return self.trainable_parameters()

    def _activate(self) -> None:
        self.model.requires_grad_(False)
        for weight in self._weights().values():
            weight.requires_grad_(True)
        if self.head_name:
            self.model.get_submodule(self.head_name).requires_grad_(True)

    def _enforce(self) -> None:
        with torch.no_grad():
            for name, w in self._weights().items():
                u = self.basis_like(name, w)
                if u is not None and name in self._start:
                    start = self._start[name]
                    w.copy_(start + project_rows(w - start, u))

    def after_backward(self) -> None:
        for name, w in self._weights().items():
            u = self.basis_like(name, w)
            if u is not None and w.grad is not None:
                w.grad.copy_(project_rows(w.grad, u))

    def extra_state(self) -> dict[str, torch.Tensor]:
        weights = {f"weight::{n}": w.detach().clone().contiguous() for n, w in self._weights().items()}
        return super().extra_state() | weights

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k: v for k, v in state.items() if k.startswith("weight::")}
        super().load_extra_state({k: v for k, v in state.items() if k not in weights})
        own = self._weights()
        if set(weights) != {f"weight::{n}" for n in own}:
            raise ValueError(f"GPM state holds weights {sorted(weights)[:4]}, the targets are {sorted(own)[:4]}")
        with torch.no_grad():
            for name, w in own.items():
                w.copy_(weights[f"weight::{name}"])
