"""peft plumbing shared by the continual LoRA learners: inject, activate, freeze, read and save adapters.

peft (Mangrulkar et al., https://github.com/huggingface/peft) owns the LoRA layers: ``inject_adapter_in_model``
replaces each target ``nn.Linear`` by a ``peft.tuners.lora.Linear`` holding one ``lora_A``/``lora_B`` pair per
named adapter, and its forward adds ``scaling * B A x`` for every *active* adapter. What peft cannot express is
written here: several adapters active at once with only one of them trainable (peft's ``set_adapter`` makes
every active adapter trainable), and reading an adapter's ``delta W = scaling * B A`` per layer.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.utils import parametrize

from .config import LoRAConfig


def linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` (the layers LoRA can target)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoraLayer)]


def resolve_targets(model: nn.Module, target_modules: Iterable[str] | str, *, exclude: Iterable[str] = (),
                    allow_conv: bool = True) -> list[str]:
    """Full names of the layers matched by ``target_modules``: names, last name components, the roles ``q``,
    ``k``, ``v``, ``proj``, ``fc1``, ``fc2`` translated per architecture, or ``"auto"``; see
    :func:`avalanche_merge.models.targets.lora_targets` (which may split fused attention in place).

    Raises:
        ValueError: a target matches no layer of the model (the message lists the valid short names).
    """
    from ..models.targets import lora_targets

    return lora_targets(model, target_modules, exclude=exclude, allow_conv=allow_conv)


def add_adapter(model: nn.Module, name: str, config: LoRAConfig, targets: list[str]) -> None:
    """Inject adapter ``name`` (rank, alpha, dropout of ``config``) into the layers ``targets`` of ``model``.

    The model is modified in place. peft's default init: ``A`` Kaiming-uniform, ``B`` zero (no change at start).
    """
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules="|".join(re.escape(t) for t in targets))  # peft: full match
    with warnings.catch_warnings():  # peft warns that a second adapter makes a multi-adapter model: intended
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(peft_config, model, adapter_name=name)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The peft LoRA layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Adapter names present in the model, in the order the model's layers first hold them (their creation order
    when every adapter has the same target layers, as in every learner here)."""
    names: list[str] = []
    for layer in lora_layers(model).values():
        names += [a for a in layer.lora_A if a not in names]
    return names


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The ``lora_A`` and ``lora_B`` parameters of adapter ``name`` in every layer."""
    params: list[nn.Parameter] = []
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            params += list(layer.lora_A[name].parameters()) + list(layer.lora_B[name].parameters())
    return params


def activate(model: nn.Module, active: list[str], trainable: Iterable[str] = (),
             foreign: Mapping[str, Mapping[str, bool]] | None = None, *, fold: bool = True) -> None:
    """Make the adapters ``active`` contribute to the forward pass; only those in ``trainable`` get gradients.

    ``foreign`` (from :func:`foreign_adapters`): adapters that were on the model before the learner; those that
    were active stay active, and each of their parameters keeps the ``requires_grad`` the user had set.
    With ``fold``, the learner's active frozen adapters of each layer run as one concatenated low-rank term
    (:mod:`avalanche_merge.lora.fold`: same function, one pair of matmuls instead of one per adapter); foreign
    adapters are never folded.
    """
    from .fold import fold_frozen, unfold

    trainable = set(trainable)
    foreign = _FOREIGN.get(model, {}) if foreign is None else foreign
    for layer_name, layer in lora_layers(model).items():
        kept = foreign.get(layer_name, {})
        present = [a for a in kept if kept[a]] + [a for a in active if a in layer.lora_A]
        grads = {id(p): p.requires_grad for a in kept for p in (*layer.lora_A[a].parameters(),
                                                                 *layer.lora_B[a].parameters())}
        layer.set_adapter(present)  # peft: marks every active adapter trainable; undone below
        for a in layer.lora_A:
            for p in (*layer.lora_A[a].parameters(), *layer.lora_B[a].parameters()):
                p.requires_grad_(grads[id(p)] if a in kept else a in trainable)
        if fold:
            fold_frozen(layer, [a for a in present if a not in trainable and a not in kept])
        else:
            unfold(layer)


def foreign_adapters(model: nn.Module, reserved: Callable[[str], bool] = lambda name: False
                     ) -> dict[str, dict[str, bool]]:
    """Adapters already on ``model`` (a user's peft adapters): ``{layer: {adapter: active}}``. A learner records
    them once, before adding its own (:func:`record_foreign_adapters`), so that :func:`activate` leaves them as the
    user set them: active or not, trainable or not (peft's ``set_adapter`` alone would switch them off).

    Raises:
        ValueError: an existing adapter has a name the learner will use (``reserved(name)`` is true).
    """
    out: dict[str, dict[str, bool]] = {}
    for layer_name, layer in lora_layers(model).items():
        active = set(layer.active_adapters)
        for a in layer.lora_A:
            if reserved(a):
                raise ValueError(f"the model already has a peft adapter named {a!r} (layer {layer_name}), a name "
                                 f"this learner gives its own adapters; rename it (peft: adapter_name=...) or "
                                 f"remove it (peft: delete_adapter)")
            out.setdefault(layer_name, {})[a] = a in active and not layer.disable_adapters
    return out


_FOREIGN: WeakKeyDictionary = WeakKeyDictionary()  # model -> its foreign adapters, read by activate()


def record_foreign_adapters(model: nn.Module) -> dict[str, dict[str, bool]]:
    """Record (once per model) the peft adapters on ``model`` that no learner of this package created, so that
    every later :func:`activate` keeps them as they are; return them.

    Raises:
        ValueError: an existing adapter is named like this package's adapters (``task<k>``, ``shared``).
    """
    if model not in _FOREIGN:
        _FOREIGN[model] = foreign_adapters(model, lambda a: a == "shared" or re.fullmatch(r"task\d+", a) is not None)
    return _FOREIGN[model]


@contextmanager
def lifted_b_parametrizations(model: nn.Module, modules: Mapping[str, Mapping[str, nn.Module]]) -> Iterator[None]:
    """Within the block, the parametrizations ``modules[adapter][layer]`` of peft's ``lora_B`` weights are lifted
    (``lora_B.weight`` is the raw ``B``, the same parameter object) and registered again on leaving: for saving and
    loading the raw factors of learners that reparametrise ``B`` (SD-LoRA's magnitudes, CL-LoRA's block weights).
    """
    layers = lora_layers(model)
    for name, per_layer in modules.items():
        for layer_name in per_layer:
            parametrize.remove_parametrizations(layers[layer_name].lora_B[name], "weight", leave_parametrized=False)
    try:
        yield
    finally:
        layers = lora_layers(model)
        for name, per_layer in modules.items():
            for layer_name, module in per_layer.items():
                parametrize.register_parametrization(layers[layer_name].lora_B[name], "weight", module)


def delta_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """``scaling * B A`` of adapter ``name`` in ``layer`` (shape of the base weight; for a convolution ``B`` is
    ``1 x 1`` and ``A`` has the kernel, so ``B A`` is the product of the flattened factors, reshaped)."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if a.dim() == 2:
        return layer.scaling[name] * (b @ a)
    return layer.scaling[name] * (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])


def adapter_deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``delta W`` of adapter ``name`` for every layer that has it, detached."""
    with torch.no_grad():
        return {n: delta_weight(layer, name).detach().clone() for n, layer in lora_layers(model).items()
                if name in layer.lora_A}


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors as ``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` (detached clones)."""
    state: dict[str, torch.Tensor] = {}
    for n, layer in lora_layers(model).items():
        if name in layer.lora_A:
            state[f"{n}.lora_A"] = layer.lora_A[name].weight.detach().clone()
            state[f"{n}.lora_B"] = layer.lora_B[name].weight.detach().clone()
    return state


def load_adapter_state(model: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (as returned by :func:`adapter_state`) into adapter ``name``; keys and shapes must match."""
    layers = lora_layers(model)
    expected = set(adapter_state(model, name))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter {name!r}: state does not match the model (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    with torch.no_grad():
        for key, value in state.items():
            layer_name, part = key.rsplit(".", 1)
            weight = getattr(layers[layer_name], part)[name].weight
            if weight.shape != value.shape:
                raise ValueError(f"adapter {name!r}: {key} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(weight.shape)}")
            weight.copy_(value)
