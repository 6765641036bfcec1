"""Prefix attention recomputed from each backbone's own attention module (float64)."""

import pytest
import torch
from prompt_backbones import KINDS, make_backbone

from avalanche_merge.prompts import ViTAdapter, prefix_forward
from avalanche_merge.prompts.attention import attention_form


def _blocks(model):
    adapter = ViTAdapter(model)
    try:
        return adapter.blocks, adapter.kind
    finally:
        adapter.remove()


def _project_kv(attn, z):
    """Keys and values the module itself would compute for tokens ``z`` [b, l, d]."""
    form = attention_form(attn)
    if form == "separate":
        return attn.k(z), attn.v(z)
    if form == "fused":
        _, k, v = attn.qkv(z).chunk(3, dim=-1)
        return k, v
    _, w_k, w_v = attn.in_proj_weight.chunk(3)
    _, b_k, b_v = attn.in_proj_bias.chunk(3)
    return torch.nn.functional.linear(z, w_k, b_k), torch.nn.functional.linear(z, w_v, b_v)


def _call(attn, x, prefix=None):
    form = attention_form(attn)
    if prefix is None:  # the module's own forward
        return attn(x, x, x, need_weights=False)[0] if form == "mha" else attn(x)
    out = prefix_forward(attn, form, prefix, x, x, x) if form == "mha" else prefix_forward(attn, form, prefix, x)
    return out[0] if form == "mha" else out


@pytest.mark.parametrize("kind", KINDS)
def test_empty_prefix_equals_the_original_attention_and_block(kind):
    model, shape = make_backbone(kind)
    model = model.double().eval()
    blocks, _ = _blocks(model)
    x = torch.randn(3, 7, blocks[0].attn.embed_dim if kind == "open_clip" else
                    (32 if kind == "timm" else 16), dtype=torch.float64)
    attn = blocks[0].attn
    d = x.shape[-1]
    empty = (torch.zeros(3, 0, d, dtype=torch.float64), torch.zeros(3, 0, d, dtype=torch.float64))
    torch.testing.assert_close(_call(attn, x, empty), _call(attn, x), rtol=0, atol=1e-12)
    # the whole block through the installed patch, with an empty prefix for layer 0
    ref = blocks[0](x)
    adapter = ViTAdapter(model, prefix_layers=[0])
    try:
        adapter.state.prefixes = {0: empty}
        torch.testing.assert_close(blocks[0](x), ref, rtol=0, atol=1e-12)
    finally:
        adapter.remove()
    assert "forward" not in vars(attn)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_equals_attending_to_extra_tokens(kind):
    """A prefix made of the module's own keys/values of tokens z equals self-attention over [z; x] (kept x rows)."""
    model, _ = make_backbone(kind)
    model = model.double().eval()
    blocks, _ = _blocks(model)
    attn = blocks[1].attn
    d = 16 if kind == "tiny_vit" else 32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, d, dtype=torch.float64, generator=g)
    z = torch.randn(2, 3, d, dtype=torch.float64, generator=g)
    with torch.no_grad():
        pk, pv = _project_kv(attn, z)
        full = _call(attn, torch.cat([z, x], dim=1))[:, 3:]
        got = _call(attn, x, (pk, pv))
    torch.testing.assert_close(got, full, rtol=0, atol=1e-10)
    # key and value prefixes are not interchangeable
    with torch.no_grad():
        swapped = _call(attn, x, (pv, pk))
    assert (swapped - full).abs().max() > 1e-3


def test_unsupported_backbones_and_attention_are_refused():
    model, _ = make_backbone("tiny_vit")

    class Opaque(torch.nn.Module):
        def forward(self, x):
            return x

    model.blocks[0].attn = Opaque()
    with pytest.raises(TypeError, match="unsupported attention"):
        ViTAdapter(model)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(TypeError, match="not a supported ViT"):
        ViTAdapter(mlp)
    model, _ = make_backbone("timm")
    with pytest.raises(ValueError, match="outside the model"):
        ViTAdapter(model, prefix_layers=[2])
