"""Head protocols with your own model: one Avalanche strategy, four ways of training and reading the classifier.

``HeadProtocolPlugin`` (``avalanche_merge.plugins``) runs any Avalanche strategy under a head protocol:
``masked`` (the loss sees the current experience's classes only, as L2P / SD-LoRA), ``per_task`` (a linear head
per experience, concatenated at test time, as InfLoRA; ``prototypes=True`` scores by class means, as CL-LoRA),
``frozen`` (the pretrained head is never trained) or ``shared`` (plain cross-entropy over every class). Here a
user's MLP with Avalanche's growing ``IncrementalClassifier`` learns split MNIST (5 x 2 classes) with Naive and
with LwF. The within-task accuracy (argmax over the sample's own experience's classes) separates errors inside a
task from confusion between tasks.

Run: ``python examples/head_protocols.py`` (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import IncrementalClassifier
from avalanche.training import LwF, Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.evaluation.within_task import within_task_metrics
from avalanche_merge.plugins import HeadProtocolPlugin


class MyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU())
        self.classifier = IncrementalClassifier(128, initial_out_features=2)

    def forward(self, x):
        return self.classifier(self.features(x))


def run(strategy_cls, protocol: str | None, benchmark, **kwargs) -> tuple[float, float]:
    torch.manual_seed(0)
    model = MyMLP()
    plugins = [] if protocol is None else [HeadProtocolPlugin(protocol=protocol)]
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), *within_task_metrics(), loggers=[])
    strategy = strategy_cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                            criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, eval_mb_size=256,
                            plugins=plugins, evaluator=evaluator, **kwargs)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    results = strategy.eval(benchmark.test_stream)
    return (results["Top1_Acc_Stream/eval_phase/test_stream/Task000"],
            results["WithinTaskAcc_Stream/eval_phase/test_stream"])


def main() -> None:
    benchmark = build_benchmark("split_mnist", seed=0)
    print(f"{'strategy':<8} {'protocol':<10} {'final acc':>9} {'within-task':>11}")
    for name, cls, kwargs in (("naive", Naive, {}), ("lwf", LwF, {"alpha": 1.0, "temperature": 2.0})):
        for protocol in (None, "masked", "per_task"):
            acc, within = run(cls, protocol, benchmark, **kwargs)
            print(f"{name:<8} {protocol or 'shared':<10} {acc:>9.3f} {within:>11.3f}")


if __name__ == "__main__":
    main()
