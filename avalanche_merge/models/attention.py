"""Fused attention projections split into separate ``nn.Linear`` layers, so LoRA and per-projection methods can
address the query, key and value projections by name.

Two layouts hide them from peft's ``target_modules``:

- ``torch.nn.MultiheadAttention`` (open_clip's towers): its forward reads ``in_proj_weight`` and
  ``out_proj.weight`` directly, so a LoRA injected into ``out_proj`` is ignored and ``in_proj`` is no module at
  all. :class:`SplitMultiheadAttention` is a drop-in replacement computing the same function with four
  ``nn.Linear`` children ``q``, ``k``, ``v`` and ``out_proj`` (Vaswani et al., "Attention Is All You Need",
  NeurIPS 2017: softmax(q k^T / sqrt(d_head) + mask) v per head). peft 0.21 has a ``MultiheadAttention`` LoRA
  layer, but it adapts ``in_proj`` and ``out_proj`` together (not q / k / v apart) by merging the adapter into the
  weights around each forward, so the per-projection hooks of InfLoRA, GPM and the routed learners' gates cannot
  see it; a plain module with Linear children works with every learner.
- timm's ``Attention.qkv``: one ``nn.Linear`` of width ``3 d`` whose output rows are ``[q; k; v]``.
  :class:`SplitQKV` replaces it by a module with ``nn.Linear`` children ``q``, ``k``, ``v`` whose forward
  concatenates their outputs, which is the fused layer's output: timm's forward is untouched.

:func:`split_attention` makes both replacements in place, copying the weights (so load a checkpoint *before*
splitting: the state-dict keys change, e.g. ``attn.in_proj_weight`` becomes ``attn.q.weight``...). The outputs
are those of the fused modules up to float rounding (the products are computed per projection instead of in one
matrix product; ``tests/models/test_architectures.py`` pins float64 equality to 1e-12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(weight.requires_grad)
    return layer


class SplitQKV(nn.Module):
    """A fused ``qkv`` ``nn.Linear`` (output rows ``[q; k; v]``) as three ``nn.Linear`` children ``q``, ``k``, ``v``.

    ``forward(x) = cat([q(x), k(x), v(x)], -1)``: the fused layer's output layout.
    """

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        if not isinstance(fused, nn.Linear) or fused.out_features % 3:
            raise ValueError(f"a fused qkv layer must be an nn.Linear with 3 * d outputs, got {fused}")
        d = fused.out_features // 3
        bias = fused.bias
        for i, name in enumerate(("q", "k", "v")):
            setattr(self, name, _linear(fused.weight[i * d:(i + 1) * d], None if bias is None
                                        else bias[i * d:(i + 1) * d]))
        self.in_features, self.out_features = fused.in_features, fused.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate ``nn.Linear`` projections ``q``, ``k``, ``v`` and ``out_proj``.

    Same call signature and outputs as the module it is built from (:meth:`from_module`): ``(output, weights)``,
    ``weights`` ``None`` unless ``need_weights``. ``bias_k`` / ``bias_v`` / ``add_zero_attn`` are not supported.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, out_proj: nn.Linear, *, num_heads: int,
                 dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if q.out_features % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the embedding width {q.out_features}")
        self.q, self.k, self.v, self.out_proj = q, k, v, out_proj
        self.num_heads, self.dropout, self.batch_first = num_heads, float(dropout), batch_first
        self.embed_dim = q.out_features
        self.head_dim = self.embed_dim // num_heads

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The equivalent of ``mha`` (weights copied).

        Raises:
            ValueError: ``mha`` uses ``bias_k``/``bias_v`` or ``add_zero_attn``.
        """
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with bias_k/bias_v or add_zero_attn cannot be split")
        e = mha.embed_dim
        b = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight
            weights = [w[:e], w[e:2 * e], w[2 * e:]]
        else:
            weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        biases = [None] * 3 if b is None else [b[:e], b[e:2 * e], b[2 * e:]]
        q, k, v = (_linear(w_, b_) for w_, b_ in zip(weights, biases, strict=True))
        out = _linear(mha.out_proj.weight, mha.out_proj.bias)
        split = cls(q, k, v, out, num_heads=mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first)
        return split.train(mha.training)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, length: int,
              source: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive float mask ``(n, heads, L, S)`` of nn.MultiheadAttention's two masks (bool: True = masked)."""
        def additive(mask: torch.Tensor) -> torch.Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
            return mask.to(dtype)

        out = None
        if attn_mask is not None:
            m = additive(attn_mask)
            out = m.view(n, self.num_heads, length, source) if m.dim() == 3 else m.view(1, 1, length, source)
        if key_padding_mask is not None:
            m = additive(key_padding_mask).view(n, 1, 1, source)
            out = m if out is None else out + m
        return out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, n, _ = query.shape  # sequence-first from here on
        source = key.shape[0]
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).triu(1)

        def heads(x: torch.Tensor, steps: int) -> torch.Tensor:  # (L, N, E) -> (N, h, L, d)
            return x.view(steps, n, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(self.q(query), length), heads(self.k(key), source), heads(self.v(value), source)
        mask = self._mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q / self.head_dim ** 0.5) @ k.transpose(-2, -1)
            attn = (scores if mask is None else scores + mask).softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            out = F.dropout(attn, p=p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, n, self.embed_dim))
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def _is_fused_qkv(name: str, module: nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] == "qkv" and isinstance(module, nn.Linear) and module.out_features % 3 == 0


def fused_attention(model: nn.Module) -> list[str]:
    """Names of the modules :func:`split_attention` would replace (``nn.MultiheadAttention`` and fused ``qkv``)."""
    return [n for n, m in model.named_modules()
            if n and (isinstance(m, nn.MultiheadAttention) or _is_fused_qkv(n, m))]


def split_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.MultiheadAttention`` by :class:`SplitMultiheadAttention` and every fused
    timm ``qkv`` ``nn.Linear`` by :class:`SplitQKV`; return the replaced module names.

    Works on the ``meta`` device too (the plan-time check). Already split modules are left alone.

    Raises:
        ValueError: a ``nn.MultiheadAttention`` uses ``bias_k``/``bias_v`` or ``add_zero_attn``.
    """
    names = fused_attention(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        replacement = (SplitMultiheadAttention.from_module(module) if isinstance(module, nn.MultiheadAttention)
                       else SplitQKV(module))
        setattr(parent, child, replacement)
    return names
