"""InfLoRA's operating point under the two energy criteria (issue 13): how many input directions DualGPM freezes
after the first task, and how much of the second task's input energy its adapter can still see.

The pretrained TinyViT of the bench learns split MNIST task 0 with InfLoRA (the authors' defaults: rank 10 on k
and v, thresholds 0.95 -> 1.0 over 5 tasks) inside Avalanche's Naive under its per-task protocol, once with
``energy="squared"`` (the authors' code, default) and once with ``energy="eigenvalues"`` (the paper's text). For
every adapted layer: dim M after task 0, and the share of task 1's input energy ``trace(P C_1) / trace(C_1)``
outside M (what the next adapter's ``A`` can capture).

Run: ``python experiments/inflora_operating_point.py [--out experiments/results/inflora_operating_point.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn


def measure(energy: str, seed: int = 0) -> dict:
    from avalanche.training import Naive

    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.lora.subspace import collect_covariances
    from avalanche_merge.models import BACKBONES
    from avalanche_merge.plugins import HeadProtocolPlugin, LoRAPlugin
    from avalanche_merge.plugins.lora import experience_inputs

    torch.manual_seed(seed)
    bench = build_benchmark("split_mnist", seed=seed)
    spec = BACKBONES.get("tiny_vit")
    model = spec.build(spec.config_cls(), bench, seed)
    plugin = LoRAPlugin(method="inflora", options={"energy": energy})
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), train_mb_size=32,
                     train_epochs=2, eval_mb_size=256, criterion=nn.CrossEntropyLoss(), evaluator=None,
                     plugins=[HeadProtocolPlugin(protocol="per_task"), plugin])
    strategy.train(bench.train_stream[0])
    learner = plugin.learner
    strategy.experience = bench.train_stream[1]
    inputs = experience_inputs(strategy, learner.config.max_samples)
    covs = collect_covariances(model, learner.targets, inputs)
    layers = {}
    for name, memory in learner.memory.items():
        c = covs[name].double()
        outside = memory.project_out(torch.eye(c.shape[0], dtype=torch.float64))
        layers[name] = {"dim": c.shape[0], "frozen_directions": memory.rank,
                        "task1_energy_outside_memory": float(torch.trace(outside @ c) / torch.trace(c))}
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {energy: measure(energy) for energy in ("squared", "eigenvalues")}
    for energy, layers in result.items():
        frozen = [v["frozen_directions"] for v in layers.values()]
        seen = [v["task1_energy_outside_memory"] for v in layers.values()]
        print(f"{energy:12s} frozen directions {min(frozen)}-{max(frozen)} of {next(iter(layers.values()))['dim']}; "
              f"task 1 energy outside M {100 * min(seen):.0f}-{100 * max(seen):.0f}%")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
