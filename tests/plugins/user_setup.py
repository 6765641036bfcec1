"""A user's own setup for the plugin tests: an Avalanche ``nc_benchmark`` over scikit-learn digits (task labels
given), Avalanche's ``SimpleMLP`` and a small CNN, each with a fixed head or an ``IncrementalClassifier``."""

from __future__ import annotations

import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.models import IncrementalClassifier, SimpleMLP
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset


class Digits(TensorDataset):
    """A tensor dataset with the ``targets`` Avalanche's generators read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y.tolist()


def digits_benchmark(n_train: int = 200, n_test: int = 100, n_experiences: int = 5):
    """Class-incremental digits, classes in order (experience 0 holds 0 and 1), task labels given."""
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    return nc_benchmark(Digits(x[:n_train], y[:n_train]), Digits(x[-n_test:], y[-n_test:]),
                        n_experiences=n_experiences, task_labels=True, seed=0,
                        fixed_class_order=list(range(10)))


class SmallCNN(nn.Module):
    """A user's CNN on 8x8 digits: conv -> pool -> hidden linear -> classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 16, 32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.view(-1, 1, 8, 8)))
        h = nn.functional.max_pool2d(h, 2).flatten(1)
        return self.classifier(torch.relu(self.fc1(h)))


#: LoRA / routed targets of each model (its hidden nn.Linear)
TARGETS = {"mlp": ["features.0"], "cnn": ["fc1"]}


def user_model(kind: str = "mlp", incremental: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SimpleMLP(num_classes=10, input_size=64, hidden_size=32, drop_rate=0.0) if kind == "mlp" else SmallCNN()
    if incremental:
        model.classifier = IncrementalClassifier(32, initial_out_features=2)
    return model
