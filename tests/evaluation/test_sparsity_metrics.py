"""Sparse fine-tuning metrics: hand-computed pure functions, and the plugin metric in a tiny Naive run."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from avalanche_merge.evaluation.sparsity import (
    LinearShape,
    SparsityPluginMetric,
    changed_masks,
    flops_saving,
    jaccard_matrix,
    learner_flops_saving,
    linear_layers,
    mask_densities,
    record_linear_rows,
    sparsity_metrics,
    updated_fraction,
    weight_snapshot,
)

T, F = True, False


def test_updated_fraction_hand_computed():
    before = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.zeros(2, 3), "only_before": torch.ones(5)}
    after = {"a": torch.tensor([1.0, 2.5, 3.0, 0.0]), "b": torch.zeros(2, 3), "only_after": torch.ones(5)}
    after["b"][1, 2] = 1e-30  # any change counts, however small
    masks = changed_masks(before, after)
    assert set(masks) == {"a", "b"}
    assert masks["a"].tolist() == [F, T, F, T]
    assert updated_fraction(before, after) == pytest.approx(3 / 10)  # 2 of 4 in a, 1 of 6 in b
    assert updated_fraction(before, after, names=["a"]) == pytest.approx(2 / 4)
    assert updated_fraction(before, after, names=["missing"]) == 0.0
    with pytest.raises(ValueError, match="shape"):
        changed_masks({"a": torch.zeros(2)}, {"a": torch.zeros(3)})


def test_weight_snapshot_is_a_detached_copy():
    model = nn.Linear(3, 2)
    snap = weight_snapshot(model)
    assert set(snap) == {"weight", "bias"} and not snap["weight"].requires_grad
    with torch.no_grad():
        model.weight[0, 0] += 1.0
    assert updated_fraction(snap, dict(model.named_parameters())) == pytest.approx(1 / 8)
    assert set(weight_snapshot(model, names=["bias"])) == {"bias"}


def test_mask_densities_and_jaccard_hand_computed():
    m0 = {"w": torch.tensor([T, T, F, F]), "v": torch.tensor([T, F])}
    m1 = {"w": torch.tensor([F, T, T, F]), "v": torch.tensor([F, F])}
    m2 = {"w": torch.tensor([F, F, F, F]), "v": torch.tensor([F, F])}
    assert mask_densities([m0, m1, m2]) == pytest.approx([3 / 6, 2 / 6, 0.0])
    J = jaccard_matrix([m0, m1, m2])
    # m0 & m1 = {w1}, m0 | m1 = {w0, w1, w2, v0}
    np.testing.assert_allclose(J, [[1.0, 1 / 4, 0.0], [1 / 4, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert jaccard_matrix([]).shape == (0, 0)


def test_flops_saving_hand_computed():
    layers = {"a.weight": LinearShape(rows=10, in_features=4, out_features=3),  # dense step 6*10*4*3 = 720
              "head.weight": LinearShape(rows=2, in_features=3, out_features=5)}  # 6*2*3*5 = 180
    out = flops_saving(layers, {"a.weight": 0.25})  # head missing: dense, saves nothing
    assert out["saved_flops"] == pytest.approx(0.75 * 2 * 10 * 4 * 3)  # 180
    assert out["dense_flops"] == pytest.approx(900)
    assert out["fraction"] == pytest.approx(180 / 900)
    # everything frozen: the whole weight gradient, a third of the step
    assert flops_saving(layers, {"a.weight": 0.0, "head.weight": 0.0})["fraction"] == pytest.approx(1 / 3)
    assert flops_saving(layers, {})["fraction"] == 0.0
    assert flops_saving({}, {})["fraction"] == 0.0
    with pytest.raises(ValueError, match="density"):
        flops_saving(layers, {"a.weight": 1.5})


def test_linear_rows_measured_by_hooks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Linear(4, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):  # x: (batch, tokens, 4); the head sees one row per sample
            return self.head(self.tok(x).mean(1))

    net = Net()
    with record_linear_rows(net) as rows:
        net(torch.randn(2, 7, 4))
        net(torch.randn(5, 7, 4))  # only the first call counts
    assert rows == {"tok.weight": 14, "head.weight": 2}
    net(torch.randn(1, 1, 4))  # hooks removed
    assert rows == {"tok.weight": 14, "head.weight": 2}
    layers = linear_layers(net, rows)
    assert layers == {"tok.weight": LinearShape(14, 4, 6), "head.weight": LinearShape(2, 6, 3)}
    assert linear_layers(net)["tok.weight"].rows == 1
    assert linear_layers(net, {"head.weight": 2}).keys() == {"head.weight"}

    class FakeLearner:
        masks = {"tok.weight": torch.zeros(6, 4, dtype=torch.bool)}
        masks["tok.weight"][:3, :2] = True  # density 6/24

    out = learner_flops_saving(FakeLearner(), layers)
    assert out["fraction"] == pytest.approx((0.75 * 2 * 14 * 24) / (6 * 14 * 24 + 6 * 2 * 18))


def test_plugin_metric_in_a_tiny_naive_run():
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.models.vit import TinyViT, TinyViTConfig
    from avalanche_merge.plugins.sparse import SparsePlugin

    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    metric = SparsityPluginMetric()
    assert isinstance(sparsity_metrics()[0], SparsityPluginMetric)
    plugin = SparsePlugin(method="masked", options={"density": 0.1})
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                     evaluator=EvaluationPlugin(metric, loggers=[]), plugins=[plugin])
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    rec = metric.result()
    assert sorted(rec) == [0, 1]
    learner = plugin.learner
    n_sel = sum(p.numel() for p in learner.params.values())
    for e in (0, 1):
        r = rec[e]
        # only masked selectable weights moved: at most the density (plus rounding of k = density * n per tensor)
        assert 0.0 < r["selectable_updated_fraction"] <= 0.1 + len(learner.params) / n_sel
        assert r["mask_density"] == pytest.approx(learner.updated_fraction()[e])
        # the head trains densely, so over the whole model more than the selectable fraction moved, but far from all
        assert 0.0 < r["updated_fraction"] < 0.5
        # q, k, v, proj, fc1, fc2 at ~10% density; the dense head counts with d = 1
        assert 0.2 < r["flops_saved_fraction"] < 1 / 3
    np.testing.assert_allclose(metric.overlap, jaccard_matrix(learner.history))
    assert metric.overlap[0, 1] == 0.0 and metric.overlap[0, 0] == 1.0  # ownership: disjoint masks
    last = strategy.evaluator.get_last_metrics()
    assert last["Sparsity_UpdatedFraction_Selectable/train_phase/train_stream/Exp001"] == pytest.approx(
        rec[1]["selectable_updated_fraction"])
    assert torch.is_tensor(last["Sparsity_MaskOverlap/train_phase/train_stream"])


def test_plugin_metric_without_sparse_plugin_measures_dense_updates():
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_merge.benchmarks import build_benchmark

    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(bench.input_shape[1] * bench.input_shape[2], 10))
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    model.register_parameter("frozen", frozen)
    metric = SparsityPluginMetric()
    strategy = Naive(model=model, optimizer=torch.optim.SGD([model[1].weight, model[1].bias], lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=8, train_epochs=1, device="cpu",
                     evaluator=EvaluationPlugin(metric, loggers=[]))
    strategy.train(bench.scenario.train_stream[0])
    (rec,) = metric.result().values()
    assert set(rec) == {"updated_fraction"}
    n = sum(p.numel() for p in model.parameters())
    # the frozen entries never move; most of the dense layer does (pixels that are always 0 give zero gradients)
    assert rec["updated_fraction"] <= (n - 3) / n
    assert rec["updated_fraction"] > 0.1
    assert not math.isnan(rec["updated_fraction"])
