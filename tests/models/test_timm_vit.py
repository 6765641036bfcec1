"""The ``timm_vit`` backbone: timm checkpoints load exactly (q/k/v split), checks before any work, the head."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from avalanche_merge.config import ConfigError, from_dict
from avalanche_merge.models import BACKBONES
from avalanche_merge.models.timm_vit import LAYER_NORM_EPS, TimmViTOptions, from_timm_state, timm_vit_skeleton

timm = pytest.importorskip("timm")


def _timm_checkpoint(tmp_path, arch="vit_tiny_patch16_224", img_size=32, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=7).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a misplaced one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def _bench(n_classes=5, size=32):
    return SimpleNamespace(input_shape=(3, size, size), num_classes=n_classes, name="stand-in")


def test_features_equal_timm_pre_logits(tmp_path):
    ref, path = _timm_checkpoint(tmp_path)
    options = TimmViTOptions(arch="vit_tiny_patch16_224", checkpoint=str(path))
    timm_vit_skeleton(options, (3, 32, 32), 5)  # the plan-time check accepts it
    model = BACKBONES.get("timm_vit").build(options, _bench(), 0).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        got = model.features(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert all(m.eps == LAYER_NORM_EPS for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert model(x).shape == (4, 5)  # a new head for the benchmark's classes


def test_qkv_is_split_in_q_k_v_order():
    qkv = torch.arange(12.0).view(6, 2)
    state = from_timm_state({"blocks.0.attn.qkv.weight": qkv, "blocks.0.mlp.fc1.bias": torch.zeros(3),
                             "patch_embed.proj.weight": torch.ones(1), "head.weight": torch.ones(1)})
    assert torch.equal(state["blocks.0.attn.q.weight"], qkv[:2])
    assert torch.equal(state["blocks.0.attn.v.weight"], qkv[4:])
    assert set(state) == {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight",
                          "blocks.0.fc1.bias", "patch_embed.weight"}


def test_head_is_drawn_from_the_seed(tmp_path):
    _, path = _timm_checkpoint(tmp_path)
    options = TimmViTOptions(arch="vit_tiny_patch16_224", checkpoint=str(path))
    a, b, c = (BACKBONES.get("timm_vit").build(options, _bench(), s) for s in (0, 0, 1))
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert torch.equal(a.blocks[0].attn.k.weight, c.blocks[0].attn.k.weight)  # the backbone is the checkpoint's


def test_missing_or_mismatched_weights_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint must be the path of a local"):
        from_dict(TimmViTOptions, {"arch": "vit_base_patch16_224"})
    with pytest.raises(ConfigError, match="arch must be one of"):
        from_dict(TimmViTOptions, {"arch": "vit_huge", "random_init": True})
    with pytest.raises(FileNotFoundError, match="is not a file"):
        timm_vit_skeleton(TimmViTOptions(checkpoint=str(tmp_path / "none.safetensors")), (3, 224, 224), 10)
    _, path = _timm_checkpoint(tmp_path)  # a ViT-Ti/16 file given as ViT-B/16
    with pytest.raises(ValueError, match="not a timm vit_base_patch16_224 state dict"):
        timm_vit_skeleton(TimmViTOptions(checkpoint=str(path)), (3, 32, 32), 10)
    with pytest.raises(ValueError, match="do not divide the benchmark's image size 28"):
        timm_vit_skeleton(TimmViTOptions(random_init=True), (3, 28, 28), 10)
