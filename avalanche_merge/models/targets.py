"""Default targets per architecture: which layers LoRA / Proteus adapt, which weights sparse masks select, which
blocks the analysis probes. Resolved on the real model or on the plan-time ``meta`` skeleton (``--dry-run``).

Architectures recognised (:func:`detect_architecture`) and where the roles ``q``, ``k``, ``v``, ``proj``
(attention) and ``fc1``, ``fc2`` (MLP) point:

- ``tinyvit``: our :class:`~avalanche_merge.models.vit.TinyViT`: ``q``, ``k``, ``v``, ``proj``, ``fc1``, ``fc2``;
- ``open_clip``: an open_clip tower, a whole CLIP model or a :class:`~.clip.ZeroShotClassifier`: each
  ``nn.MultiheadAttention`` split (:mod:`.attention`) into ``attn.q``, ``attn.k``, ``attn.v``, ``attn.out_proj``;
  MLP ``c_fc``, ``c_proj``;
- ``timm_vit``: a timm ViT: the fused ``qkv`` split into ``qkv.q``, ``qkv.k``, ``qkv.v``; ``attn.proj``;
  MLP ``fc1``, ``fc2``;
- ``hf_encoder``: a Hugging Face BERT-style encoder (MiniLM): ``query``, ``key``, ``value``,
  ``attention.output.dense``; MLP ``intermediate.dense``, ``output.dense``;
- ``cnn`` (convolutions, no attention) and ``mlp`` (``nn.Linear`` only, e.g. Avalanche's ``SimpleMLP``): no roles;
  ``"auto"`` adapts every ``nn.Conv`` / ``nn.Linear`` layer outside the head.

The role names are TinyViT's module names, so the learners' paper defaults (``("q", "v")``: the query and value
projections) mean the same layers on every transformer. On a whole CLIP model (``visual`` + text tower) short
names and roles resolve inside the vision tower only; full dotted names reach anything. The classification head
is never a target.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

from torch import nn

from .attention import SplitMultiheadAttention, SplitQKV, fused_attention, split_attention

ARCHITECTURES = ("tinyvit", "open_clip", "timm_vit", "hf_encoder", "cnn", "mlp")
FAMILIES = ("lora", "proteus", "sparse", "analysis")
ROLES = ("q", "k", "v", "proj", "fc1", "fc2")
AUTO_ROLES = ("q", "k", "v")  # targets="auto" on a transformer: the attention's query, key and value projections

# role -> regular expression on the end of a full module name (after splitting fused attention)
_ROLE_PATTERNS: dict[str, dict[str, str]] = {
    "tinyvit": {r: re.escape(r) for r in ROLES},
    "open_clip": {"q": r"attn\.q", "k": r"attn\.k", "v": r"attn\.v", "proj": r"attn\.out_proj",
                  "fc1": r"mlp\.c_fc", "fc2": r"mlp\.c_proj"},
    "timm_vit": {"q": r"qkv\.q", "k": r"qkv\.k", "v": r"qkv\.v", "proj": r"attn\.proj",
                 "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"},
    "hf_encoder": {"q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
                   "proj": r"attention\.output\.dense", "fc1": r"intermediate\.dense",
                   "fc2": r"\d+\.output\.dense"},
}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def detect_architecture(model: nn.Module) -> str:
    """One of :data:`ARCHITECTURES` for ``model`` (checked in the table's order)."""
    from .vit import TinyViT

    modules = list(model.modules())
    if any(isinstance(m, TinyViT) for m in modules):
        return "tinyvit"
    kinds = {type(m).__module__.split(".")[0] for m in modules}
    if "open_clip" in kinds or any(isinstance(m, (nn.MultiheadAttention, SplitMultiheadAttention))
                                   for m in modules):
        return "open_clip"
    if "timm" in kinds and any(n.endswith("attn.qkv") for n, _ in model.named_modules()):
        return "timm_vit"
    if any(n.endswith("attention.self.query") for n, _ in model.named_modules()):
        return "hf_encoder"
    if any(isinstance(m, _CONV) for m in modules):
        return "cnn"
    return "mlp"


def vision_scope(model: nn.Module) -> str:
    """``"visual."`` for a whole CLIP model (an image and a text tower), else ``""`` (the whole model)."""
    if callable(getattr(model, "encode_text", None)) and isinstance(getattr(model, "visual", None), nn.Module):
        return "visual."
    return ""


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude if e)


def _is_layer(module: nn.Module, allow_conv: bool) -> bool:
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        module = module.get_base_layer()
    return isinstance(module, nn.Linear) or (allow_conv and isinstance(module, _CONV))


def _candidates(model: nn.Module, exclude: Iterable[str], allow_conv: bool) -> list[str]:
    exclude = list(exclude)
    return [n for n, m in model.named_modules() if n and _is_layer(m, allow_conv) and ".lora_" not in n
            and not n.endswith(".base_layer") and not _excluded(n, exclude)
            and not isinstance(m, (SplitQKV, SplitMultiheadAttention))]


def _every_layer(model: nn.Module, exclude: Iterable[str], allow_conv: bool) -> list[str]:
    scope = vision_scope(model)
    return [n for n in _candidates(model, exclude, allow_conv) if n.startswith(scope)]


def lora_targets(model: nn.Module, target_modules: Iterable[str] | str = "auto", *, exclude: Iterable[str] = (),
                 allow_conv: bool = True, split: bool = True) -> list[str]:
    """Full names of the layers LoRA adapts for ``target_modules`` on ``model`` (the learners call this).

    Each target is, in this order: ``"auto"`` (:data:`AUTO_ROLES` on a transformer; every ``nn.Linear`` /
    ``nn.Conv2d`` outside the head on an MLP or CNN), a full module name, a last name component (e.g. ``"c_fc"``;
    within the vision tower of a whole CLIP model), or a role of :data:`ROLES` translated for the architecture.
    Attention roles on a model without attention (MLP, CNN) fall back to every layer outside the head, with a
    warning. When attention roles are asked for, fused attention (``nn.MultiheadAttention``, timm's ``qkv``) is
    first split in place by :func:`~.attention.split_attention` (same function; state-dict keys change).

    Args:
        model: the model (modified in place only by the split).
        target_modules: names, roles or ``"auto"``.
        exclude: module names never targeted (the classification head).
        allow_conv: accept convolutions (learners built on input covariances of ``nn.Linear`` say False).
        split: split fused attention when needed (False: report such targets as unresolvable).

    Raises:
        ValueError: a target matches nothing (the message lists valid names and roles).
    """
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    exclude = list(exclude)
    arch = detect_architecture(model)
    attention = arch in _ROLE_PATTERNS
    wanted = [r for t in targets for r in (AUTO_ROLES if t == "auto" else (t,))]
    if attention and split and fused_attention(model) and any(t in ROLES for t in wanted):
        split_attention(model)
    modules = _modules(model)
    candidates = _candidates(model, exclude, allow_conv)
    scope = vision_scope(model)
    found: list[str] = []
    for target in targets:
        if target == "auto" and not attention:
            hits = _every_layer(model, exclude, allow_conv)
        elif target == "auto":
            hits = [n for role in AUTO_ROLES for n in _role_hits(arch, role, candidates, scope)]
        else:
            hits = [n for n in candidates if n == target]
            hits = hits or [n for n in candidates if n.rsplit(".", 1)[-1] == target and n.startswith(scope)]
            if not hits and target in ROLES and attention:
                hits = _role_hits(arch, target, candidates, scope)
            elif not hits and target in ROLES:
                hits = _every_layer(model, exclude, allow_conv)
                warnings.warn(f"{type(model).__name__} ({arch}) has no attention, so target {target!r} resolves "
                              f"to every layer outside the head ({len(hits)} layers); pass target_modules='auto' "
                              f"or names to silence this", UserWarning, stacklevel=3)
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in candidates if n.startswith(scope)})
            convs = any(isinstance(m, _CONV) for m in modules.values())
            kind = "nn.Linear / nn.Conv layer" if allow_conv and convs else "nn.Linear layer"
            hint = " (this learner adapts nn.Linear layers only)" if convs and not allow_conv else ""
            roles = f", the roles {list(ROLES)}" if attention else ""
            raise ValueError(f"target module {target!r} matches no {kind} of {type(model).__name__}; valid names: "
                             f"{short[:24]}{roles} or 'auto' (architecture {arch}"
                             f"{', vision tower' if scope else ''}){hint}")
        found += [n for n in hits if n not in found]
    for n in found:
        parent = modules[n.rsplit(".", 1)[0]] if "." in n else model
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"{n!r} is the output projection of an nn.MultiheadAttention, whose forward reads "
                             f"out_proj.weight directly, so a LoRA there would be ignored; target the roles "
                             f"('q', 'k', 'v', 'proj'): the attention is then split into separate layers")
    order = list(modules)
    return sorted(found, key=order.index)


def _role_hits(arch: str, role: str, candidates: list[str], scope: str) -> list[str]:
    pattern = re.compile(r"(^|\.)" + _ROLE_PATTERNS[arch][role] + "$")
    return [n for n in candidates if n.startswith(scope) and pattern.search(n)]


def sparse_parameters(model: nn.Module, *, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the weights sparse masks select by default (``parameters="weights"``: ``nn.Linear`` and ``nn.Conv``
    weights, ``nn.MultiheadAttention``'s q/k/v weights) outside ``exclude`` (the head), within the vision tower
    of a whole CLIP model."""
    from ..sparse.learner import selectable_parameters

    exclude, scope = list(exclude), vision_scope(model)
    return [n for n in selectable_parameters(model, "weights", None)
            if n.startswith(scope) and not _excluded(n.rsplit(".", 1)[0], exclude)]


def analysis_layers(model: nn.Module) -> list[str]:
    """Default blocks to probe: the longest ``nn.ModuleList`` (within the vision tower of a whole CLIP model);
    for a model without one (a CNN), its top-level children that hold parameters."""
    from ..analysis.cka import find_blocks

    scope = vision_scope(model)
    root = model.get_submodule(scope[:-1]) if scope else model
    try:
        return [scope + n for n in find_blocks(root)]
    except ValueError:
        pass
    seq = root
    while len(list(seq.children())) == 1:  # a wrapper around one Sequential
        seq = next(seq.children())
    prefix = next(n for n, m in root.named_modules() if m is seq)
    prefix = f"{scope}{prefix}." if prefix else scope
    layers = [prefix + n for n, m in seq.named_children() if any(True for _ in m.parameters())]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no blocks to probe; name the layers")
    return layers


def default_targets(model: nn.Module, family: str, *, head: str | None = None) -> list[str]:
    """The default targets of a method ``family`` on ``model``: module names (``"lora"``, ``"proteus"``,
    ``"analysis"``) or parameter names (``"sparse"``). ``head`` (a module name) is excluded.

    Raises:
        ValueError: unknown family, or nothing to target.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    exclude = [head] if head else []
    if family in ("lora", "proteus"):
        return lora_targets(model, "auto", exclude=exclude)
    if family == "sparse":
        return sparse_parameters(model, exclude=exclude)
    return analysis_layers(model)
