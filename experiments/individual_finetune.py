"""Reference points of the offline domain benchmark: the pretrained backbone and one fine-tuned copy per domain.

For each seed, each domain of ``domain_mnist`` is fine-tuned on its own, starting from the pretrained
``tiny_vit`` (same data, optimiser, epochs and batch size as ``avalanche-merge bench``), and tested on that
domain. Writes ``experiments/results/individual_finetune.json``.

Run: python experiments/individual_finetune.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.models import BACKBONES
from avalanche_merge.models.backbones import TinyViTOptions
from avalanche_merge.runner.run import write_json_atomic
from avalanche_merge.strategies.registry import TrainConfig, make_optimizer


def accuracy(model, dataset) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, _ in DataLoader(dataset, batch_size=256):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="experiments/results/individual_finetune.json")
    args = parser.parse_args()
    train = TrainConfig()
    rows = []
    for seed in range(args.seeds):
        bench = build_benchmark("domain_mnist", seed)
        base = BACKBONES.get("tiny_vit").build(TinyViTOptions(), bench, seed)
        for exp_train, exp_test, name in zip(bench.train_stream, bench.test_stream, bench.experience_names):
            torch.manual_seed(seed)
            model = copy.deepcopy(base)
            pre = accuracy(model, exp_test.dataset)
            opt = make_optimizer(model.parameters(), train)
            loader = DataLoader(exp_train.dataset, batch_size=train.batch_size, shuffle=True)
            for _ in range(train.epochs):
                model.train()
                for x, y, _ in loader:
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
            tuned = accuracy(model, exp_test.dataset)
            rows.append({"seed": seed, "domain": name, "pretrained_acc": pre, "finetuned_acc": tuned})
            print(f"seed {seed} {name:<10} pretrained {100 * pre:5.1f}%  fine-tuned {100 * tuned:5.1f}%")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("pretrained_acc", "finetuned_acc")}
    print(f"mean over domains and seeds: pretrained {100 * mean['pretrained_acc']:.1f}%, "
          f"individually fine-tuned {100 * mean['finetuned_acc']:.1f}%")
    write_json_atomic(Path(args.out), {"train": vars(train), "rows": rows, "mean": mean})


if __name__ == "__main__":
    main()
