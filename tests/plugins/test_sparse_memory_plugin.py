"""SparseMemoryPlugin inside Avalanche's Naive, and the registered ``sparse_memory`` method's options."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.plugins.sparse_memory import SparseMemoryOptions, SparseMemoryPlugin
from avalanche_merge.strategies import METHODS


class RowSpy(SupervisedPlugin):
    """After every update: which value rows changed, and whether they were the plugin's selection."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin
        self.ok = []
        self.held = []

    def before_update(self, strategy, **kw):
        self._before = self.plugin.finetuner.values.detach().clone()

    def after_update(self, strategy, **kw):
        changed = (self.plugin.finetuner.values != self._before).any(dim=1)
        selected = self.plugin.finetuner.selected
        self.ok.append(bool(not changed[~selected].any()) and int(selected.sum()) <= self.plugin.options.top_t)

    def before_training_iteration(self, strategy, **kw):
        if strategy.clock.train_exp_iterations == 0:
            self.held.append({id(p) for g in strategy.optimizer.param_groups for p in g["params"]})


def test_plugin_in_naive_trains_only_selected_rows_and_head():
    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=10)
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    plugin = SparseMemoryPlugin(n_keys=8, key_dim=8, heads=2, top_k=4, top_t=16, background_samples=32)
    spy = RowSpy(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=16,
                     train_epochs=1, eval_mb_size=64, device="cpu", evaluator=None,
                     criterion=nn.CrossEntropyLoss(), plugins=[plugin, spy])
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    assert spy.ok and all(spy.ok)
    values = plugin.finetuner.values
    trained = {id(values), id(model.head.weight), id(model.head.bias)}
    assert spy.held == [trained, trained]
    assert isinstance(strategy.optimizer, torch.optim.AdamW)
    assert plugin.finetuner.background.n_docs == 2 * 2  # 32 inputs in mini-batches of 16, per experience
    assert (values != 0).any()
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    strategy.eval(bench.scenario.test_stream)


def test_registered_method_and_options():
    spec = METHODS.get("sparse_memory")
    assert spec.family == "sparse" and spec.config_cls is SparseMemoryOptions
    with pytest.raises(ValueError, match=r"top_k must be in \[1, n_keys\*\*2 = 4\]"):
        SparseMemoryOptions(n_keys=2, top_k=5)
    with pytest.raises(ValueError, match="n_keys must be >= 1"):
        SparseMemoryOptions(n_keys=0)
    with pytest.raises(ValueError, match="top_t must be >= 1"):
        SparseMemoryOptions(top_t=0)
    with pytest.raises(ValueError, match="density must be in"):
        SparseMemoryOptions(density=2.0)
    with pytest.raises(ValueError, match="background_samples must be in"):
        SparseMemoryOptions(background_samples=-1)
