"""SparsePlugin inside Avalanche strategies: only masked entries move, the optimizer holds trainable parameters."""

import pytest
import torch
from avalanche.training import Naive, Replay
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.plugins.sparse import SparsePlugin


@pytest.fixture(scope="module")
def bench():
    return build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)


@pytest.mark.parametrize("strategy_cls", [Naive, Replay])
def test_plugin_updates_only_masked_weights_with_adamw(bench, strategy_cls):
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    plugin = SparsePlugin(method="masked", options={"density": 0.1, "criterion": "gradient"})
    extra = {"mem_size": 20} if strategy_cls is Replay else {}
    strategy = strategy_cls(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                            criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                            evaluator=None, plugins=[plugin], **extra)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy.train(bench.scenario.train_stream[0])
    learner = plugin.learner
    mask = learner.history[0]
    for name, p in model.named_parameters():
        if name in mask:
            assert torch.equal(p.detach()[~mask[name]], start[name][~mask[name]]), name
        elif not name.startswith("head."):
            assert torch.equal(p.detach(), start[name]), name  # LayerNorms, biases, embeddings: frozen
    held = {id(p) for p in strategy.optimizer.param_groups[0]["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    after0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy.train(bench.scenario.train_stream[1])
    for name, m in mask.items():
        assert torch.equal(dict(model.named_parameters())[name].detach()[m], after0[name][m])
    assert learner.updated_fraction() == pytest.approx([0.1, 0.1], abs=0.01)


def test_plugin_validates_options():
    with pytest.raises(ValueError, match="density"):
        SparsePlugin(method="masked", options={"density": 2})
    with pytest.raises(ValueError, match="unknown sparse learner"):
        SparsePlugin(method="packnet2")
