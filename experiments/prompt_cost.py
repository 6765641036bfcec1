"""Cost of the prompt methods (two forward passes each) against plain fine-tuning (Naive) on the same ViT.

What is measured (CPU, fp32, seeded random 28x28 images, one thread unless ``--threads``):

- **Model**: the bench's TinyViT shape (``--dim`` 64, ``--depth`` 4, ``--heads`` 4, 7x7 patches: 16 tokens + CLS),
  random weights (timing does not depend on them), 10 classes, batch ``--batch`` 32.
- **naive**: one training step of full fine-tuning (forward, cross-entropy, backward, Adam step on every
  parameter) and one inference forward.
- **l2p / dualprompt / coda_prompt**: the models of :mod:`avalanche_merge.prompts` at their default configs (the
  bench's: L2P 5 x 5 prompt tokens, DualPrompt G in blocks 0-1 and E in 2-3, CODA 10 components per task in
  blocks 0-3, at the second task so CODA has two slices): one training step (frozen query pass + prompted pass,
  cross-entropy minus the pull term, backward, Adam step on prompts and head) and one inference forward (both
  passes).
- The methods are interleaved in rounds (``--rounds`` x ``--steps`` timed calls after warm-up) and the median is
  kept, so machine load hits them alike; the ratios to naive are measured in the same run. Absolute times on a
  shared machine are not comparable across runs; the ratios are the result.

Run::

    python experiments/prompt_cost.py [--out experiments/results/prompt_cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.prompts import CodaPromptModel, DualPromptModel, L2PModel

N_TASKS = 5


def build(method: str, cfg: TinyViTConfig):
    torch.manual_seed(0)
    backbone = TinyViT(cfg)
    if method == "naive":
        return backbone, list(backbone.parameters())
    if method == "l2p":
        model = L2PModel(backbone, cfg.num_classes)
    elif method == "dualprompt":
        model = DualPromptModel(backbone, cfg.num_classes, n_tasks=N_TASKS)
    else:
        model = CodaPromptModel(backbone, cfg.num_classes, n_tasks=N_TASKS)
    model.begin_task(1)
    return model, model.trainable_parameters()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/results/prompt_cost.json")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TinyViTConfig(dim=args.dim, depth=args.depth, heads=args.heads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    methods = ("naive", "l2p", "dualprompt", "coda_prompt")
    built = {m: build(m, cfg) for m in methods}
    opts = {m: torch.optim.Adam(p, lr=1e-3) for m, (_, p) in built.items()}

    def train_step(m):
        model = built[m][0].train()
        loss = F.cross_entropy(model(x), y)
        pull = getattr(model, "last_pull", None)
        if pull is not None:
            loss = loss - 0.1 * pull
        opts[m].zero_grad()
        loss.backward()
        opts[m].step()

    @torch.no_grad()
    def infer(m):
        built[m][0].eval()(x)

    times = {m: {"train": [], "infer": []} for m in methods}
    for m in methods:  # warm-up
        for _ in range(3):
            train_step(m)
            infer(m)
    for _ in range(args.rounds):
        for m in methods:
            for kind, fn in (("train", train_step), ("infer", infer)):
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    fn(m)
                    times[m][kind].append(time.perf_counter() - t0)
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    result = {
        "what": "median seconds per training step / inference forward, batch of random 28x28 images; ratios to "
                "naive (full fine-tuning) measured in the same interleaved run",
        "config": vars(args) | {"n_tasks": N_TASKS, "torch": torch.__version__, "machine": platform.machine()},
        "trainable_params": {m: sum(p.numel() for p in built[m][1]) for m in methods},
        "median_s": med,
        "ratio_to_naive": {m: {k: med[m][k] / med["naive"][k] for k in ("train", "infer")} for m in methods},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for m in methods:
        r = result["ratio_to_naive"][m]
        print(f"{m:12s} train {med[m]['train'] * 1e3:7.2f} ms ({r['train']:.2f}x)  "
              f"infer {med[m]['infer'] * 1e3:7.2f} ms ({r['infer']:.2f}x)  trainable {result['trainable_params'][m]}")


if __name__ == "__main__":
    main()
