"""Attach prompts to a ViT's token sequence and blocks without editing its code (pure torch).

:class:`ViTAdapter` finds, in a supported ViT, the blocks, their self-attention modules, the class-token position
embedding, the norm applied to the embedded tokens before the blocks and the per-token output map (final norm,
projection). It installs:

- a forward pre-hook on the first block that inserts prompt tokens after the class token (prompt tuning, Lester
  et al., EMNLP 2021, as L2P uses it: the prompt tokens get the class token's position embedding and the
  backbone's pre-block norm);
- :class:`~avalanche_merge.prompts.attention.AttentionPatch` wrappers on the attention of the prompted blocks
  (prefix tuning);
- a forward hook on the last block that keeps the output tokens.

Supported: :class:`avalanche_merge.models.vit.TinyViT` (separate q/k/v), timm ``VisionTransformer`` (fused
``qkv``), open_clip's ``VisionTransformer`` (``nn.MultiheadAttention``; also inside
:class:`~avalanche_merge.models.clip.ZeroShotClassifier`). Anything else raises ``TypeError`` at construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import AttentionPatch, Prefix, attention_form, attention_shape


class PromptState:
    """What the hooks insert in the current forward pass (``None``/empty: the backbone runs unchanged)."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.prefixes: dict[int, Prefix] = {}

    def clear(self) -> None:
        self.tokens = None
        self.prefixes = {}


def _find_vit(model: nn.Module) -> tuple[str, nn.Module]:
    """``(kind, root)`` of the ViT inside ``model``: ``tiny_vit``, ``timm`` or ``open_clip``."""
    root = getattr(model, "image_encoder", model)  # ZeroShotClassifier keeps open_clip's visual tower there
    root = getattr(root, "visual", root) if callable(getattr(root, "encode_image", None)) else root
    resblocks = getattr(getattr(root, "transformer", None), "resblocks", None)
    if isinstance(resblocks, nn.ModuleList) and hasattr(root, "class_embedding") and hasattr(root, "ln_post"):
        if getattr(root, "attn_pool", None) is not None or getattr(root, "pool_type", "tok") != "tok":
            raise TypeError("open_clip towers with attentional or average pooling are not supported (the query "
                            "and the CLS head need the class token)")
        return "open_clip", root
    blocks = getattr(root, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and getattr(root, "cls_token", None) is not None:
        if hasattr(root, "forward_features") and hasattr(root, "norm_pre"):
            return "timm", root
        if callable(getattr(root, "features", None)) and hasattr(root, "norm"):
            return "tiny_vit", root
    raise TypeError(f"{type(model).__name__} is not a supported ViT: prompts attach to TinyViT, timm "
                    f"VisionTransformer (with a class token) and open_clip VisionTransformer towers")


class ViTAdapter:
    """The parts of a supported ViT that prompting needs, and the hooks that insert prompts.

    Args:
        model: a supported ViT (or a classifier wrapping one, e.g. ``ZeroShotClassifier``).
        prefix_layers: block indices whose attention gets prefixes (checked against the depth).
        prompt_tokens: whether prompt tokens may be inserted at the input.

    Raises:
        TypeError: not a supported ViT, or a prompted block whose attention form is not supported.
        ValueError: a prefix layer index outside ``[0, depth)``.
    """

    def __init__(self, model: nn.Module, *, prefix_layers: Sequence[int] = (), prompt_tokens: bool = False) -> None:
        self.kind, self.root = _find_vit(model)
        root = self.root
        self.blocks = list(root.transformer.resblocks if self.kind == "open_clip" else root.blocks)
        self.depth = len(self.blocks)
        self.prefix_layers = tuple(check_layers("prefix_layers", prefix_layers, self.depth))
        attn0 = self.blocks[0].attn
        if attention_form(attn0) is None:
            raise TypeError(f"block 0 of the {self.kind} backbone has an unsupported attention module "
                            f"{type(attn0).__name__}")
        self.heads, self.head_dim = attention_shape(attn0)
        self.attn_dim = self.heads * self.head_dim
        self.width = self._cls_pos().shape[-1]
        self.batch_first = self.kind != "open_clip" or bool(getattr(root.transformer, "batch_first", True))
        self.state = PromptState()
        self._tokens: torch.Tensor | None = None
        self._handles: list = []
        self._patches: list[AttentionPatch] = []
        for i in self.prefix_layers:
            self._patches.append(AttentionPatch(self.blocks[i].attn, lambda i=i: self.state.prefixes.get(i)))
        if prompt_tokens:
            self._handles.append(self.blocks[0].register_forward_pre_hook(self._insert, with_kwargs=True))
        self._handles.append(self.blocks[-1].register_forward_hook(self._keep))
        with torch.no_grad():
            self.feature_dim = self.finalize(torch.zeros(1, 1, self.width, device=self._cls_pos().device,
                                                         dtype=self._cls_pos().dtype)).shape[-1]

    # -- parts ---------------------------------------------------------------------------------------------
    def _cls_pos(self) -> torch.Tensor:
        root = self.root
        if self.kind == "open_clip":
            return root.positional_embedding[0]
        if self.kind == "timm" and (root.pos_embed is None or root.no_embed_class):
            return torch.zeros_like(root.cls_token[0, 0])
        return root.pos_embed[0, 0]

    def pre_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The norm the backbone applies to embedded tokens before its blocks."""
        if self.kind == "open_clip":
            return self.root.ln_pre(tokens)
        if self.kind == "timm":
            return self.root.norm_pre(tokens)
        return tokens

    def finalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's output map applied to every token: final norm (and open_clip's projection)."""
        root = self.root
        if self.kind == "open_clip":
            out = root.ln_post(tokens)
            return out @ root.proj if root.proj is not None else out
        if self.kind == "timm":
            return root.fc_norm(root.norm(tokens))
        return root.norm(tokens)

    def prompt_tokens(self, prompts: torch.Tensor) -> torch.Tensor:
        """Prompt vectors ``[batch, n, width]`` as input tokens: class-token position embedding, pre-block norm."""
        return self.pre_norm(prompts + self._cls_pos().to(prompts.dtype))

    # -- hooks ---------------------------------------------------------------------------------------------
    def _insert(self, module, args, kwargs):
        if self.state.tokens is None:
            return None
        x = args[0]
        x = x if self.batch_first else x.transpose(0, 1)
        prompts = self.state.tokens.to(x.dtype)
        x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        x = x if self.batch_first else x.transpose(0, 1)
        return (x, *args[1:]), kwargs

    def _keep(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self._tokens = out if self.batch_first else out.transpose(0, 1)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Output tokens ``[batch, n, width]`` of the last block for input images ``x`` under :attr:`state`."""
        self._tokens = None
        if self.kind == "tiny_vit":
            self.root.features(x)
        elif self.kind == "timm":
            self.root.forward_features(x)
        else:
            self.root(x)
        tokens, self._tokens = self._tokens, None
        return tokens

    def remove(self) -> None:
        """Remove every hook and patch (the backbone is as before)."""
        for h in self._handles:
            h.remove()
        for p in self._patches:
            p.remove()
        self._handles, self._patches = [], []


def check_layers(name: str, layers: Sequence[int], depth: int) -> list[int]:
    """``layers`` as a sorted list of distinct block indices in ``[0, depth)``; ``ValueError`` otherwise."""
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must contain ints, got {layer!r}")
        if not 0 <= layer < depth:
            raise ValueError(f"{name} index {layer} is outside the model: it has {depth} blocks (valid 0.."
                             f"{depth - 1})")
        out.append(layer)
    return sorted(set(out))
