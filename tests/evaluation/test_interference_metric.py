"""Loss interference: the pure functions, the standalone metric, and the Avalanche plugin metrics in a tiny run."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from avalanche_merge.evaluation.interference import (
    Interference,
    InterferencePluginMetric,
    LoRAOverlapPluginMetric,
    final_interference,
    interference_matrix,
    interference_metrics,
    lora_overlap_metrics,
    task_losses,
)

NAN = float("nan")


def test_interference_matrix_hand_computed():
    L = [[1.0, NAN, NAN],
         [1.5, 0.5, NAN],
         [2.0, 0.25, 0.3]]
    interference = interference_matrix(L)
    expected = [[NAN, NAN, NAN],
                [0.5, NAN, NAN],
                [1.0, -0.25, NAN]]  # positive: the earlier task's loss went up
    np.testing.assert_allclose(interference, expected)
    assert final_interference(L) == pytest.approx((1.0 - 0.25) / 2)
    assert math.isnan(final_interference([[0.7]]))
    with pytest.raises(ValueError, match="square"):
        interference_matrix([[1.0, 2.0]])
    with pytest.raises(ValueError, match="square"):
        interference_matrix(np.zeros((0, 0)))


def test_task_losses_matches_direct_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    expected = nn.functional.cross_entropy(model[0](x), y).item()
    data = TensorDataset(x, y)
    losses = task_losses(model, [data, DataLoader(data, batch_size=3), [(x[:4], y[:4]), (x[4:], y[4:])]],
                         batch_size=4)
    np.testing.assert_allclose(losses, [expected] * 3, rtol=1e-6)  # dropout off during evaluation
    assert model.training  # mode restored
    summed = task_losses(model, [data], nn.CrossEntropyLoss(reduction="none"))
    assert summed[0] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no samples"):
        task_losses(model, [[]])
    with pytest.raises(ValueError, match=r"\(x, y, \.\.\.\)"):
        task_losses(model, [[x]])


def test_standalone_metric():
    metric = Interference()
    assert metric.result() == {}
    metric.update([1.0])
    metric.update([1.5, 0.5])
    assert metric.result() == {0: pytest.approx(0.5)}
    metric.update(np.array([2.0, 0.25, 0.3]))
    assert metric.result() == {0: pytest.approx(1.0), 1: pytest.approx(-0.25)}
    assert np.isnan(metric.loss_matrix()[0, 1])
    with pytest.raises(ValueError, match="expected 4 losses"):
        metric.update([1.0])
    metric.reset()
    assert metric.matrix().shape == (0, 0)
    with pytest.raises(ValueError, match="max_samples"):
        InterferencePluginMetric(0)
    with pytest.raises(ValueError, match="side must be"):
        lora_overlap_metrics(side="both")


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_plugin_metrics_in_a_tiny_lora_run():
    """Naive-style training of an O-LoRA learner on 2 experiences; the emitted values equal recomputations."""
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_merge.analysis.subspace import lora_overlap
    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.strategies.lora import LoRAStrategy

    torch.manual_seed(0)
    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, 10))
    (full,) = interference_metrics(max_samples=1000)  # keeps every pattern (100 per experience)
    (overlap,) = lora_overlap_metrics()
    evaluator = EvaluationPlugin(full, overlap, loggers=[])
    strategy = LoRAStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), method="olora",
                            method_options={"target_modules": ("1",), "rank": 2}, criterion=nn.CrossEntropyLoss(),
                            train_mb_size=20, train_epochs=2, eval_mb_size=64, device="cpu", evaluator=evaluator)
    data = [exp.dataset.eval() for exp in bench.train_stream]

    strategy.train(bench.train_stream[0])
    l00 = task_losses(model, data[:1])[0]
    assert full.loss_matrix()[0, 0] == pytest.approx(l00, rel=1e-6)
    assert full.result() == {} and len(full.samples[0]) == len(data[0])
    capped = InterferencePluginMetric(7, seed=3)  # a fixed seeded sample of 7 patterns
    at_exp0 = SimpleNamespace(experience=bench.train_stream[0])
    capped.before_training_exp(at_exp0)
    again = InterferencePluginMetric(7, seed=3)
    again.before_training_exp(at_exp0)
    assert len(capped.samples[0]) == 7
    np.testing.assert_allclose(task_losses(model, capped.samples), task_losses(model, again.samples))
    assert overlap.result().shape == (1, 1)

    strategy.train(bench.train_stream[1])
    l10, l11 = task_losses(model, data)
    emitted = evaluator.get_all_metrics()
    (value,) = emitted["Interference/train_phase/train_stream/Exp000"][1]
    assert value == pytest.approx(l10 - l00, rel=1e-5)
    assert emitted["Interference_Mean/train_phase/train_stream"][1] == [pytest.approx(l10 - l00, rel=1e-5)]
    assert full.loss_matrix()[1, 1] == pytest.approx(l11, rel=1e-6)
    # LoRA overlap: one adapter per task, so the update of experience i is adapter task{i}
    matrices = emitted["LoRA_Overlap/train_phase/train_stream"][1]
    assert [tuple(m.shape) for m in matrices] == [(1, 1), (2, 2)]
    direct, _ = lora_overlap(model)
    np.testing.assert_allclose(matrices[-1].numpy(), direct, atol=1e-6)
    (new,) = emitted["LoRA_Overlap_New/train_phase/train_stream"][1]
    assert new == pytest.approx(direct[1, 0], abs=1e-6) and 0 <= new <= 1
    with pytest.raises(ValueError, match="trained a second time"):
        full.before_training_exp(at_exp0)


def test_lora_overlap_metric_ignores_models_without_lora():
    strategy = SimpleNamespace(model=nn.Linear(3, 3))
    metric = LoRAOverlapPluginMetric()
    metric.before_training_exp(strategy)
    assert metric.after_training_exp(strategy) is None and metric.result() is None
