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
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn.utils import parametrize

from .config import LoRAConfig


def linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` (the layers LoRA can target)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoraLayer)]


def resolve_targets(model: nn.Module, target_modules: Iterable[str], *, exclude: Iterable[str] = ()) -> list[str]:
    """Full names of the ``nn.Linear`` layers matched by ``target_modules`` (last name component or full name).

    Raises:
        ValueError: a target matches no ``nn.Linear`` of the model (the message lists the valid short names).
    """
    excluded = tuple(exclude)
    modules = dict(model.named_modules())
    candidates = [n for n, m in modules.items()
                  if isinstance(m, (nn.Linear, LoraLayer)) and ".lora_" not in n
                  and not n.endswith(".base_layer") and not any(n == e or n.startswith(e + ".") for e in excluded)]
    found: list[str] = []
    for target in target_modules:
        hits = [n for n in candidates if n == target or n.rsplit(".", 1)[-1] == target]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise ValueError(f"target module {target!r} matches no nn.Linear layer of {type(model).__name__}; "
                             f"valid names: {short}")
        found += [n for n in hits if n not in found]
    for n in found:
        parent = modules[n.rsplit(".", 1)[0]] if "." in n else model
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"{n!r} is the output projection of an nn.MultiheadAttention, whose forward reads "
                             f"out_proj.weight directly, so a LoRA there would be ignored; target the MLP layers "
                             f"(open_clip: c_fc, c_proj) instead")
    return sorted(found, key=list(modules).index)


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


def activate(model: nn.Module, active: list[str], trainable: Iterable[str] = (), *, fold: bool = True) -> None:
    """Make the adapters ``active`` contribute to the forward pass; only those in ``trainable`` get gradients.

    With ``fold``, the active frozen adapters of each layer run as one concatenated low-rank term
    (:mod:`avalanche_merge.lora.fold`: same function, one pair of matmuls instead of one per adapter).
    """
    from .fold import fold_frozen, unfold

    trainable = set(trainable)
    for layer in lora_layers(model).values():
        present = [a for a in active if a in layer.lora_A]
        layer.set_adapter(present)  # peft: marks every active adapter trainable; undone below
        for a in layer.lora_A:
            for p in (*layer.lora_A[a].parameters(), *layer.lora_B[a].parameters()):
                p.requires_grad_(a in trainable)
        if fold:
            fold_frozen(layer, [a for a in present if a not in trainable])
        else:
            unfold(layer)


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
    """``scaling * B A`` of adapter ``name`` in ``layer`` (shape of the base weight)."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.scaling[name] * (b @ a)


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
