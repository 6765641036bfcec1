"""Fit time per task and routing latency per batch of the task signatures, on real embeddings.

Embeddings: the pretrained tiny ViT's features (``model.features``) of ``split_mnist``'s five experiences (up to
``--max-train`` training images each to fit, the test images to route). For each signature method (DP-GMM with
diagonal covariance, k-means centroids): the fit time of each task's signature, the retrieval accuracy over the
test stream, and the median latency of routing one batch of ``--batch`` embeddings after all tasks (``--repeats``
repeats). For context, the median latency of one backbone forward pass over the same batch of images: a routed
model (CoLoR, Proteus) runs the backbone once to embed and once more with the chosen task's adapter.

Routed inference (``--routed-tasks``, default ``1,2,4,8``; ``''`` skips it): a CoLoR and a Proteus
:class:`~avalanche_merge.retrieval.routed.RoutedLoRA` on the pretrained tiny ViT's architecture (random weights: the
cost does not depend on the values), LoRA rank 8 on ``q``, ``k``, ``v``, with T tasks whose inputs are offset so
that the k-means signatures route a batch of ``--batch`` images (equal shares of every task) to all T tasks. The
median latency of ``model(x)`` (eval, no grad: the routing embedding pass plus the adapted pass) with one adapted
pass for the whole batch (``batch_tasks=True``) and with one pass per task (``False``, the implementation before
issue 19), in the same run, alternating.

Run::

    python experiments/retrieval_speed.py [--out experiments/results/retrieval_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def stream_tensors(stream, limit=None):
    out = []
    for exp in stream:
        ds = exp.dataset.eval()
        n = len(ds) if limit is None else min(limit, len(ds))
        out.append(torch.stack([ds[i][0] for i in range(n)]))
    return out


def routed_latency(task_counts: list[int], batch: int, repeats: int) -> list[dict]:
    """Median routed-inference latency per batch vs the number of tasks, batched and per-task passes."""
    from avalanche_merge.models.pretrain import PretrainConfig
    from avalanche_merge.models.vit import TinyViT
    from avalanche_merge.retrieval.routed import CoLoRConfig, ProteusConfig, RoutedLoRA

    rows = []
    for label, config_cls in (("color", CoLoRConfig), ("proteus", ProteusConfig)):
        for tasks in task_counts:
            torch.manual_seed(0)
            model = RoutedLoRA(TinyViT(PretrainConfig().vit), config=config_cls(
                n_components=2, target_modules=("q", "k", "v"), head_type="linear"), num_classes=2 * tasks)
            g = torch.Generator().manual_seed(0)
            data = [torch.randn(batch // tasks + 1, 1, 28, 28, generator=g) + 4.0 * t for t in range(tasks)]
            for t, x in enumerate(data):
                model.begin_task([2 * t, 2 * t + 1])
                model.end_task([x])
            model.eval()
            x = torch.cat(data)[torch.randperm(sum(len(d) for d in data), generator=g)][:batch]
            times: dict[bool, list[float]] = {True: [], False: []}
            with torch.no_grad():
                for batched in (True, False):  # warm-up
                    model.batch_tasks = batched
                    model(x)
                routed = int(model.last_routed.unique().numel())
                for _ in range(repeats):
                    for batched in (True, False):
                        model.batch_tasks = batched
                        t0 = time.perf_counter()
                        model(x)
                        times[batched].append(time.perf_counter() - t0)
            row = {"method": label, "tasks": tasks, "tasks_in_batch": routed,
                   "batched_ms": 1e3 * statistics.median(times[True]),
                   "per_task_ms": 1e3 * statistics.median(times[False])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-train", type=int, default=500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--routed-tasks", default="1,2,4,8", help="task counts of the routed-inference timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.models.pretrain import pretrained_tiny_vit
    from avalanche_merge.retrieval import SignatureConfig, TaskSignatures

    bench = build_benchmark("split_mnist", seed=0)
    model, _ = pretrained_tiny_vit(progress=False)
    model.eval()
    train = stream_tensors(bench.scenario.train_stream, args.max_train)
    test = stream_tensors(bench.scenario.test_stream)
    with torch.no_grad():
        train_f = [model.features(x) for x in train]
        test_f = [model.features(x) for x in test]
        images = torch.cat(test)[: args.batch]
        forward = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(images)
            forward.append(time.perf_counter() - t0)
    rows = []
    for method in ("dpgmm", "centroid"):
        sig = TaskSignatures(config=SignatureConfig(method=method, seed=0))
        for f in train_f:
            sig.add_task(f)
        routed = [sig.route(f) for f in test_f]
        correct = sum(int((r == t).sum()) for t, r in enumerate(routed))
        batch = torch.cat(test_f)[: args.batch]
        latency = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sig.route(batch)
            latency.append(time.perf_counter() - t0)
        rows.append({"method": method, "fit_s_per_task": sig.fit_seconds,
                     "retrieval_acc": correct / sum(len(f) for f in test_f),
                     "route_ms_per_batch": 1e3 * statistics.median(latency)})
        print(json.dumps(rows[-1]), flush=True)
    counts = [int(c) for c in args.routed_tasks.split(",") if c.strip()]
    routed = routed_latency(counts, args.batch, args.repeats) if counts else []
    result = {"config": vars(args), "torch": torch.__version__, "machine": platform.platform(),
              "backbone_forward_ms_per_batch": 1e3 * statistics.median(forward), "rows": rows, "routed": routed}
    print(f"backbone forward per batch of {args.batch}: {result['backbone_forward_ms_per_batch']:.1f} ms")
    for r in rows:
        fits = ", ".join(f"{t:.3f}" for t in r["fit_s_per_task"])
        print(f"{r['method']:9s} retrieval {r['retrieval_acc']:.3f}  fit s/task [{fits}]  "
              f"route {r['route_ms_per_batch']:.2f} ms/batch")
    for r in routed:
        print(f"{r['method']:8s} T={r['tasks']}: batched {r['batched_ms']:.1f} ms, one pass per task "
              f"{r['per_task_ms']:.1f} ms ({r['tasks_in_batch']} tasks in the batch)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
