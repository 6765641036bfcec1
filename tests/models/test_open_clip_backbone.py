"""The registered open_clip backbone builds a zero-shot classifier for a benchmark's class names."""

from types import SimpleNamespace

import pytest
import torch

from avalanche_merge.config import ConfigError, from_dict
from avalanche_merge.models import BACKBONES

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_open_clip_backbone_builds_zero_shot_head():
    spec = BACKBONES.get("open_clip")
    options = from_dict(spec.config_cls, {"model_name": "tiny", "model_cfg": TINY_CFG})
    bench = SimpleNamespace(class_names=["cat", "dog", "car"], input_shape=(3, 32, 32), num_classes=3,
                            name="fake")
    model = spec.build(options, bench, 0)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    assert torch.allclose(model.head.weight.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_open_clip_backbone_refuses_missing_weights():
    spec = BACKBONES.get("open_clip")
    options = from_dict(spec.config_cls, {"model_name": "ViT-B-16", "pretrained": "/nonexistent/clip.pt"})
    bench = SimpleNamespace(class_names=["a"], input_shape=(3, 224, 224), num_classes=1, name="fake")
    with pytest.raises(FileNotFoundError, match="/nonexistent/clip.pt"):
        spec.build(options, bench, 0)
    with pytest.raises(ConfigError, match="model_name"):
        from_dict(spec.config_cls, {"model_name": ""})
