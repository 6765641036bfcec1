"""Training step time, peak memory and estimated FLOPs saving of the sparse learners vs dense training.

What is measured (CPU unless ``--device``, fp32, seeded random images and labels):

- **Model**: a TinyViT (``--dim`` 192, ``--depth`` 6, ``--heads`` 3, 4x4 patches of 28x28 inputs: 49 tokens + CLS),
  built and fed by the same code as ``experiments/lora_speed.py``; batch ``--batch`` 32.
- **References**, each in its own worker process: ``dense`` trains exactly the parameters a sparse learner
  trains (every ``nn.Linear`` weight of the backbone and the head; the learner's ``begin_task`` picks them) with no
  masking, so the ratio to it is the cost of masking alone; ``full_finetune`` trains every parameter (context).
- **Learners**: every registered sparse learner (``avalanche_merge.sparse.list_sparse_learners()``), density
  ``--density``, mask criterion ``--criterion`` where the learner has one. One timed step: forward,
  cross-entropy, backward, ``learner.after_backward()`` (gradient masks), ``learner.before_step()``, AdamW step,
  ``learner.after_step()`` (entries outside the mask restored bit for bit). Median over ``--steps`` steps after 3
  warm-up steps, on the first of ``--tasks`` tasks (later tasks only change which entries are masked).
  ``setup_s``: median over tasks of ``begin_task`` + ``end_task`` (mask selection), once per task, not per step.
- **Memory**: peak RSS increase over the RSS after building the model (``VmHWM`` reset through
  ``/proc/self/clear_refs``, :mod:`proc_memory`); with ``--device cuda`` the CUDA peak allocated memory instead.
  For the learners it covers the whole worker: mask selection (scores over ``--tasks`` tasks), masks, the
  step guard and the training steps.
- **FLOPs**: :func:`avalanche_merge.evaluation.sparsity.learner_flops_saving`, the fraction of the step's linear
  FLOPs (forward + input gradient + weight gradient, ~6 N in out per layer) that a kernel computing only the
  masked weight-gradient entries could skip, rows per layer measured by hooks on the first timed step. It is an
  estimate of what sparsity permits; the learners compute dense gradients and mask them, which the step time shows.

Run::

    python experiments/sparse_speed.py [--out experiments/results/sparse_speed.json] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lora_speed import batches, build, sync
from proc_memory import add_worker_arguments, peak_record, reset_peak_rss, rss_bytes, run_workers, trim_heap

REFERENCES = ("dense", "full_finetune")


def time_steps(args, model, params, data, learner=None, on_first=None) -> float:
    """Median time of one training step (AdamW); with ``learner``, its gradient masks and step guard included."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(args.steps + 3):
        x, y = data[i % len(data)]
        sync(args)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if learner is not None:
            learner.after_backward()
            learner.before_step()
        opt.step()
        if learner is not None:
            learner.after_step()
        sync(args)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_learner(args, name, model):
    from avalanche_merge.sparse import SPARSE_LEARNERS, make_sparse_learner

    fields = {f.name for f in dataclasses.fields(SPARSE_LEARNERS.get(name).config_cls)}
    options = {k: v for k, v in (("density", args.density), ("criterion", args.criterion)) if k in fields}
    return make_sparse_learner(name, model, **options)


def worker(args) -> dict:
    from avalanche_merge.evaluation.sparsity import learner_flops_saving, linear_layers, record_linear_rows

    torch.set_num_threads(args.threads)
    model = build(args)
    trim_heap()
    reset_ok = reset_peak_rss()
    rss0 = rss_bytes()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = {"method": args.worker}
    if args.worker == "full_finetune":
        out["step_s"] = time_steps(args, model, list(model.parameters()), batches(args, 0))
        out["setup_s"] = 0.0
    elif args.worker == "dense":
        from avalanche_merge.sparse import make_sparse_learner

        # a throw-away learner only picks the parameters the learners train (requires_grad set); no masking after
        params = make_sparse_learner("masked", model, density=args.density, criterion="random").begin_task()
        trim_heap()
        reset_ok = reset_peak_rss()
        rss0 = rss_bytes()
        out["step_s"] = time_steps(args, model, params, batches(args, 0))
        out["setup_s"] = 0.0
    else:
        learner = make_learner(args, args.worker, model)
        setup = []
        for task in range(args.tasks):
            data = batches(args, task)
            t0 = time.perf_counter()
            params = learner.begin_task(data)
            setup.append(time.perf_counter() - t0)
            if task == 0:
                with record_linear_rows(model) as rows:
                    out["step_s"] = time_steps(args, model, params, data, learner)
                flops = learner_flops_saving(learner, linear_layers(model, rows))
                out["density"] = sum(int(m.sum()) for m in learner.masks.values()) / sum(
                    m.numel() for m in learner.masks.values())
                out.update(flops_saved_fraction=flops["fraction"], saved_gflops_per_step=flops["saved_flops"] / 1e9,
                           linear_gflops_per_step=flops["dense_flops"] / 1e9)
            t0 = time.perf_counter()
            learner.end_task()
            setup[-1] += time.perf_counter() - t0
        out["setup_s"] = statistics.median(setup)
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out.update(peak_record(args.device, rss0, reset_ok))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_worker_arguments(parser, tasks=2, methods_help="comma-separated sparse learners (default: all registered)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--criterion", default="gradient")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from avalanche_merge.sparse import list_sparse_learners

    methods = list(REFERENCES) + (args.methods.split(",") if args.methods else list_sparse_learners())
    rows = run_workers(__file__, methods, args)
    ref = next(r for r in rows if r["method"] == "dense")
    for r in rows:
        if "step_s" in r and "step_s" in ref:
            r["step_ratio_vs_dense"] = r["step_s"] / ref["step_s"]
            r["peak_mb_over_dense"] = r["peak_mb"] - ref["peak_mb"]
    result = {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "torch": torch.__version__,
              "machine": platform.platform(), "rows": rows}
    print(f"{'method':14s} {'step ms':>8s} {'x dense':>8s} {'setup s':>8s} {'peak MB':>8s} {'+MB':>7s} "
          f"{'density':>8s} {'FLOPs saved':>11s} {'trainable':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:14s} error: {r['error']}")
            continue
        density = f"{r['density']:8.3f}" if "density" in r else f"{'-':>8s}"
        saved = f"{r['flops_saved_fraction']:11.3f}" if "flops_saved_fraction" in r else f"{'-':>11s}"
        print(f"{r['method']:14s} {1e3 * r['step_s']:8.2f} {r.get('step_ratio_vs_dense', float('nan')):8.2f} "
              f"{r['setup_s']:8.2f} {r['peak_mb']:8.1f} {r.get('peak_mb_over_dense', float('nan')):7.1f} "
              f"{density} {saved} {r['trainable_params']:10d}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
