"""SD-LoRA: scalable decoupled low-rank adaptation (Wu et al., "SD-LoRA: Scalable Decoupled Low-Rank Adaptation
for Class Incremental Learning", ICLR 2025, arXiv 2501.13198; reference code: github.com/WuYichen-97/SD-Lora-CL,
``backbone/lora.py`` and ``models/sdlora.py``).

Every task adds a LoRA component; each finished component keeps its *direction* (``A_i``, ``B_i`` frozen) and
learns only its *magnitude*. By default the learner runs as the reference code does:

    W = W0 + sum_{i<t} alpha_i * s B_i A_i / (||s B_i||_F ||A_i||_F)  +  alpha_t * s B_t A_t

- ``magnitudes="component"``: one learnable scalar ``alpha_i`` per component (task), shared by *every* adapted
  layer (the same :class:`~torch.nn.Parameter` sits in each layer's parametrization, so ``model.parameters()``
  lists it once and its gradient is the sum of the layers' contributions);
- ``norm="factors"``: a frozen component is divided, per layer, by the product of the Frobenius norms of its two
  factors. ``s = lora_alpha / rank`` is peft's scaling, which peft's forward applies to ``B A x``; we divide by
  ``||s B||_F ||A||_F``, so ``s`` cancels and a frozen component adds exactly the reference's
  ``alpha_i B_i A_i / (||B_i||_F ||A_i||_F)`` whatever ``lora_alpha``;
- the current component is *not* normalised while it trains: ``alpha_t s B_t A_t`` (the reference has no ``s``;
  with the default ``alpha=None``, ``s = 1``). ``A_t`` is Kaiming-initialised and ``B_t`` zero (peft's init),
  ``alpha_t`` starts at ``magnitude_init = 0.8``;
- every magnitude, old ones included, is trained on the current task together with ``A_t`` and ``B_t``;
- ``reset_magnitudes=True``: the reference rebuilds the model for each task and re-initialises *every* magnitude
  to 0.8, so the model at the start of task t+1 is not the model trained on task t. We do the same at
  ``begin_task``. ``end_task`` only records each finished component's per-layer norm, computed once from its
  weights as they are at the end of its own task (they never change again); it does not change the function, so
  evaluating right after a task evaluates the trained model exactly. The normalisation takes effect at the next
  ``begin_task``, together with the reset, as in the reference's rebuild (a scalar shared by all layers could not
  absorb per-layer norms anyway).

Options (defaults are the reference's):

- ``magnitudes="layer"``: one magnitude per component *and per layer*. ``end_task`` then normalises at once and
  multiplies each layer's magnitude by that layer's norm, so the function is unchanged (up to rounding);
- ``norm="product"``: divide by ``||s B_i A_i||_F``, the paper's unit-norm direction ``B A / ||B A||_F``
  (``||s B A|| <= ||s B|| ||A||``, so the same magnitude gives a larger update than with ``"factors"``);
- ``reset_magnitudes=False``: magnitudes carry over between tasks. With ``magnitudes="layer"`` nothing jumps at a
  task switch (the learner before this option); with ``magnitudes="component"`` the per-layer norms cannot be
  absorbed into the shared scalar, so the normalisation still changes the function at the next ``begin_task``
  (by the per-layer norms), but the learned magnitudes are kept.

Remaining deviations from the reference: the variants SD-LoRA-RR (rank reduction) and SD-LoRA-KD are not
implemented; the norm of a frozen component is computed once and stored, where the reference recomputes it in
every forward (equal, as its weights are frozen); the training recipe of the paper (SGD with momentum 0.9,
lr 8e-3 on CIFAR-100 / 1e-2 on ImageNet-R, 20 epochs, batch 128) belongs to the runner's configuration, not to
this learner, and so do the classifier head and the rest of the training loop. The defaults ``rank=10`` and
``target_modules=("q", "v")`` are the paper's (every block's query and value projections).

peft cannot express a learnable per-adapter magnitude or a normalised ``B A`` (its ``scaling`` is a plain float,
and DoRA normalises ``W0 + B A`` column-wise for one adapter). We keep peft's layers and forward and
reparametrise each adapter's ``lora_B.weight`` with :mod:`torch.nn.utils.parametrize` as
``B_eff = magnitude * B * inv_norm``, where ``inv_norm`` is ``1 / norm`` of the frozen direction once the
normalisation has taken effect, 1 before. peft's forward, merge and
:func:`~avalanche_merge.lora.adapters.delta_weight` thus see the effective update; the raw ``A``/``B`` stay
bit-identical, and ``save``/``load`` write the raw ``B`` plus the magnitudes (``extra_state``; a shared
magnitude is written once per component and restored as one shared parameter). torch cannot pickle a
parametrized model whole (``torch.save(model)``): use ``learner.save`` or the ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import check_choice, check_range
from .adapters import lifted_b_parametrizations
from .config import LoRAConfig
from .learner import ContinualLoRA
from .registry import register_learner

MAGNITUDES = ("component", "layer")
NORMS = ("factors", "product")


class Magnitude(nn.Module):
    """Parametrization ``B -> magnitude * B * inv_norm`` of a peft ``lora_B`` weight (``magnitude`` learnable).

    Args:
        magnitude: the initial value, or a :class:`~torch.nn.Parameter` to share (the same object is registered
            here, so that every layer of a component uses, and trains, one scalar).

    Buffers: ``inv_norm`` (the factor applied in the forward: 1 until the direction's normalisation takes effect)
    and ``norm`` (the direction's norm, recorded when its task ends; 0 before).
    """

    def __init__(self, magnitude: float | nn.Parameter, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if isinstance(magnitude, nn.Parameter):
            self.magnitude = magnitude
        else:
            self.magnitude = nn.Parameter(torch.tensor(float(magnitude), dtype=dtype, device=device))
        self.register_buffer("inv_norm", torch.ones((), dtype=dtype, device=device))
        self.register_buffer("norm", torch.zeros((), dtype=dtype, device=device))

    def factor(self) -> torch.Tensor:
        """The scalar multiplying ``B`` (read by :mod:`~avalanche_merge.lora.fold`)."""
        return self.magnitude * self.inv_norm

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.factor()


@dataclass(kw_only=True)
class SDLoRAConfig(LoRAConfig):
    """SD-LoRA options (the defaults run as the reference code; see the module docstring).

    Args:
        rank: LoRA rank; the paper's 10.
        target_modules: the paper adapts every block's query and value projections: ``("q", "v")``.
        magnitude_init: initial magnitude ``alpha_t`` of each new (unnormalised) component, and the value every
            magnitude is reset to with ``reset_magnitudes``; finite and > 0 (0 would block the gradient of
            ``B_t``). The reference code uses 0.8.
        magnitudes: ``"component"`` (one scalar per component shared by every layer, as the reference code) or
            ``"layer"`` (one per component and layer).
        norm: normaliser of a frozen component in each layer: ``"factors"`` (``||s B||_F ||A||_F``, as the
            reference code) or ``"product"`` (``||s B A||_F``, unit-norm directions as the paper writes).
        reset_magnitudes: re-initialise every magnitude, old ones included, to ``magnitude_init`` at each
            ``begin_task`` (the reference rebuilds its model so for each task); False carries them over.
    """

    rank: int = 10
    target_modules: tuple[str, ...] = ("q", "v")
    magnitude_init: float = 0.8
    magnitudes: str = "component"
    norm: str = "factors"
    reset_magnitudes: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("magnitude_init", self.magnitude_init, 0.0, None, low_open=True)  # finite: check_range
        check_choice("magnitudes", self.magnitudes, MAGNITUDES)
        check_choice("norm", self.norm, NORMS)
        if not isinstance(self.reset_magnitudes, bool):
            raise ValueError(f"reset_magnitudes must be one of [True, False], got {self.reset_magnitudes!r}")


@register_learner
class SDLoRA(ContinualLoRA):
    """SD-LoRA learner: frozen normalised directions with learnable magnitudes, plus a new LoRA per task.

    ``adapters[:frozen]`` are finished (their norms recorded, their ``A``/``B`` frozen from the next
    ``begin_task`` on); ``adapters[:normalised]`` have their normalisation in effect in the forward
    (``normalised == frozen`` after ``end_task`` with ``magnitudes="layer"``, after the next ``begin_task``
    otherwise).
    """

    name = "sdlora"
    config_cls = SDLoRAConfig
    per_task = True

    def __init__(self, model: nn.Module, *, config: SDLoRAConfig | None = None) -> None:
        super().__init__(model, config=config)
        self._magnitudes: dict[str, dict[str, Magnitude]] = {}  # adapter -> layer name -> parametrization
        self._shared: dict[str, nn.Parameter] = {}  # adapter -> its one magnitude (magnitudes="component")
        self.frozen = 0
        self.normalised = 0

    @property
    def shared(self) -> bool:
        """One magnitude per component, shared by every layer."""
        return self.config.magnitudes == "component"

    # -- hooks ---------------------------------------------------------------------------------------------
    def _setup_task(self, inputs: Iterable | None) -> None:
        self._normalise(absorb=False)  # norms recorded at end_task take effect now ("component" mode)
        if self.config.reset_magnitudes:
            with torch.no_grad():
                for p in self.magnitude_parameters():
                    p.fill_(self.config.magnitude_init)
        self._make_magnitudes(self.adapters[-1], self.config.magnitude_init, register=True)

    def _finish_task(self, inputs: Iterable | None) -> None:
        """Record the finished directions' norms; with per-layer magnitudes, normalise now (magnitudes absorb)."""
        layers = self.layers()
        with torch.no_grad():
            for name in self.adapters[self.frozen:]:
                for layer_name, module in self._magnitudes[name].items():
                    module.norm.fill_(direction_norm(layers[layer_name], name, self.config.norm))
        self.frozen = len(self.adapters)
        if not self.shared:
            self._normalise(absorb=True)
        # requires_grad of the finished A/B is cleared by the next begin_task (as in the other learners, whose
        # last adapter stays trainable until then, so that the runner's trained-parameter count compares): the
        # recorded norm assumes that nothing trains them after end_task

    def _normalise(self, *, absorb: bool) -> None:
        """Put the recorded norms of ``adapters[normalised:frozen]`` into effect (``absorb``: keep the function)."""
        with torch.no_grad():
            for name in self.adapters[self.normalised:self.frozen]:
                for module in self._magnitudes[name].values():
                    norm = float(module.norm)
                    if norm > 0:  # a component that stayed zero contributes nothing either way
                        module.inv_norm.fill_(1.0 / norm)
                        if absorb:
                            module.magnitude.mul_(norm)
        self.normalised = self.frozen

    def _make_magnitudes(self, name: str, value: float, *, register: bool) -> dict[str, Magnitude]:
        """Create adapter ``name``'s parametrizations (one shared parameter with ``magnitudes="component"``)."""
        modules: dict[str, Magnitude] = {}
        shared: nn.Parameter | None = None
        for layer_name, layer in self.layers().items():
            if name not in layer.lora_B:
                continue
            weight = layer.lora_B[name].weight
            if self.shared and shared is None:
                shared = nn.Parameter(torch.tensor(float(value), dtype=weight.dtype, device=weight.device))
            module = Magnitude(shared if shared is not None else value, dtype=weight.dtype, device=weight.device)
            if register:
                parametrize.register_parametrization(layer.lora_B[name], "weight", module)
            modules[layer_name] = module
        self._magnitudes[name] = modules
        if shared is not None:
            self._shared[name] = shared
        return modules

    def trainable_adapters(self) -> list[str]:
        """The adapters whose A and B train: the current task's (none after ``end_task``)."""
        return self.adapters[self.frozen:]

    def _activate(self) -> None:
        super()._activate()  # sets requires_grad of everything under lora_B, magnitudes included
        for p in self.magnitude_parameters():
            p.requires_grad_(True)

    # -- inspection ----------------------------------------------------------------------------------------
    def magnitudes(self) -> dict[str, dict[str, float]]:
        """``{adapter: {layer: alpha}}``: the current magnitudes (one value repeated over layers when shared)."""
        return {a: {n: m.magnitude.item() for n, m in layers.items()} for a, layers in self._magnitudes.items()}

    def magnitude_parameters(self) -> list[nn.Parameter]:
        """Every magnitude parameter, each once (one per component with ``magnitudes="component"``)."""
        seen: dict[int, nn.Parameter] = {}
        for layers in self._magnitudes.values():
            for module in layers.values():
                seen.setdefault(id(module.magnitude), module.magnitude)
        return list(seen.values())

    # -- save / load ---------------------------------------------------------------------------------------
    def _expected_keys(self) -> set[str]:
        keys = {"frozen", "normalised"}
        per_layer = ("inv_norm", "norm") if self.shared else ("magnitude", "inv_norm", "norm")
        for a in self.adapters:
            names = [n for n, layer in self.layers().items() if a in layer.lora_B]
            if self.shared and names:
                keys.add(f"{a}.magnitude")
            keys |= {f"{a}::{n}.{part}" for n in names for part in per_layer}
        return keys

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {"frozen": torch.tensor(self.frozen, dtype=torch.int64),
                 "normalised": torch.tensor(self.normalised, dtype=torch.int64)}
        for name, layers in self._magnitudes.items():
            if name in self._shared:
                state[f"{name}.magnitude"] = self._shared[name].detach().clone()
            for layer_name, module in layers.items():
                if not self.shared:
                    state[f"{name}::{layer_name}.magnitude"] = module.magnitude.detach().clone()
                state[f"{name}::{layer_name}.inv_norm"] = module.inv_norm.detach().clone()
                state[f"{name}::{layer_name}.norm"] = module.norm.detach().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self._expected_keys()
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"SD-LoRA state does not match the model (missing {missing[:4]}, unexpected {extra[:4]})")
        with torch.no_grad():
            for name in self.adapters:
                # new modules are registered by _bare_weights on leaving load's context
                modules = self._magnitudes.get(name) or self._make_magnitudes(name, 0.0, register=False)
                if name in self._shared:
                    self._shared[name].copy_(state[f"{name}.magnitude"])
                for layer_name, module in modules.items():
                    if not self.shared:
                        module.magnitude.copy_(state[f"{name}::{layer_name}.magnitude"])
                    module.inv_norm.copy_(state[f"{name}::{layer_name}.inv_norm"])
                    module.norm.copy_(state[f"{name}::{layer_name}.norm"])
        self.frozen = int(state["frozen"])
        self.normalised = int(state["normalised"])

    def save(self, path: str | Path) -> None:
        """As :meth:`ContinualLoRA.save`, with the raw ``B`` (not ``B_eff``) and the magnitudes."""
        with self._bare_weights():
            super().save(path)

    def load(self, path: str | Path) -> None:
        with self._bare_weights():
            super().load(path)

    def _bare_weights(self):
        """Lift the parametrizations (same parameter objects) so that peft's ``lora_B.weight`` is the raw B."""
        return lifted_b_parametrizations(self.model, self._magnitudes)


def raw_weights(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s raw ``A`` and ``B`` in a peft layer (``B`` before the SD-LoRA parametrization)."""
    b = layer.lora_B[name]
    raw_b = b.parametrizations.weight.original if parametrize.is_parametrized(b, "weight") else b.weight
    return layer.lora_A[name].weight, raw_b


def direction_norm(layer: nn.Module, name: str, norm: str = "factors") -> float:
    """The normaliser of adapter ``name`` in ``layer`` (raw weights, peft scaling ``s``), in float64.

    ``norm="factors"``: ``||s B||_F ||A||_F``; ``"product"``: ``||s B A||_F``.
    """
    check_choice("norm", norm, NORMS)
    a, b = (w.detach().double().flatten(1) for w in raw_weights(layer, name))  # a convolution: kernel flattened
    s = float(layer.scaling[name])
    if norm == "factors":
        return float(torch.linalg.matrix_norm(s * b) * torch.linalg.matrix_norm(a))
    return float(torch.linalg.matrix_norm(s * (b @ a)))
