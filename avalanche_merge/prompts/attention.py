"""Prefix attention on the three self-attention forms of the supported ViTs (pure torch).

Prefix tuning (Li & Liang, ACL 2021), as DualPrompt (Wang et al., ECCV 2022) and CODA-Prompt (Smith et al., CVPR
2023) use it, prepends learned vectors to the *projected* keys and values of a block's self-attention: with
``x`` the block's normalised tokens, ``K = [P_k; x W_k + b_k]``, ``V = [P_v; x W_v + b_v]`` and the queries
unchanged, so the output keeps the input's length. The prefixes live in the projected space (the references
concatenate them after the ``qkv`` linear layer), one ``(batch, length, attn_dim)`` tensor each.

The attention is recomputed here from each module's own weights, never by copying a model's code:

- ``separate``: :class:`avalanche_merge.models.vit.Attention` (``q``, ``k``, ``v``, ``proj`` linears);
- ``fused``: timm's ``Attention`` (one ``qkv`` linear, optional ``q_norm``/``k_norm``, ``norm``, ``gate``);
- ``mha``: ``nn.MultiheadAttention`` as open_clip's blocks call it (self-attention; its fused ``in_proj`` is split
  into the query, key and value rows).

:func:`patch_attention` wraps a module's ``forward`` so that it uses the prefix a callback returns for the current
call, and the module's own ``forward`` when the callback returns ``None`` (the query pass, any other use).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Prefix = tuple[torch.Tensor, torch.Tensor]
FORMS = ("separate", "fused", "mha")


def attention_form(attn: nn.Module) -> str | None:
    """The supported form of a self-attention module (``separate``, ``fused``, ``mha``), or None."""
    if isinstance(attn, nn.MultiheadAttention):
        ok = attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
        return "mha" if ok else None
    if all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q", "k", "v", "proj")) and hasattr(attn, "heads"):
        return "separate"
    if isinstance(getattr(attn, "qkv", None), nn.Linear) and hasattr(attn, "num_heads") and hasattr(attn, "head_dim"):
        return "fused"
    return None


def attention_shape(attn: nn.Module) -> tuple[int, int]:
    """``(heads, head_dim)`` of a supported attention module."""
    form = attention_form(attn)
    if form == "mha":
        return attn.num_heads, attn.head_dim
    if form == "separate":
        return attn.heads, attn.q.out_features // attn.heads
    if form == "fused":
        return attn.num_heads, attn.head_dim
    raise TypeError(f"unsupported attention module {type(attn).__name__}")


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: Prefix | None, heads: int, *,
            scale: float | None, dropout: float, mask: torch.Tensor | None = None,
            is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention of ``[batch, heads, n, hd]`` tensors with the prefix prepended to keys/values."""
    if prefix is not None and prefix[0].shape[1] + prefix[1].shape[1] > 0:
        pk, pv = prefix
        if pk.shape[1] != pv.shape[1]:
            raise ValueError(f"key and value prefixes must have the same length, got {pk.shape[1]} and "
                             f"{pv.shape[1]}")
        if mask is not None or is_causal:
            raise ValueError("prefix attention does not support attention masks (vision towers use none)")
        k = torch.cat([_heads(pk.to(k.dtype), heads), k], dim=2)
        v = torch.cat([_heads(pv.to(v.dtype), heads), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                         scale=scale)
    b, h, n, hd = out.shape
    return out.transpose(1, 2).reshape(b, n, h * hd)


def separate_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """:class:`~avalanche_merge.models.vit.Attention` on ``x`` ``[batch, n, dim]`` with a key/value prefix."""
    h = attn.heads
    out = _attend(_heads(attn.q(x), h), _heads(attn.k(x), h), _heads(attn.v(x), h), prefix, h, scale=None,
                  dropout=0.0)
    return attn.proj(out)


def fused_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix | None, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False) -> torch.Tensor:
    """timm's ``Attention`` (fused ``qkv``) on ``x`` ``[batch, n, dim]`` with a key/value prefix."""
    b, n, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = _attend(q, k, v, prefix, h, scale=attn.scale, dropout=attn.attn_drop.p if attn.training else 0.0,
                  mask=attn_mask, is_causal=is_causal)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def mha_attention(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  prefix: Prefix | None, attn_mask: torch.Tensor | None = None,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.MultiheadAttention`` self-attention (``query is key is value``) with a key/value prefix.

    The fused ``in_proj_weight``/``in_proj_bias`` are split into their query, key and value rows.
    Returns the output in the module's layout (``batch_first`` or sequence first).
    """
    if not (query is key and key is value):
        raise ValueError("prefix attention needs self-attention (query, key and value the same tensor)")
    if key_padding_mask is not None:
        raise ValueError("prefix attention does not support key_padding_mask")
    x = query if attn.batch_first else query.transpose(0, 1)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3, dim=0)
    b_q, b_k, b_v = (attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None))
    h = attn.num_heads
    q, k, v = (_heads(F.linear(x, w, bias), h) for w, bias in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        mask = ~mask if mask.dtype == torch.bool else mask  # nn.MultiheadAttention: True means "masked out"
    out = _attend(q, k, v, prefix, h, scale=None, dropout=attn.dropout if attn.training else 0.0, mask=mask)
    out = attn.out_proj(out)
    return out if attn.batch_first else out.transpose(0, 1)


def prefix_forward(attn: nn.Module, form: str, prefix: Prefix | None, *args, **kwargs):
    """Call the ``form`` attention of ``attn`` with ``prefix`` and the module's usual call arguments."""
    if form == "separate":
        return separate_attention(attn, args[0] if args else kwargs["x"], prefix)
    if form == "fused":
        x = args[0] if args else kwargs["x"]
        mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        return fused_attention(attn, x, prefix, mask, kwargs.get("is_causal", False))
    if form == "mha":
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        call = dict(zip(names, args, strict=False)) | kwargs
        out = mha_attention(attn, call["query"], call.get("key", call["query"]), call.get("value", call["query"]),
                            prefix, call.get("attn_mask"), call.get("key_padding_mask"))
        return out, None
    raise ValueError(f"unknown attention form {form!r}; valid: {list(FORMS)}")


class AttentionPatch:
    """A wrapper around one attention module's ``forward``: prefix attention while ``get_prefix()`` is not None.

    Remove it with :meth:`remove` (the module's own ``forward`` is restored; nothing is stored in its state dict).
    """

    def __init__(self, attn: nn.Module, get_prefix: Callable[[], Prefix | None]) -> None:
        form = attention_form(attn)
        if form is None:
            raise TypeError(f"unsupported attention module {type(attn).__name__}: prefix tuning supports "
                            f"separate q/k/v linears (TinyViT), a fused qkv linear (timm) and "
                            f"nn.MultiheadAttention self-attention (open_clip)")
        if "forward" in vars(attn):
            raise ValueError(f"{type(attn).__name__} already has a patched forward (one prompt model per backbone)")
        self.attn, self.form = attn, form
        original = attn.forward

        def forward(*args, **kwargs):
            prefix = get_prefix()
            if prefix is None:
                return original(*args, **kwargs)
            return prefix_forward(attn, form, prefix, *args, **kwargs)

        attn.forward = forward

    def remove(self) -> None:
        vars(self.attn).pop("forward", None)
