"""GPU figures on a full-size ViT-B/16 (random weights: cost does not depend on the values), in one prepared run.

What is measured (on ``--device``, default ``cuda`` when available; each section resets the CUDA peak-memory
counter and reports ``torch.cuda.max_memory_allocated``; times are medians after a warm-up, with
``torch.cuda.synchronize`` around each timed call):

1. **Merges** (reuses ``merge_speed.py``'s inputs): ``--tasks`` 8 ViT-B/16-shaped fp32 task vectors (HF CLIP
   names, about 86M values each) on the device; task arithmetic, averaging, MagMax, TIES (density 0.2,
   per-tensor trim) against the copy floor (copying every input once); one OPCM projection per ViT-B/16 linear
   shape, and one whole OPCM ``update`` (task 2 merged into task 1: every linear layer projected).
2. **LoRA learners vs plain peft LoRA**: ``timm_vit``'s ViT-B/16 at 224 px, LoRA rank 10 on ``q``, ``k``, ``v``,
   batch ``--lora-batch``; one training step (forward, loss + penalty, backward, ``after_backward``, AdamW step)
   on the first and on the last of ``--lora-tasks`` tasks, per-task setup time, peak memory, trainable values.
3. **One epoch of a paper protocol**: InfLoRA on ViT-B/16, 224 px, batch 128, ``--epoch-images`` synthetic
   images of 10 classes (one Split CIFAR-100 experience's shape), Adam 5e-4, through the registered Avalanche
   strategy exactly as the runner builds it, in fp32 and bf16 (and fp16 on CUDA); images/s, peak memory, and the
   evaluation of ``--eval-images`` test images.

``--tiny`` swaps in a small model and few steps so that the whole script runs end to end on a CPU (about 90 s on
2 busy cores; the figures then mean nothing, it checks the script). Results go to ``--out`` (default
``$OUT/gpu_figures.json`` when ``$OUT`` is set, else ``experiments/results/gpu/gpu_figures.json``).

Run::

    python experiments/gpu_figures.py                 # on a GPU machine, < 8 minutes on an H200
    python experiments/gpu_figures.py --tiny --out /tmp/gpu_tiny.json   # end-to-end check on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import build_task_vectors, ours_merge, vit_b16_shapes  # noqa: E402

MIB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# 1. merges ----------------------------------------------------------------------------------------------------------
def merges(args, device: torch.device) -> dict:
    from avalanche_merge.merging import OPCM, TaskVector, opcm_project

    reset_peak(device)
    tvs = [TaskVector({k: v.to(device) for k, v in tv.items()})
           for tv in build_task_vectors(args.blocks, args.tasks, seed=0)]
    n_values = sum(v.numel() for _, v in tvs[0].items())
    buffers = {k: torch.empty_like(v) for k, v in tvs[0].items()}

    def copy_all():
        for tv in tvs:
            for k, v in tv.items():
                buffers[k].copy_(v)

    floor_s, _ = timed(copy_all, device, args.repeats)
    out = {"tasks": args.tasks, "values_per_task": n_values, "copy_floor_s": floor_s,
           "copy_floor_gb_s": 2 * 4 * n_values * args.tasks / floor_s / 1e9, "merges": {}}
    for name in ("task_arithmetic", "average", "magmax", "ties"):
        reset_peak(device)
        merge = ours_merge(name)
        seconds, _ = timed(lambda merge=merge: merge(tvs), device, args.repeats)
        out["merges"][name] = {"s": seconds, "x_copy_floor": seconds / floor_s, "peak_mb": peak_mb(device)}
    g = torch.Generator(device=device).manual_seed(1)
    shapes = sorted({s for k, s in vit_b16_shapes(args.blocks).items() if ".encoder." in k and len(s) == 2})
    out["opcm_project"] = []
    for m, n in shapes:
        merged = torch.randn(m, n, generator=g, device=device) * 1e-3
        task = torch.randn(m, n, generator=g, device=device) * 1e-3
        seconds, _ = timed(lambda a=merged, b=task: opcm_project(a, b, 0.5), device, args.repeats)
        out["opcm_project"].append({"shape": [m, n], "s": seconds})

    def opcm_step():
        merger = OPCM(alpha=0.5)
        merger.update(tvs[0])
        sync(device)
        t0 = time.perf_counter()
        merger.update(tvs[1])
        sync(device)
        return time.perf_counter() - t0

    reset_peak(device)
    opcm_step()
    out["opcm_update_s"] = statistics.median(opcm_step() for _ in range(args.repeats))
    out["opcm_update_peak_mb"] = peak_mb(device)
    tvs.clear()  # free the device memory before the next section
    buffers.clear()
    return out


# 2. LoRA learners -------------------------------------------------------------------------------------------------
def vit_model(args, device: torch.device, num_classes: int):
    from avalanche_merge.models.timm_vit import build_vit, vit_config
    from avalanche_merge.models.vit import TinyViTConfig

    torch.manual_seed(0)
    if args.tiny:
        config = TinyViTConfig(image_size=32, patch_size=16, in_chans=3, dim=64, depth=2, heads=2, mlp_ratio=4,
                               num_classes=num_classes)
    else:
        config = vit_config("vit_base_patch16_224", (3, 224, 224), num_classes)
    return build_vit(config).to(device)


def lora_step_time(args, device, model, params, data, learner=None) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(i=[0]):  # noqa: B006 - a step counter across calls
        x, y = data[i[0] % len(data)]
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        extra = learner.penalty() if learner is not None else None
        if extra is not None:
            loss = loss + extra
        loss.backward()
        if learner is not None:
            learner.after_backward()
        opt.step()
        if learner is not None:
            learner.after_step()

    for _ in range(2):
        step()
    seconds, _ = timed(step, device, args.steps)
    return seconds


def lora(args, device: torch.device) -> list[dict]:
    from avalanche_merge.lora import list_learners, make_learner

    size = 32 if args.tiny else 224
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.lora_batch, 3, size, size, generator=g).to(device),
             torch.randint(0, 10, (args.lora_batch,), generator=g).to(device)) for _ in range(2)]
    rows = []
    for name in ["peft_lora", *list_learners()]:
        reset_peak(device)
        model = vit_model(args, device, 10)
        row = {"method": name}
        try:
            if name == "peft_lora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(r=10, lora_alpha=10, target_modules=["q", "k", "v"],
                                                         modules_to_save=["head"]))
                params = [p for p in model.parameters() if p.requires_grad]
                row["step_s_first"] = row["step_s_last"] = lora_step_time(args, device, model, params, data)
            else:
                learner = make_learner(name, model, rank=10, target_modules=("q", "k", "v"))
                learner.set_stream_length(args.lora_tasks)
                setup = []
                for task in range(args.lora_tasks):
                    inputs = [x for x, _ in data]
                    sync(device)
                    t0 = time.perf_counter()
                    params = learner.begin_task(inputs)
                    sync(device)
                    setup.append(time.perf_counter() - t0)
                    if task in (0, args.lora_tasks - 1):
                        key = "step_s_first" if task == 0 else "step_s_last"
                        row[key] = lora_step_time(args, device, model, params, data, learner)
                    t0 = time.perf_counter()
                    learner.end_task(inputs)
                    sync(device)
                    setup[-1] += time.perf_counter() - t0
                row["setup_s"] = statistics.median(setup)
            row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row["peak_mb"] = peak_mb(device)
        except Exception as exc:  # noqa: BLE001 - one failing learner must not lose the others' figures
            row["error"] = repr(exc)
        rows.append(row)
        del model
    ref = rows[0].get("step_s_first")
    for row in rows:
        if ref and "step_s_first" in row:
            row["x_peft_first"], row["x_peft_last"] = row["step_s_first"] / ref, row["step_s_last"] / ref
    return rows


# 3. one epoch of a paper protocol ---------------------------------------------------------------------------------
class SyntheticImages(torch.utils.data.Dataset):
    """``n`` samples cycling over ``distinct`` seeded random images (so 5000 images need not all sit in memory)."""

    def __init__(self, n: int, distinct: int, size: int, classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(distinct, 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.n, self.distinct = n, distinct

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.images[i % self.distinct], int(self.labels[i])


def paper_epoch(args, device: torch.device, precision: str) -> dict:
    from avalanche_merge.benchmarks.base import Benchmark, as_classification_dataset, make_scenario
    from avalanche_merge.config import from_dict
    from avalanche_merge.runner.precision import enable_mixed_precision
    from avalanche_merge.runner.run import make_evaluator
    from avalanche_merge.strategies import METHODS
    from avalanche_merge.strategies.registry import BuildContext, TrainConfig

    size, classes = (32, 10) if args.tiny else (224, 10)
    train = SyntheticImages(args.epoch_images, min(args.epoch_images, 500), size, classes, seed=0)
    test = SyntheticImages(args.eval_images, min(args.eval_images, 200), size, classes, seed=1)
    sets = [as_classification_dataset(d, d.labels, 0) for d in (train, test)]
    bench = Benchmark(name="synthetic", scenario=make_scenario([sets[0]], [sets[1]]),
                      scenario_type="class_incremental", num_classes=classes, input_shape=(3, size, size),
                      class_names=[str(c) for c in range(classes)], experience_names=["task 0"])
    reset_peak(device)
    model = vit_model(args, device, classes)
    spec = METHODS.get("inflora")
    options = from_dict(spec.config_cls, {"rank": 10, "total_tasks": 10})
    train_cfg = TrainConfig(epochs=1, batch_size=args.epoch_batch, eval_batch_size=256, optimizer="adam", lr=5e-4)
    ctx = BuildContext(model=model, benchmark=bench, train=train_cfg, evaluator=make_evaluator([]),
                       device=device, seed=0)
    strategy = spec.build(ctx, options)
    enable_mixed_precision(strategy, precision)
    loader = {"num_workers": args.workers, "persistent_workers": args.workers > 0} if args.workers else {}
    sync(device)
    t0 = time.perf_counter()
    strategy.train(bench.train_stream[0], **loader)
    sync(device)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    strategy.eval(bench.test_stream, **loader)
    sync(device)
    eval_s = time.perf_counter() - t0
    return {"precision": precision, "images": args.epoch_images, "batch": args.epoch_batch, "train_epoch_s": train_s,
            "train_images_per_s": args.epoch_images / train_s, "eval_s": eval_s,
            "eval_images_per_s": args.eval_images / eval_s, "peak_mb": peak_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model and few steps (end-to-end check on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sections", default="merges,lora,epoch")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny
    vars(args).update(blocks=1 if tiny else 12, tasks=3 if tiny else 8, repeats=1 if tiny else 3,
                      steps=2 if tiny else 10, lora_batch=4 if tiny else 64, lora_tasks=2 if tiny else 5,
                      epoch_images=64 if tiny else 5000, eval_images=32 if tiny else 1000,
                      epoch_batch=16 if tiny else 128, workers=0 if tiny else 8)
    out_path = Path(args.out or (Path(os.environ["OUT"]) / "gpu_figures.json" if os.environ.get("OUT")
                                 else Path("experiments/results/gpu/gpu_figures.json")))
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "tiny": tiny,
              "config": {k: v for k, v in vars(args).items() if k != "out"}}
    sections = args.sections.split(",")
    t_all = time.perf_counter()

    def save():
        result["total_s"] = time.perf_counter() - t_all
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    if "merges" in sections:
        result["merges"] = merges(args, device)
        save()
        print(json.dumps(result["merges"], indent=1), flush=True)
    if "lora" in sections:
        result["lora"] = lora(SimpleNamespace(**vars(args)), device)
        save()
        for row in result["lora"]:
            print(row, flush=True)
    if "epoch" in sections:
        precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
        result["paper_epoch"] = [paper_epoch(args, device, p) for p in precisions]
        save()
        for row in result["paper_epoch"]:
            print(row, flush=True)
    print(f"wrote {out_path} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
