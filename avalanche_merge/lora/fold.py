"""Fold the frozen adapters of each peft LoRA layer into one concatenated low-rank term (speed; same function).

A per-task learner keeps every finished adapter active: at task t, peft's forward runs ``t`` frozen adapters, each
with its own dropout, two matmuls, a scaling and an add. Their sum equals one low-rank product,

    sum_i s_i c_i B_i A_i x = B_cat diag(c) A_cat x,   A_cat = [A_1; ...; A_k],   B_cat = [s_1 B_1, ..., s_k B_k],

where ``s_i`` is peft's scaling and ``c_i`` an optional per-adapter factor of a reparametrised ``B`` (SD-LoRA's
learnable magnitude ``alpha_i / norm_i``, CL-LoRA's block weight ``beta_t[j]``; a parametrization exposes it as
``factor()``). ``A_cat`` and ``B_cat`` are cached and rebuilt whenever a member's tensors change (checked on every
forward from their identity, storage, version counter, ``requires_grad``, dtype, device and scaling); the factors
are read on every forward, so gradients reach trainable magnitudes. An adapter is folded only while it is frozen
(its ``A`` and raw ``B`` need no gradient), has no hooks on its modules, and is active in the same set of adapters
as when it was folded; otherwise peft's own per-adapter computation runs. The frozen adapters of a layer share one
dropout draw (the same module type and rate is required); O-LoRA's reference code does the same for its
concatenated earlier adapters. Without dropout, or in eval mode, the folded forward equals the unfolded one up to
floating-point rounding (tests: float64, every learner, after every task, gradients included).

Mechanism: peft's per-adapter LoRA-variant hook (``LoraLayer.lora_variant``, through which DoRA runs): the first
folded adapter of a layer adds the whole folded term, the others add nothing. peft's ``active_adapters``, merging
(``merge``/``unmerge`` use each adapter's own delta) and state dicts are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant
from torch import nn
from torch.nn.utils import parametrize

_ENABLED = [True]


@contextmanager
def folding(enabled: bool) -> Iterator[None]:
    """Within the block, folded adapters compute as peft does (``enabled=False``; reference timings and tests)."""
    previous, _ENABLED[0] = _ENABLED[0], bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = previous


def _raw_b(module: nn.Module) -> tuple[torch.Tensor, nn.Module | None, bool]:
    """(raw ``B``, its factor parametrization or None, whether the layout can be folded)."""
    if not parametrize.is_parametrized(module, "weight"):
        return module.weight, None, True
    chain = module.parametrizations.weight
    foldable = len(chain) == 1 and callable(getattr(chain[0], "factor", None))
    return chain.original, (chain[0] if foldable else None), foldable


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class LayerFold:
    """The folded frozen adapters ``names`` of one layer (in peft's active order; the first one adds the term)."""

    def __init__(self, names: tuple[str, ...], active: tuple[str, ...]) -> None:
        self.names, self.active, self.leader = names, active, names[0]
        self.ok = False
        self._key: tuple | None = None
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None
        self._factors: list[nn.Module | None] = []
        self._ranks: torch.Tensor | None = None
        self._dropout: nn.Module | None = None

    def _member_key(self, layer: LoraLayer, name: str) -> tuple:
        a = layer.lora_A[name].weight
        b, factor, foldable = _raw_b(layer.lora_B[name])
        return (id(a), a.data_ptr(), a._version, a.requires_grad, id(b), b.data_ptr(), b._version, b.requires_grad,
                id(factor), foldable, a.dtype, b.dtype, a.device, float(layer.scaling[name]))

    def refresh(self, layer: LoraLayer) -> bool:
        """Rebuild the cache if a member changed; whether the folded term can be used now."""
        key = tuple(self._member_key(layer, n) for n in self.names)
        if key != self._key:
            self._key = key
            self.ok = self._build(layer)
        return self.ok

    def _build(self, layer: LoraLayer) -> bool:
        dropouts = [layer.lora_dropout[n] for n in self.names]
        kinds = {(type(d), getattr(d, "p", None)) for d in dropouts}
        if len(kinds) != 1 or not isinstance(dropouts[0], (nn.Identity, nn.Dropout)):
            return False
        a_parts, b_parts, self._factors = [], [], []
        for n in self.names:
            a = layer.lora_A[n].weight
            b, factor, foldable = _raw_b(layer.lora_B[n])
            if not foldable or a.requires_grad or b.requires_grad or a.dtype != b.dtype \
                    or _hooked(layer.lora_A[n], layer.lora_B[n], layer.lora_dropout[n]):
                return False
            a_parts.append(a.detach())
            b_parts.append(b.detach() * layer.scaling[n])
            self._factors.append(factor)
        if len({p.dtype for p in a_parts}) != 1:
            return False
        self._a, self._b = torch.cat(a_parts), torch.cat(b_parts, dim=1)
        self._ranks = torch.tensor([p.shape[0] for p in a_parts], device=self._a.device)
        self._dropout = None if isinstance(dropouts[0], nn.Identity) else dropouts[0]
        return True

    def term(self, x: torch.Tensor) -> torch.Tensor:
        """``B_cat diag(c) A_cat dropout(x)``."""
        hidden = F.linear(x if self._dropout is None else self._dropout(x), self._a)
        b = self._b
        if any(f is not None for f in self._factors):
            one = b.new_ones(())
            factors = torch.stack([one if f is None else f.factor().to(b.dtype) for f in self._factors])
            b = b * factors.repeat_interleave(self._ranks, output_size=b.shape[1])
        return F.linear(hidden, b)


class FoldedFrozen(LoraVariant):
    """peft LoRA variant of one folded adapter (see the module docstring)."""

    def __init__(self, fold: LayerFold, name: str) -> None:
        self.fold, self.name = fold, name

    @staticmethod
    def init(module: LoraLayer, adapter_name: str) -> None:
        """Nothing to initialise: the adapter's own weights are used."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter)

    def forward(self, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        fold = self.fold
        if _ENABLED[0] and tuple(module.active_adapters) == fold.active:
            if active_adapter == fold.leader:
                fold.refresh(module)  # the leader runs first: the others read its verdict
                if fold.ok:
                    return result + fold.term(x)
            elif fold.ok:
                return result  # already in the leader's term
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        return result + lora_b(lora_a(module.lora_dropout[active_adapter](x))) * module.scaling[active_adapter]


def unfold(layer: LoraLayer) -> None:
    """Remove the folds of ``layer`` (peft computes every adapter itself again)."""
    variants = getattr(layer, "lora_variant", None)
    if variants is None:
        return
    for name in [n for n, v in variants.items() if isinstance(v, FoldedFrozen)]:
        del variants[name]


def fold_frozen(layer: LoraLayer, frozen: list[str]) -> None:
    """Fold the active adapters ``frozen`` of ``layer`` (at least two, none with a variant of its own). Only
    ``nn.Linear`` layers fold (the folded term is a linear map); a convolution's adapters run as peft runs them."""
    unfold(layer)
    if not isinstance(layer.get_base_layer(), nn.Linear):
        return
    variants = getattr(layer, "lora_variant", None)
    active = tuple(layer.active_adapters)
    names = tuple(n for n in active if n in frozen and variants is not None and n not in variants)
    if len(names) < 2:
        return
    fold = LayerFold(names, active)
    for name in names:
        variants[name] = FoldedFrozen(fold, name)
