"""Analysis plugin metrics (continual metrics with held-out tasks, task-vector geometry, representation drift) in
real Avalanche runs: they leave the strategies' results unchanged and agree with direct computations."""

import math

import numpy as np
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import EWC, Naive
from avalanche.training.plugins import EvaluationPlugin

from avalanche_merge.analysis.cka import linear_cka
from avalanche_merge.analysis.geometry import effective_state
from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.benchmarks.held_out import domain_held_out
from avalanche_merge.evaluation.continual import ContinualMetricsPluginMetric
from avalanche_merge.evaluation.drift import RepresentationDriftPluginMetric
from avalanche_merge.evaluation.matrix import backward_transfer, forgetting, forward_transfer
from avalanche_merge.evaluation.parameter_geometry import ParameterGeometryPluginMetric
from avalanche_merge.models.vit import TinyViT, TinyViTConfig


def _bench():
    return build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)


def _held_out():
    from avalanche_merge.benchmarks.data import load_sklearn_digits

    x, y = load_sklearn_digits(28)
    return domain_held_out(x, y, torch.arange(len(y)), ["identity", "invert"], 30, seed=0)


def _model():
    torch.manual_seed(0)
    return TinyViT(TinyViTConfig(dim=16, depth=2, heads=2))


def _run(strategy_cls, extra, **kwargs):
    torch.manual_seed(1)
    bench, model = _bench(), _model()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), *extra, loggers=[])
    strategy = strategy_cls(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                            train_mb_size=32, train_epochs=2, eval_mb_size=64, evaluator=evaluator, **kwargs)
    strategy.eval(bench.test_stream)  # the pretrained row
    accs = []
    for exp in bench.train_stream:
        strategy.train(exp)
        res = strategy.eval(bench.test_stream)
        accs.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(2)])
    return model, accs, bench


def _analysis_metrics(bench):
    return [ContinualMetricsPluginMetric(held_out=_held_out(), held_out_samples=20),
            ParameterGeometryPluginMetric(),
            RepresentationDriftPluginMetric(bench.test_stream, probe_samples=16)]


@pytest.mark.parametrize("strategy_cls,kwargs",
                         [(Naive, {}), (EWC, {"ewc_lambda": 100.0, "criterion": torch.nn.CrossEntropyLoss()})],
                         ids=["naive", "ewc"])
def test_metrics_attach_without_changing_results(strategy_cls, kwargs):
    plain_model, plain_accs, _ = _run(strategy_cls, [], **kwargs)
    metrics = _analysis_metrics(_bench())
    model, accs, _ = _run(strategy_cls, metrics, **kwargs)
    assert accs == plain_accs
    for (n, a), (_, b) in zip(plain_model.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # bit-identical weights: no RNG draw, no mode change, no gradient

    continual, geometry, drift = metrics
    R = np.asarray(continual.rows)
    np.testing.assert_allclose(R, accs, atol=1e-12)  # same predictions as Avalanche's accuracy metric
    res = continual.result()
    assert res["bwt"] == pytest.approx(backward_transfer(R))
    assert res["forgetting"] == pytest.approx(forgetting(R))
    assert res["fwt_pretrained"] == pytest.approx(forward_transfer(R, continual.pretrained))
    assert len(res["held_out_accuracy"]) == 2 and len(res["held_out_accuracy"][0]) == 2
    retention = np.mean(res["held_out_accuracy"][-1])
    assert res["final_geometric_mean"] == pytest.approx(math.sqrt(np.mean(R[-1]) * retention))

    # geometry: the step vectors add up to the total change of the weights
    rep = geometry.report()
    assert rep["experiences"] == [0, 1]
    np.testing.assert_allclose(np.diag(rep["step_cosine"]), 1.0, atol=1e-6)
    final = effective_state(model)
    start = effective_state(_model())
    total = math.sqrt(sum(float((final[n] - start[n]).double().pow(2).sum()) for n in rep["names"]))
    assert rep["cumulative_total_norm"][-1] == pytest.approx(total, rel=1e-5)

    # drift: 2 steps x 2 blocks x 2 probes; the first step has no earlier task
    d = drift.report()
    assert d["layers"] == ["blocks.0", "blocks.1"]
    assert np.asarray(d["cka_pretrained"], dtype=float).shape == (2, 2, 2)
    assert all(v is None for v in np.asarray(d["cka_learned"][0], dtype=object).ravel())
    assert d["cka_learned"][1][1][0] is not None and d["cka_learned"][1][1][1] is None
    assert 0.0 < d["cka_pretrained"][1][1][0] < 1.0


def test_drift_matches_direct_cka_and_is_one_without_training():
    bench, model = _bench(), _model()
    drift = RepresentationDriftPluginMetric(bench.test_stream, probe_samples=16, layers=["blocks.1"])
    evaluator = EvaluationPlugin(drift, loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), train_mb_size=32,
                     train_epochs=1, evaluator=evaluator)
    strategy.train(bench.train_stream[0])  # lr 0: features unchanged
    np.testing.assert_allclose(drift.report()["cka_pretrained"][0], [[1.0, 1.0]], atol=1e-6)
    with torch.no_grad():
        model.blocks[1].fc2.weight.mul_(3.0).add_(0.1)
    strategy.train(bench.train_stream[1])
    from avalanche_merge.analysis.cka import layer_features
    from avalanche_merge.evaluation.probes import probe_tensors

    x = probe_tensors(bench.test_stream[1].dataset, 16, 0 + 1)[0]
    now = layer_features(model, x, ["blocks.1"])["blocks.1"]
    pre = drift._pretrained[1]["blocks.1"]
    assert drift.report()["cka_pretrained"][1][0][1] == pytest.approx(linear_cka(pre, now), abs=1e-9)
    assert drift.report()["cka_pretrained"][1][0][1] < 0.999


def test_geometry_metric_zero_update_and_include_filter():
    bench, model = _bench(), _model()
    geometry = ParameterGeometryPluginMetric(include=r"^blocks\.0\.")
    evaluator = EvaluationPlugin(geometry, loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), train_mb_size=32,
                     train_epochs=1, evaluator=evaluator)
    with pytest.raises(ValueError, match="nothing to report"):
        geometry.report()
    strategy.train(bench.train_stream[0])
    rep = geometry.report()
    assert all(n.startswith("blocks.0.") for n in rep["names"])
    assert rep["step_total_norm"] == [0.0]  # a zero task vector
    with pytest.raises(ValueError, match="matches no parameter"):
        bad = ParameterGeometryPluginMetric(include="nothing_like_this")
        bad.before_training_exp(strategy)


def test_bad_arguments_raise():
    bench = _bench()
    with pytest.raises(ValueError, match="probe_samples"):
        RepresentationDriftPluginMetric(bench.test_stream, probe_samples=2)
    with pytest.raises(ValueError, match="pool"):
        RepresentationDriftPluginMetric(bench.test_stream, pool="max")
    with pytest.raises(ValueError, match="at least one"):
        RepresentationDriftPluginMetric([])
    with pytest.raises(ValueError, match="density"):
        ParameterGeometryPluginMetric(density=0.0)
    with pytest.raises(ValueError, match="energy"):
        ParameterGeometryPluginMetric(energy=1.5)
    with pytest.raises(TypeError, match="mapping"):
        ContinualMetricsPluginMetric(held_out=[1, 2])
    with pytest.raises(ValueError, match="max_samples"):
        ContinualMetricsPluginMetric(held_out=_held_out(), held_out_samples=0)


def test_held_out_domains_are_balanced_and_deterministic():
    a, b = _held_out(), _held_out()
    assert list(a) == ["identity", "invert"]
    ya = torch.tensor([int(a["identity"][i][1]) for i in range(len(a["identity"]))])
    assert torch.bincount(ya, minlength=10).tolist() == [3] * 10
    xa, xb = a["invert"][5][0], b["invert"][5][0]
    assert torch.equal(xa, xb)
    assert not torch.equal(a["invert"][5][0], a["identity"][5][0])  # same image, another domain
    assert int(a["invert"][5][1]) == int(a["identity"][5][1])
    with pytest.raises(ValueError, match="multiple of 10"):
        domain_held_out(torch.zeros(20, 1, 28, 28), torch.arange(20) % 10, torch.arange(20), ["identity"], 15, 0)


def test_interference_metric_losses_leave_the_global_rng_alone():
    from torch.utils.data import TensorDataset

    from avalanche_merge.evaluation.interference import task_losses

    model = torch.nn.Linear(4, 3)
    data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    state = torch.get_rng_state()
    task_losses(model, [data], batch_size=4)
    assert torch.equal(state, torch.get_rng_state())
