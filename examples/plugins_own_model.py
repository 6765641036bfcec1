"""Every family as an Avalanche plugin on YOUR model and benchmark (docs/guide/plugins.md runs these snippets).

The benchmark is Avalanche's ``nc_benchmark`` over scikit-learn digits (5 experiences of 2 classes, task labels
given); the model is Avalanche's ``SimpleMLP`` with a growing ``IncrementalClassifier`` head; the strategy is any
Avalanche strategy (``Naive`` here; ``Replay``, ``EWC``, ``LwF``, ``AGEM`` work the same way with the merge, LoRA and
sparse plugins; the routed plugin refuses them before training, saying why).

Run: python examples/plugins_own_model.py [merge|lora|sparse|routed|resume]   (a few seconds each on a CPU)
"""

import sys
import tempfile

import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.models import IncrementalClassifier, SimpleMLP
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_merge.plugins import LoRAPlugin, MergePlugin, RoutedPlugin, SparsePlugin, load_state, save_state


class Digits(TensorDataset):
    """Tensors plus the ``targets`` list Avalanche's benchmark generators read."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.targets = y.tolist()


def my_benchmark():
    data = load_digits()
    x, y = torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)
    return nc_benchmark(Digits(x[:1200], y[:1200]), Digits(x[1200:], y[1200:]), n_experiences=5,
                        task_labels=True, seed=0, fixed_class_order=list(range(10)))


def my_model():
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=64, hidden_size=64, drop_rate=0.0)
    model.classifier = IncrementalClassifier(64, initial_out_features=2)
    return model


def my_strategy(model, plugin, optimizer=None):
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-2)
    return Naive(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=32,
                 train_epochs=2, eval_mb_size=256, plugins=[plugin], evaluator=EvaluationPlugin())


def accuracy(model, bench) -> float:
    """Accuracy over the test experiences of every class seen (the merged / routed model as it is now)."""
    model.eval()
    x = torch.stack([s[0] for exp in bench.test_stream for s in exp.dataset])
    y = torch.tensor([s[1] for exp in bench.test_stream for s in exp.dataset])
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def run(plugin, optimizer=None, model=None) -> float:
    bench, model = my_benchmark(), model or my_model()
    strategy = my_strategy(model, plugin, optimizer)
    for experience in bench.train_stream:
        strategy.train(experience)
    return accuracy(strategy.model, bench)


def merge() -> float:
    """Fine-tune each experience from the pretrained (here: initial) weights, merge task vectors with the CLI's
    ``continual_ta`` (same name, same defaults as ``avalanche-merge bench --methods continual_ta``)."""
    return run(MergePlugin(merger="continual_ta"))


def lora() -> float:
    """O-LoRA adapters on the hidden layer, head trained; a two-group optimizer keeps both rates."""
    model = my_model()
    optimizer = torch.optim.Adam([{"params": model.features.parameters(), "lr": 1e-2},
                                  {"params": model.classifier.parameters(), "lr": 1e-2}])
    plugin = LoRAPlugin(method="olora", options={"target_modules": ["features.0"], "rank": 4})
    return run(plugin, optimizer, model)


def sparse() -> float:
    """Sparse fine-tuning: each task updates 10% of the weights, chosen by gradient magnitude."""
    return run(SparsePlugin(method="masked", options={"density": 0.1, "criterion": "gradient"}))


def routed() -> float:
    """CoLoR: a LoRA and a head per task, routed by k-means prototypes of the model's head input."""
    return run(RoutedPlugin(method="color", options={"target_modules": ["features.0"], "rank": 4}))


def resume() -> bool:
    """Interrupt after experience 2, save, rebuild, load, finish: the same weights as an uninterrupted run."""
    bench = my_benchmark()

    def fresh():
        return my_strategy(my_model(), MergePlugin(merger="opcm"))

    full = fresh()
    for i in range(5):
        full.train(bench.train_stream[i])
    first = fresh()
    for i in range(3):
        first.train(bench.train_stream[i])
    with tempfile.TemporaryDirectory() as folder:
        save_state(first, folder)
        resumed = load_state(fresh(), folder, experiences=[bench.train_stream[i] for i in range(3)])
    for i in range(3, 5):
        resumed.train(bench.train_stream[i])
    a, b = full.model.state_dict(), resumed.model.state_dict()
    return all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["merge", "lora", "sparse", "routed", "resume"]:
        print(f"{name}: {globals()[name]()}")
