"""Retrieval accuracy: the pure function and the Avalanche plugin metric with any strategy exposing a router."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.evaluation.retrieval import retrieval_accuracy, retrieval_metrics
from avalanche_merge.models.vit import TinyViT, TinyViTConfig


def test_retrieval_accuracy_function():
    assert retrieval_accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])) == 0.75
    assert retrieval_accuracy(torch.tensor([3, 3, 1]), 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="routed has 2 entries, true 3"):
        retrieval_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))


class SignRouter:
    """Routes an image to task 0 if its mean pixel is below a threshold, else to task 1."""

    def __init__(self, threshold):
        self.threshold = threshold
        self.last_routed = None

    def route(self, x):
        return (x.flatten(1).mean(1) > self.threshold).long()


class RouterPlugin(SupervisedPlugin):
    def __init__(self, router):
        super().__init__()
        self.router = router


def test_plugin_metric_matches_direct_count():
    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=10)
    xs = [torch.stack([bench.scenario.test_stream[e].dataset[i][0] for i in range(len(bench.scenario.test_stream[e]
                                                                                         .dataset))])
          for e in range(2)]
    threshold = float(torch.cat(xs).flatten(1).mean(1).median())
    router = SignRouter(threshold)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                     criterion=nn.CrossEntropyLoss(),
                     train_mb_size=16, train_epochs=1, eval_mb_size=7, device="cpu", plugins=[RouterPlugin(router)],
                     evaluator=EvaluationPlugin(*retrieval_metrics(), loggers=[]))
    results = strategy.eval(bench.scenario.test_stream)
    direct = [float((router.route(x) == e).float().mean()) for e, x in enumerate(xs)]
    assert results["RetrievalAcc_Exp/eval_phase/test_stream/Exp000"] == pytest.approx(direct[0])
    assert results["RetrievalAcc_Exp/eval_phase/test_stream/Exp001"] == pytest.approx(direct[1])
    n = [len(x) for x in xs]
    stream = (direct[0] * n[0] + direct[1] * n[1]) / sum(n)
    assert results["RetrievalAcc_Stream/eval_phase/test_stream"] == pytest.approx(stream)


def test_no_router_no_value():
    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=10)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                     criterion=nn.CrossEntropyLoss(),
                     device="cpu", evaluator=EvaluationPlugin(*retrieval_metrics(), loggers=[]))
    results = strategy.eval(bench.scenario.test_stream)
    assert not any(k.startswith("RetrievalAcc") for k in results)


def test_within_task_accuracy_restricts_the_argmax_to_the_tasks_classes():
    from avalanche_merge.evaluation.within_task import within_task_accuracy

    logits = torch.tensor([[9.0, 1.0, 2.0, 0.0],   # class 0 wins overall; within {2, 3}: 2
                           [0.0, 8.0, 1.0, 3.0],   # within {2, 3}: 3
                           [0.0, 0.0, 5.0, 4.0]])  # 2
    correct, total = within_task_accuracy(logits, torch.tensor([2, 3, 3]), {2, 3})
    assert (correct, total) == (2, 3)
    assert within_task_accuracy(logits, torch.tensor([0, 1, 2]), [0, 1, 2, 3, 9]) == (3, 3)
    with pytest.raises(ValueError, match=r"targets \[1\] are not among the task's classes"):
        within_task_accuracy(logits, torch.tensor([1, 2, 3]), [2, 3])


def test_within_task_plugin_metric_matches_a_direct_count_per_experience_and_stream():
    from avalanche_merge.evaluation.within_task import within_task_metrics

    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=10)
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, eval_mb_size=7,
                     evaluator=EvaluationPlugin(*within_task_metrics(), loggers=[]))
    results = strategy.eval(bench.test_stream)
    model.eval()
    correct = total = 0
    for k, exp in enumerate(bench.test_stream):
        data = exp.dataset.eval()
        x = torch.stack([data[i][0] for i in range(len(data))])
        y = torch.tensor([data[i][1] for i in range(len(data))])
        classes = sorted(exp.classes_in_this_experience)
        with torch.no_grad():
            pred = torch.tensor(classes)[model(x)[:, classes].argmax(1)]
        hits = int((pred == y).sum())
        assert results[f"WithinTaskAcc_Exp/eval_phase/test_stream/Exp{k:03d}"] == pytest.approx(hits / len(y))
        correct, total = correct + hits, total + len(y)
    assert results["WithinTaskAcc_Stream/eval_phase/test_stream"] == pytest.approx(correct / total)
