"""The regime of sparse memory fine-tuning: background overlap, documents, and the pretraining background."""

import math

import pytest
import torch

from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.plugins.sparse_memory import PAPER_REGIME, SparseMemoryOptions, SparseMemoryPlugin
from avalanche_merge.sparse.memory import ProductKeyMemory, SparseMemoryFinetuner, insert_memory
from avalanche_merge.sparse.tfidf import BackgroundCounts, background_overlap, slot_counts
from avalanche_merge.strategies.sparse_memory import pretrain_background_inputs


def _background(docs, n_slots):
    bg = BackgroundCounts(n_slots)
    for d in docs:
        bg.add(slot_counts(torch.tensor(d), n_slots))
    return bg


def test_background_overlap_hand_checked():
    # 4 documents; slot 0 read 5 times in total but by 4 docs, slot 1 read 6 times but by exactly half (2) of them
    docs = [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1], [0, 3], [0]]
    bg = _background(docs, 6)
    assert bg.df.tolist() == [4, 2, 1, 1, 0, 0]
    updated = torch.tensor([True, True, False, True, False, True])  # slots 0, 1, 3, 5
    out = background_overlap(updated, bg.df, bg.n_docs)
    # read by >= half: 0 (4 docs), 1 (2 docs = N/2) of the 4 updated; read by all: slot 0 only
    assert out == {"updated": 4, "read_by_half": 0.5, "read_by_all": 0.25}
    # an odd number of documents: 2 of 3 is at least half, 1 of 3 is not
    bg3 = _background([[0, 1], [0, 1], [0]], 3)
    assert background_overlap(torch.tensor([True, True, True]), bg3.df, 3) == {
        "updated": 3, "read_by_half": 2 / 3, "read_by_all": 1 / 3}
    empty = background_overlap(torch.zeros(6, dtype=torch.bool), bg.df, bg.n_docs)
    assert empty["updated"] == 0 and math.isnan(empty["read_by_half"]) and math.isnan(empty["read_by_all"])


def test_background_overlap_errors():
    with pytest.raises(ValueError, match="same shape"):
        background_overlap(torch.ones(3, dtype=torch.bool), torch.zeros(4), 1)
    with pytest.raises(ValueError, match="n_background_docs must be an int >= 1, got 0"):
        background_overlap(torch.ones(3, dtype=torch.bool), torch.zeros(3), 0)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\]"):
        background_overlap(torch.ones(3, dtype=torch.bool), torch.tensor([0.0, 3.0, 1.0]), 2)


def _tiny_vit():
    torch.manual_seed(0)
    return TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))


def test_observe_documents_splits_inputs_into_batches():
    model = _tiny_vit()
    memory = insert_memory(model, 0, where="input", n_keys=8, key_dim=8, heads=2, top_k=4)
    ft = SparseMemoryFinetuner(model, top_t=4)
    x = torch.rand(10, 1, 28, 28)
    assert ft.observe_documents(x, 4) == 3  # 4 + 4 + 2
    expected = BackgroundCounts(memory.n_slots)
    model.eval()
    with torch.no_grad():
        for chunk in (x[:4], x[4:8], x[8:]):
            model(chunk)
            expected.add(slot_counts(memory.last_indices, memory.n_slots))
    assert ft.background.n_docs == 3
    assert torch.equal(ft.background.df, expected.df)
    # one document of all 10 inputs would count each slot at most once
    assert int(ft.background.df.max()) > 1
    with pytest.raises(ValueError, match="document_size must be >= 1, got 0"):
        ft.observe_documents(x, 0)


def test_pretrain_background_is_counted_once_at_setup_and_the_stream_is_not_added():
    x = torch.rand(20, 1, 28, 28)
    plugin = SparseMemoryPlugin(pretrain_inputs=x, n_keys=8, key_dim=8, heads=2, top_k=4, top_t=8,
                                background="pretrain", background_samples=10, background_batch_size=4)
    model = _tiny_vit()
    ft = plugin.setup(model)
    assert ft.background.n_docs == 3  # the first 10 pretraining inputs, in documents of 4
    assert isinstance(ft.memory, ProductKeyMemory)
    df = ft.background.df.clone()
    plugin.setup(model)  # idempotent: not counted twice
    plugin.after_training_exp(strategy=None)  # "pretrain" only: the stream never joins the background
    assert ft.background.n_docs == 3 and torch.equal(ft.background.df, df)
    # documents follow the training batch size when background_batch_size is None
    plugin2 = SparseMemoryPlugin(pretrain_inputs=x, document_size=5, n_keys=8, key_dim=8, heads=2, top_k=4,
                                 top_t=8, background="both", background_samples=20)
    assert plugin2.setup(_tiny_vit()).background.n_docs == 4


@pytest.mark.parametrize("opts, err, match", [
    (dict(background="pretraining"), ValueError, r"background must be one of \['stream', 'pretrain', 'both'\], "
                                                 r"got 'pretraining'"),
    (dict(background="pretrain", background_samples=0), ValueError, "background='pretrain' needs background_samples"),
    (dict(background_batch_size=0), ValueError, "background_batch_size must be in"),
    (dict(background_batch_size=True), TypeError, "background_batch_size must be an int or None, got bool"),
    (dict(n_keys=8, top_t=65), ValueError, r"top_t must be in \[1, n_keys\*\*2 = 64\]"),
])
def test_regime_options_validation(opts, err, match):
    with pytest.raises(err, match=match):
        SparseMemoryOptions(**opts)


def test_pretrain_background_needs_inputs_and_image_shapes(monkeypatch):
    import avalanche_merge.benchmarks.data as data

    pool = torch.rand(30, 1, 28, 28)
    monkeypatch.setattr(data, "mnist_pretrain_pool", lambda: (pool, torch.arange(30) % 10))
    with pytest.raises(ValueError, match="background='both' needs pretrain_inputs"):
        SparseMemoryPlugin(background="both")
    same = pretrain_background_inputs((1, 28, 28))  # a fixed shuffle of the pool, nothing lost or repeated
    assert same.shape == pool.shape and not torch.equal(same, pool)
    assert torch.equal(same.flatten(1).sum(1).sort().values, pool.flatten(1).sum(1).sort().values)
    assert torch.equal(same, pretrain_background_inputs((1, 28, 28)))
    x = pretrain_background_inputs((3, 14, 14))
    assert x.shape == (30, 3, 14, 14) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.equal(x[:, 0], x[:, 2])  # grey digits repeated over the channels
    with pytest.raises(ValueError, match=r"needs \(1\|3, H, W\) image inputs.*\(384,\)"):
        pretrain_background_inputs((384,))


def test_paper_regime_is_a_valid_config():
    opts = SparseMemoryOptions(**PAPER_REGIME)
    assert opts.uses_pretrain and not opts.uses_stream
    assert opts.memory_config(64).n_slots == 256**2 and opts.top_t == 64
