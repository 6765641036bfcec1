"""Task-retrieval accuracy, fit time and routing latency of each task-signature option (issue 14).

Three measurements, one JSON file each under ``--out`` (default ``experiments/results/signatures``), plus a
markdown table ``signatures.md``:

1. ``real.json``: retrieval accuracy on real embeddings of ``domain_mnist`` and ``split_mnist``. The
   embeddings are those the routed methods (CoLoR, Proteus) fit their signatures on: the pretrained ``tiny_vit``
   backbone of the runner (``model.features``, every adapter inactive), on the up to 512 training inputs per
   experience that ``RoutedPlugin`` passes to ``end_task`` (``plugins.routed.experience_batches``, default
   ``max_samples``). Routed: every test image of the stream; accuracy = share routed to its own experience.
   Benchmark seeds 0, 1, 2 (each draws its own images and, for ``split_mnist``, its own class split).
2. ``synthetic_768.json``: fit time per task and routing latency per batch of 256 at embedding size 768 with 10
   tasks of 512 samples (about the CLIP ViT-B regime): Gaussian tasks that differ mostly by
   their covariances, each a random rotation (not axis-aligned) of one decaying spectrum, plus a small random
   mean; 200 test samples per task give the retrieval accuracy.
3. ``outside_subspace.json``: four tasks in 64 dimensions that share their distribution inside a random
   32-dimensional subspace (where task 0 varies most) and differ only by mean shifts (2, 4 or 8; noise sd 0.5)
   orthogonal to it: a PCA-32 fitted on task 0 keeps only the subspace where the tasks are identical.

Options (``SignatureConfig`` fields): the old default (PCA-32 fitted on task 0 + diagonal covariance), PCA-32 +
full, a full-rank PCA rotation + diagonal, diagonal and full without projection, Ledoit-Wolf (5 and 1 components)
and OAS shrinkage, and k-means centroids (CoLoR) with and without the PCA-32. The current default is marked.

Run (about 6 minutes on one core)::

    OMP_NUM_THREADS=1 python experiments/signature_retrieval.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import sklearn
import torch

OPTIONS = {
    "old default: pca32 + diag": {"reduce": "pca", "dim": 32, "covariance_type": "diag"},
    "pca32 + full": {"reduce": "pca", "dim": 32, "covariance_type": "full"},
    "pca rotation + diag": {"reduce": "pca", "dim": 100_000, "covariance_type": "diag"},
    "diag": {"covariance_type": "diag"},
    "full": {"covariance_type": "full"},
    "ledoit_wolf": {"covariance_type": "ledoit_wolf"},
    "oas": {"covariance_type": "oas"},
    "ledoit_wolf, 1 component": {"covariance_type": "ledoit_wolf", "n_components": 1},
    "centroid, pca32 (old CoLoR default)": {"method": "centroid", "reduce": "pca", "dim": 32},
    "centroid, no projection": {"method": "centroid"},
}


def label(name: str) -> str:
    """The option's name, marked when it is the current ``SignatureConfig()`` default."""
    from avalanche_merge.retrieval import SignatureConfig

    return f"**{name} (default)**" if SignatureConfig(**OPTIONS[name]) == SignatureConfig() else name


def evaluate(train: list[np.ndarray], test: list[np.ndarray], options: dict, batch: int, repeats: int) -> dict:
    """Fit one signature per task with ``options``; retrieval accuracy, fit times, routing latency, fallbacks."""
    from avalanche_merge.retrieval import SignatureConfig, TaskSignatures

    sig = TaskSignatures(config=SignatureConfig(**options))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in train:
            sig.add_task(x)
    per_task = [float((sig.route(x).numpy() == t).mean()) for t, x in enumerate(test)]
    n = sum(len(x) for x in test)
    queries = np.concatenate(test)[:batch]
    latency = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sig.route(queries)
        latency.append(time.perf_counter() - t0)
    return {
        "options": options,
        "retrieval_acc": sum(a * len(x) for a, x in zip(per_task, test)) / n,
        "per_task_acc": per_task,
        "fit_s_per_task": sig.fit_seconds,
        "fit_s_total": sum(sig.fit_seconds),
        "route_ms_per_batch": 1e3 * statistics.median(latency),
        "batch": len(queries),
        "projection_dim": None if sig.projection is None else int(sig.projection.n_components_),
        "fitted": sig.fitted,
        "warnings": sorted({str(w.message) for w in caught}),
    }


def real_embeddings(name: str, max_samples: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pretrained tiny-ViT features of the routed methods' training inputs and of every test image."""
    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.models.backbones import BACKBONES, TinyViTOptions
    from avalanche_merge.plugins.routed import experience_batches

    bench = build_benchmark(name, seed=seed)
    model = BACKBONES.get("tiny_vit").build(TinyViTOptions(), bench, seed).eval()
    train, test = [], []
    with torch.no_grad():
        for exp in bench.scenario.train_stream:
            xs, _ = experience_batches(SimpleNamespace(experience=exp, device="cpu", train_mb_size=256), max_samples)
            train.append(torch.cat([model.features(x) for x in xs]).double().numpy())
        for exp in bench.scenario.test_stream:
            ds = exp.dataset.eval()
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            test.append(model.features(x).double().numpy())
    return train, test


def synthetic_768(seed: int = 0, d: int = 768, tasks: int = 10, n: int = 512, n_test: int = 200):
    """Tasks that differ mostly by a random rotation of one decaying covariance spectrum (plus a small mean)."""
    g = np.random.default_rng(seed)
    spectrum = 4.0 / (1.0 + np.arange(d) / 8.0)
    train, test = [], []
    for _ in range(tasks):
        rotation = np.linalg.qr(g.standard_normal((d, d)))[0]
        factor = rotation * np.sqrt(spectrum)  # covariance rotation diag(spectrum) rotation^T
        mean = 0.05 * g.standard_normal(d)
        train.append(mean + g.standard_normal((n, d)) @ factor.T)
        test.append(mean + g.standard_normal((n_test, d)) @ factor.T)
    return train, test


def outside_subspace(
    shift: float, seed: int = 0, d: int = 64, k: int = 32, tasks: int = 4, n: int = 300, n_test: int = 200
):
    """Tasks identical inside a random k-dim subspace (variance 1-4) and shifted by ``shift`` along their own
    direction orthogonal to it (noise sd 0.5 there): they differ only outside task 0's principal subspace."""
    g = np.random.default_rng(seed)
    basis = np.linalg.qr(g.standard_normal((d, d)))[0]
    inside, outside = basis[:, :k], basis[:, k:]
    scale = np.linspace(2.0, 1.0, k)

    def sample(t: int, m: int) -> np.ndarray:
        offset = shift * outside[:, t - 1] if t else np.zeros(d)
        out = 0.5 * g.standard_normal((m, d - k)) @ outside.T
        return (g.standard_normal((m, k)) * scale) @ inside.T + out + offset

    return [sample(t, n) for t in range(tasks)], [sample(t, n_test) for t in range(tasks)]


def table(title: str, rows: dict) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| option | retrieval acc | fit s (all tasks) | route ms / batch | fallbacks |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        falls = sorted({f["fallback"].split(":")[0] for f in r["fitted"] if f["fallback"]})
        lines.append(
            f"| {label(name)} | {r['retrieval_acc']:.3f} | {r['fit_s_total']:.2f} | {r['route_ms_per_batch']:.1f} "
            f"| {'; '.join(falls) or '-'} |"
        )
    return [*lines, ""]


def real_table(title: str, per_seed: dict) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| option | retrieval acc (mean +- sd over seeds) | per seed | fit s (all tasks) "
        "| route ms / batch | fallbacks |",
        "|---|---:|---|---:|---:|---|",
    ]
    for name in OPTIONS:
        rows = [per_seed[s][name] for s in per_seed]
        accs = [r["retrieval_acc"] for r in rows]
        falls = sorted({f["fallback"].split(":")[0] for r in rows for f in r["fitted"] if f["fallback"]})
        lines.append(
            f"| {label(name)} | {np.mean(accs):.3f} +- {np.std(accs):.3f} | {', '.join(f'{a:.3f}' for a in accs)} "
            f"| {np.mean([r['fit_s_total'] for r in rows]):.2f} "
            f"| {np.mean([r['route_ms_per_batch'] for r in rows]):.1f} | {'; '.join(falls) or '-'} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="experiments/results/signatures")
    parser.add_argument("--max-samples", type=int, default=512, help="RoutedLoRAConfig.max_samples default")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="benchmark seeds (real embeddings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": vars(args),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "machine": platform.platform(),
        "processor": platform.processor(),
    }
    md = [
        "# Task-signature options: retrieval accuracy, fit time, routing latency",
        "",
        "Made by `experiments/signature_retrieval.py` (see its docstring for the data); one thread of a shared "
        "2-core machine with other jobs running, so times vary by up to 2x between runs. Fallbacks: "
        "tasks where a requested setting was changed (warned and recorded in `TaskSignatures.fitted`).",
        "",
    ]
    sections = {}
    for name in ("domain_mnist", "split_mnist"):
        per_seed = {}
        for seed in args.seeds:
            train, test = real_embeddings(name, args.max_samples, seed)
            per_seed[seed] = {k: evaluate(train, test, v, args.batch, args.repeats) for k, v in OPTIONS.items()}
        data = {
            "tasks": len(train),
            "train_per_task": [len(x) for x in train],
            "test_per_task": [len(x) for x in test],
            "dim": int(train[0].shape[1]),
        }
        sections[name] = {"data": data, "per_seed": per_seed}
        md += real_table(
            f"`{name}` (pretrained tiny ViT features, d = {data['dim']}, {data['tasks']} tasks, "
            f"{data['train_per_task'][0]} fitting / {data['test_per_task'][0]} test samples per task, "
            f"benchmark seeds {', '.join(map(str, args.seeds))})",
            per_seed,
        )
        print(f"{name} done", flush=True)
    (out / "real.json").write_text(json.dumps({**meta, "results": sections}, indent=1))
    train, test = synthetic_768()
    rows = {k: evaluate(train, test, v, args.batch, args.repeats) for k, v in OPTIONS.items()}
    (out / "synthetic_768.json").write_text(json.dumps({**meta, "results": rows}, indent=1))
    md += table(
        "synthetic, d = 768, 10 tasks x 512 fitting / 200 test samples (random rotations of one spectrum)", rows
    )
    shifted = {}
    for shift in (2.0, 4.0, 8.0):
        train, test = outside_subspace(shift)
        shifted[str(shift)] = rows = {k: evaluate(train, test, v, args.batch, args.repeats) for k, v in OPTIONS.items()}
        md += table(
            f"synthetic, tasks differ only outside task 0's principal subspace (d = 64, 4 tasks x 300 "
            f"samples, shift {shift:g}, noise sd 0.5; chance 0.25)",
            rows,
        )
    (out / "outside_subspace.json").write_text(json.dumps({**meta, "results": shifted}, indent=1))
    (out / "signatures.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
