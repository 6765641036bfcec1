"""DERPP: Avalanche's DER++ bit for bit, with the current-batch term through the criterion (head protocols)."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import DER
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.plugins.protocol import HeadProtocolPlugin
from avalanche_merge.strategies import METHODS
from avalanche_merge.strategies.baselines import DERConfig
from avalanche_merge.strategies.der import DERPP


@pytest.fixture(scope="module")
def bench():
    return build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)


def _train(cls, bench, plugins=(), criterion=None):
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    strategy = cls(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        mem_size=30,
        alpha=0.3,
        beta=0.7,
        criterion=criterion or nn.CrossEntropyLoss(),
        train_mb_size=8,
        train_epochs=2,
        device="cpu",
        evaluator=None,
        plugins=list(plugins),
    )
    for exp in bench.scenario.train_stream:
        torch.manual_seed(1)
        strategy.train(exp)
    return strategy, model


def test_equals_avalanche_der_with_the_plain_criterion(bench):
    _, ours = _train(DERPP, bench)
    _, theirs = _train(DER, bench)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(a, b), name


class _Spy(nn.CrossEntropyLoss):
    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, logits, targets):
        self.rows.append(logits.shape[0])
        return super().forward(logits, targets)


def test_the_current_batch_term_goes_through_the_criterion_so_masked_applies(bench):
    spy = _Spy()
    strategy, _ = _train(DERPP, bench, criterion=spy)
    n0, n1 = (len(e.dataset) for e in bench.scenario.train_stream)
    assert sum(spy.rows) == 2 * (n0 + n1)  # every current example, never a buffer row, in both experiences
    # under ``masked``, the second experience (buffer in use) trains its current rows over its own classes only
    seen = []

    class Record(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            seen.append((strategy.replay_loader is not None, type(strategy._criterion).__name__))

    _train(DERPP, bench, plugins=[HeadProtocolPlugin(protocol="masked"), Record()])
    assert {(True, "MaskedCriterion"), (False, "MaskedCriterion")} == set(seen)


def test_registered_der_defaults_follow_sparcls_script():
    spec = METHODS.get("der")
    assert spec.config_cls is DERConfig and spec.protocol == "shared" and spec.in_bench
    assert DERConfig() == DERConfig(mem_size=500, alpha=0.1, beta=0.5)
    for bad, match in [({"mem_size": 0}, "mem_size"), ({"alpha": -1.0}, "alpha"), ({"batch_size_mem": 0}, "batch")]:
        with pytest.raises(ValueError, match=match):
            DERConfig(**bad)
