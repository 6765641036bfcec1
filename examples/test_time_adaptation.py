"""Test-time adaptation on your own model: TENT inside any Avalanche strategy, and the pure cores.

Run: ``python examples/test_time_adaptation.py`` (CPU, under a minute). A small CNN with BatchNorm is trained on
clean digits, then evaluated on a shifted copy (brighter, higher contrast) with and without TENT.
"""

import torch
from avalanche.training import Naive
from torch import nn

from avalanche_merge.benchmarks.base import make_scenario, tensor_classification_dataset
from avalanche_merge.benchmarks.data import load_sklearn_digits
from avalanche_merge.plugins.tta import TentPlugin
from avalanche_merge.tta import TentConfig, marginal_entropy


def main() -> None:
    torch.manual_seed(0)
    x, y = load_sklearn_digits(28)
    perm = torch.randperm(len(y))
    train, test = perm[:1200], perm[1200:]
    shifted = (x[test] * 2.0 + 0.3).clamp(0, 1)  # the test-time shift
    scenario = make_scenario([tensor_classification_dataset(x[train], y[train], 0)],
                             [tensor_classification_dataset(shifted, y[test], 0)])
    model = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 12 * 12, 10))
    for plugins, name in (([], "no adaptation"), ([TentPlugin(config=TentConfig())], "TENT")):
        net = model  # the same trained weights for both: TENT restores them after evaluating
        strategy = Naive(model=net, optimizer=torch.optim.Adam(net.parameters(), 1e-3), train_mb_size=64,
                         train_epochs=3, eval_mb_size=128, plugins=plugins)
        if not plugins:
            strategy.train(scenario.train_stream[0])
        results = strategy.eval(scenario.test_stream)
        acc = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        print(f"{name}: accuracy on the shifted test set {acc:.3f}")
    # the cores work on plain tensors too: MEMO's marginal entropy of 8 views of 4 images over 10 classes
    print("marginal entropy of uniform views:", float(marginal_entropy(torch.zeros(4, 8, 10))))


if __name__ == "__main__":
    main()
