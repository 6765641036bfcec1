"""SD-LoRA: scalable decoupled low-rank adaptation (Wu et al., "SD-LoRA: Scalable Decoupled Low-Rank Adaptation
for Class Incremental Learning", ICLR 2025, arXiv 2501.13198; reference code: github.com/WuYichen-97/SD-Lora-CL).

Every task adds a LoRA component; each finished component keeps its *direction* and learns only its *magnitude*:

    W = W0 + sum_{i<t} alpha_i * (B_i A_i) / ||B_i A_i||_F  +  alpha_t * s * B_t A_t

- earlier directions ``B_i A_i`` (``i < t``) are frozen and normalised to unit Frobenius norm;
- all magnitudes ``alpha_i``, old ones included, are trained on the current task, with ``A_t`` and ``B_t``;
- the current component is *not* normalised while it trains (``s = alpha / rank`` is peft's scaling). The paper
  writes every component normalised, but its code multiplies the raw ``B_t A_t`` by a learnable ``alpha_t`` (init
  0.8) and normalises a component only once it is frozen; we follow the code (peft starts ``B_t`` at zero, where
  ``B_t A_t / ||B_t A_t||`` is 0/0). At ``end_task`` the direction is normalised (and frozen from the next
  ``begin_task`` on) and its magnitude becomes ``alpha_t * ||s B_t A_t||_F``: the trained model is unchanged (up to
  rounding). The code instead rebuilds the model each task with every old magnitude reset to 0.8; we keep the
  learned ones so that nothing jumps between tasks. The code divides by ``||B||_F ||A||_F``; we use the paper's
  ``||B A||_F`` (exact unit norm).

Magnitudes are per component *and per layer*: the norm differs per layer, and carrying a trained component over
unchanged needs one value per layer (the code shares one scalar per component across layers). The variants
SD-LoRA-RR (rank reduction) and SD-LoRA-KD are not implemented.

peft cannot express a learnable per-adapter magnitude or a normalised ``B A`` (its ``scaling`` is a plain float,
and DoRA normalises ``W0 + B A`` column-wise for one adapter). We keep peft's layers and forward and
reparametrise each adapter's ``lora_B.weight`` with :mod:`torch.nn.utils.parametrize` as
``B_eff = magnitude * B * inv_norm``, where ``inv_norm`` is ``1 / ||s B A||_F`` of the frozen direction (computed
once: ``A`` and ``B`` never change again) or 1 for the training component. peft's forward, merge and
:func:`~avalanche_merge.lora.adapters.delta_weight` thus see the effective update; the raw ``A``/``B`` stay
bit-identical, and ``save``/``load`` write the raw ``B`` plus the magnitudes (``extra_state``). torch cannot pickle
a parametrized model whole (``torch.save(model)``): use ``learner.save`` or the ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import check_range
from .config import LoRAConfig
from .learner import ContinualLoRA
from .registry import register_learner


class Magnitude(nn.Module):
    """Parametrization ``B -> magnitude * B * inv_norm`` of a peft ``lora_B`` weight (``magnitude`` learnable)."""

    def __init__(self, magnitude: float, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.magnitude = nn.Parameter(torch.tensor(float(magnitude), dtype=dtype, device=device))
        self.register_buffer("inv_norm", torch.ones((), dtype=dtype, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (self.magnitude * self.inv_norm)


@dataclass(kw_only=True)
class SDLoRAConfig(LoRAConfig):
    """SD-LoRA options.

    Args:
        magnitude_init: initial magnitude ``alpha_t`` of each new (unnormalised) component; finite and > 0 (0 would
            block the gradient of ``B_t``). The reference code uses 0.8.
    """

    magnitude_init: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("magnitude_init", self.magnitude_init, 0.0, None, low_open=True)
        if not math.isfinite(self.magnitude_init):
            raise ValueError(f"magnitude_init must be finite, got {self.magnitude_init}")


@register_learner
class SDLoRA(ContinualLoRA):
    """SD-LoRA learner: frozen normalised directions with learnable magnitudes, plus a new LoRA per task."""

    name = "sdlora"
    config_cls = SDLoRAConfig
    per_task = True

    def __init__(self, model: nn.Module, *, config: SDLoRAConfig | None = None) -> None:
        super().__init__(model, config=config)
        self._magnitudes: dict[str, dict[str, Magnitude]] = {}  # adapter -> layer name -> parametrization
        self.frozen = 0  # adapters[:frozen] have frozen, normalised directions

    # -- hooks ---------------------------------------------------------------------------------------------
    def _setup_task(self, inputs: Iterable | None) -> None:
        name = self.adapters[-1]
        self._magnitudes[name] = {}
        for layer_name, layer in self.layers().items():
            if name in layer.lora_B:
                weight = layer.lora_B[name].weight
                module = Magnitude(self.config.magnitude_init, dtype=weight.dtype, device=weight.device)
                parametrize.register_parametrization(layer.lora_B[name], "weight", module)
                self._magnitudes[name][layer_name] = module

    def _finish_task(self, inputs: Iterable | None) -> None:
        """Normalise the finished directions (unit Frobenius norm); their magnitudes absorb the norms."""
        layers = self.layers()
        with torch.no_grad():
            for name in self.adapters[self.frozen:]:
                for layer_name, module in self._magnitudes[name].items():
                    norm = direction_norm(layers[layer_name], name)
                    if norm > 0:  # a component that stayed zero contributes nothing either way
                        module.magnitude.mul_(norm)
                        module.inv_norm.fill_(1.0 / norm)
        self.frozen = len(self.adapters)
        # requires_grad of the finished A/B is cleared by the next begin_task (as in the other learners, whose
        # last adapter stays trainable until then, so that the runner's trained-parameter count compares): the
        # stored norm assumes that nothing trains them after end_task

    def trainable_adapters(self) -> list[str]:
        """The adapters whose A and B train: the current task's (none after ``end_task``)."""
        return self.adapters[self.frozen:]

    def _activate(self) -> None:
        super()._activate()  # sets requires_grad of everything under lora_B, magnitudes included
        for module in self._all_magnitudes():
            module.magnitude.requires_grad_(True)

    # -- inspection ----------------------------------------------------------------------------------------
    def magnitudes(self) -> dict[str, dict[str, float]]:
        """``{adapter: {layer: alpha}}``: the current magnitudes (for frozen adapters, of unit-norm directions)."""
        return {a: {n: m.magnitude.item() for n, m in layers.items()} for a, layers in self._magnitudes.items()}

    def _all_magnitudes(self) -> Iterator[Magnitude]:
        for layers in self._magnitudes.values():
            yield from layers.values()

    # -- save / load ---------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {"frozen": torch.tensor(self.frozen, dtype=torch.int64)}
        for name, layers in self._magnitudes.items():
            for layer_name, module in layers.items():
                state[f"{name}::{layer_name}.magnitude"] = module.magnitude.detach().clone()
                state[f"{name}::{layer_name}.inv_norm"] = module.inv_norm.detach().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        layers = self.layers()
        expected = {"frozen"} | {f"{a}::{n}.{part}" for a in self.adapters for n, layer in layers.items()
                                 if a in layer.lora_B for part in ("magnitude", "inv_norm")}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"SD-LoRA state does not match the model (missing {missing[:4]}, unexpected {extra[:4]})")
        for name in self.adapters:
            modules = self._magnitudes.setdefault(name, {})
            for layer_name, layer in layers.items():
                if name not in layer.lora_B:
                    continue
                weight = layer.lora_B[name].weight
                module = modules.setdefault(layer_name, Magnitude(0.0, dtype=weight.dtype, device=weight.device))
                with torch.no_grad():
                    module.magnitude.copy_(state[f"{name}::{layer_name}.magnitude"])
                    module.inv_norm.copy_(state[f"{name}::{layer_name}.inv_norm"])
        self.frozen = int(state["frozen"])

    def save(self, path: str | Path) -> None:
        """As :meth:`ContinualLoRA.save`, with the raw ``B`` (not ``B_eff``) and the magnitudes."""
        with self._bare_weights():
            super().save(path)

    def load(self, path: str | Path) -> None:
        with self._bare_weights():
            super().load(path)

    @contextmanager
    def _bare_weights(self) -> Iterator[None]:
        """Lift the parametrizations (same parameter objects) so that peft's ``lora_B.weight`` is the raw B."""
        layers = self.layers()
        for name, modules in self._magnitudes.items():
            for layer_name in modules:
                parametrize.remove_parametrizations(layers[layer_name].lora_B[name], "weight",
                                                    leave_parametrized=False)
        try:
            yield
        finally:
            layers = self.layers()
            for name, modules in self._magnitudes.items():
                for layer_name, module in modules.items():
                    parametrize.register_parametrization(layers[layer_name].lora_B[name], "weight", module)


def raw_weights(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s raw ``A`` and ``B`` in a peft layer (``B`` before the SD-LoRA parametrization)."""
    b = layer.lora_B[name]
    raw_b = b.parametrizations.weight.original if parametrize.is_parametrized(b, "weight") else b.weight
    return layer.lora_A[name].weight, raw_b


def direction_norm(layer: nn.Module, name: str) -> float:
    """``||s B A||_F`` of adapter ``name`` in ``layer`` (raw weights, peft scaling ``s``)."""
    a, b = raw_weights(layer, name)
    return float(torch.linalg.matrix_norm(layer.scaling[name] * (b @ a)))
