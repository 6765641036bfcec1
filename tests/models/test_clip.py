"""Offline tests of the open_clip zero-shot wrapper on a tiny randomly initialised CLIP."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from avalanche_merge.models.clip import (
    DEFAULT_TEMPLATES,
    ZeroShotClassifier,
    build_zero_shot_head,
    load_open_clip,
    zero_shot_classifier,
)

EMBED_DIM = 16
TINY_CFG = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ("cat", "dog", "airplane")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_open_clip("tiny-clip", model_cfg=TINY_CFG)


@pytest.fixture(scope="module")
def head(tiny):
    model, _, tokenizer = tiny
    return build_zero_shot_head(model, tokenizer, CLASSES, DEFAULT_TEMPLATES)


def test_head_shape_and_unit_rows(head):
    assert head.shape == (len(CLASSES), EMBED_DIM)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(len(CLASSES)))


def test_head_independent_of_batch_size_and_restores_mode(tiny, head):
    model, _, tokenizer = tiny
    model.train()
    try:
        small = build_zero_shot_head(model, tokenizer, CLASSES, DEFAULT_TEMPLATES, batch_size=1)
        assert model.training
    finally:
        model.eval()
    torch.testing.assert_close(small, head, rtol=1e-5, atol=1e-5)


def test_forward_matches_cosine_similarity(tiny, head):
    model, _, _ = tiny
    scale = float(model.logit_scale.detach().exp())
    classifier = ZeroShotClassifier(model.visual, head, logit_scale=scale).eval()
    assert isinstance(classifier.head, nn.Linear) and classifier.head.bias is None
    assert classifier.feature_dim == EMBED_DIM
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = classifier(images)
        features = classifier.features(images)
        reference = model.encode_image(images, normalize=False)
    cosine = torch.nn.functional.normalize(reference, dim=-1) @ head.T
    assert logits.shape == (5, len(CLASSES))
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(logits, scale * cosine, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(dim=1), cosine.argmax(dim=1))


def test_whole_model_is_reduced_to_visual_tower(tiny, head):
    model, _, _ = tiny
    classifier = ZeroShotClassifier(model, head)
    assert classifier.image_encoder is model.visual


def test_preprocess_produces_model_input(tiny):
    from PIL import Image

    _, preprocess, _ = tiny
    image = Image.new("RGB", (50, 40), color=(10, 200, 30))
    assert preprocess(image).shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("class_names", "templates", "error"),
    [
        (CLASSES, ("a photo of a cat.",), ValueError),
        ((), DEFAULT_TEMPLATES, ValueError),
        ("cat", DEFAULT_TEMPLATES, TypeError),
        (CLASSES, (), ValueError),
    ],
)
def test_head_rejects_bad_inputs(tiny, class_names, templates, error):
    model, _, tokenizer = tiny
    with pytest.raises(error):
        build_zero_shot_head(model, tokenizer, class_names, templates)


def test_classifier_rejects_mismatched_head(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="embed_dim"):
        ZeroShotClassifier(model.visual, torch.randn(3, EMBED_DIM + 1))


def test_missing_pretrained_file_fails_fast(tmp_path):
    missing = tmp_path / "no_such_checkpoint.bin"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"no_such_checkpoint\.bin") as info:
        load_open_clip("ViT-B-32", pretrained=missing)
    assert time.perf_counter() - start < 1.0
    assert "download" in str(info.value)
    with pytest.raises(FileNotFoundError, match="openai"):
        load_open_clip("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize("model_name", ["hf-hub:timm/ViT-B-16-SigLIP", "not-a-model", "ViT-B-16-SigLIP"])
def test_unsupported_model_names(model_name):
    with pytest.raises(ValueError, match=model_name):
        load_open_clip(model_name)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(2)
    model, _, tokenizer = load_open_clip("tiny-clip", model_cfg=TINY_CFG)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    head = build_zero_shot_head(model, tokenizer, CLASSES)
    expected = ZeroShotClassifier(model.visual, head, logit_scale=float(model.logit_scale.detach().exp()))

    torch.manual_seed(3)  # a different random initialisation, which the checkpoint must overwrite
    fresh = zero_shot_classifier("tiny-clip", CLASSES, model_cfg=TINY_CFG)
    loaded = zero_shot_classifier("tiny-clip", CLASSES, model_cfg=TINY_CFG, pretrained=str(path))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = loaded(images)
        assert torch.equal(logits, expected(images))
        assert not torch.allclose(logits, fresh(images))
    assert torch.equal(loaded.head.weight, head)
