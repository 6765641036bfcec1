"""Memory of the geometry analysis per experience: the old all-snapshots metric against the step store.

Each configuration runs in a fresh process: a TinyViT, E simulated experiences (every weight perturbed, as full
fine-tuning does), the real :class:`ParameterGeometryPluginMetric` driven through its ``before_training_exp`` /
``after_training_exp`` hooks, then ``report()``. Peak RSS above the process's footprint before the metric is
sampled with psutil, at E = 3 and E = ``--experiences``; the marginal memory per experience is the slope between
the two (the fixed part: the last snapshot, the report's SVDs, allocator slack). RSS also counts the page cache of
the memory-mapped step files of ``disk`` storage, which the kernel can reclaim. ``old`` re-creates the metric
before issue 15 (a fp32 snapshot per experience and every step and cumulative vector rebuilt after each one).
A ViT-B/16 estimate is computed from its parameter count (timm's ``vit_base_patch16_224`` built on the meta
device) and the measured bytes per parameter.

    python experiments/geometry_memory.py            # writes experiments/results/geometry_memory/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "geometry_memory"
MODES = {"old": {}, "memory-fp32": {"storage": "memory", "dtype": "float32"},
         "memory-fp16": {"storage": "memory", "dtype": "float16"}, "disk-fp16": {"storage": "disk", "dtype": "float16"}}
MODELS = {"tiny_vit (bench)": {"dim": 64, "depth": 4, "heads": 4}, "vit d256x6": {"dim": 256, "depth": 6, "heads": 8}}


def child(mode: str, model_cfg: dict, experiences: int) -> dict:
    import gc
    import types

    import torch

    from avalanche_merge.analysis.geometry import geometry_report, task_vectors
    from avalanche_merge.evaluation.parameter_geometry import ParameterGeometryPluginMetric
    from avalanche_merge.models.vit import TinyViT, TinyViTConfig
    from avalanche_merge.runner.run import peak_rss_sampler

    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(**model_cfg))
    n_params = sum(p.numel() for p in model.parameters())
    strategy = types.SimpleNamespace(model=model, clock=types.SimpleNamespace(train_iterations=0),
                                     experience=types.SimpleNamespace(current_experience=0))
    gc.collect()
    with peak_rss_sampler(0.005) as base:
        pass
    with peak_rss_sampler(0.005) as rss:
        if mode == "old":
            snaps = []
            from avalanche_merge.analysis.geometry import effective_state

            snaps.append(effective_state(model))
            for _ in range(experiences):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3 * torch.randn_like(p))
                snaps.append(effective_state(model))
                steps, cumulative = task_vectors(snaps)
                del steps, cumulative
            geometry_report(snaps)
        else:
            metric = ParameterGeometryPluginMetric(**MODES[mode])
            metric.before_training_exp(strategy)
            for i in range(experiences):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3 * torch.randn_like(p))
                strategy.experience.current_experience = i
                metric.after_training_exp(strategy)
            metric.report()
            metric.reset()
    extra = rss["peak_mb"] - base["peak_mb"]
    return {"mode": mode, "params": n_params, "model_mib": 4 * n_params / 2**20, "experiences": experiences,
            "peak_extra_mib": extra, "per_experience_mib": extra / experiences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiences", type=int, default=12)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], MODELS[args.child[1]], args.experiences)))
        return
    def measure(mode: str, model_name: str, experiences: int) -> dict:
        out = subprocess.run([sys.executable, __file__, "--experiences", str(experiences), "--child", mode,
                              model_name], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for model_name in MODELS:
        for mode in MODES:
            small, row = measure(mode, model_name, 3), measure(mode, model_name, args.experiences)
            row = {"model": model_name, **row, "peak_extra_mib_e3": small["peak_extra_mib"],
                   "marginal_mib": (row["peak_extra_mib"] - small["peak_extra_mib"]) / (args.experiences - 3)}
            rows.append(row)
            print(f"{model_name:<18} {mode:<12} model {row['model_mib']:6.1f} MiB  "
                  f"peak +{row['peak_extra_mib']:7.1f} MiB  marginal {row['marginal_mib']:6.1f} MiB per experience",
                  flush=True)
    import timm
    import torch

    with torch.device("meta"):
        vitb = sum(p.numel() for p in timm.create_model("vit_base_patch16_224", num_classes=100).parameters())
    big = [r for r in rows if r["model"] == "vit d256x6"]
    estimate = {r["mode"]: r["peak_extra_mib"] / r["params"] * vitb / 1024 for r in big}  # GiB at E experiences
    marginal = {r["mode"]: r["marginal_mib"] / r["params"] * vitb / 1024 for r in big}  # GiB per experience
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "geometry_memory.json").write_text(json.dumps({"rows": rows, "vit_b16_params": vitb,
                                                          "vit_b16_estimate_gib": estimate,
                                                          "vit_b16_marginal_gib": marginal}, indent=2))
    e = args.experiences
    lines = [f"| model | storage | model (MiB) | peak extra, E=3 (MiB) | peak extra, E={e} (MiB) | marginal per "
             f"experience (MiB) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['mode']} | {r['model_mib']:.1f} | {r['peak_extra_mib_e3']:.0f} | "
              f"{r['peak_extra_mib']:.0f} | {r['marginal_mib']:.1f} |" for r in rows]
    lines += ["", f"ViT-B/16 ({vitb / 1e6:.1f} M parameters, {4 * vitb / 2**20:.0f} MiB fp32), scaled by parameter "
              f"count from the d256x6 rows: peak at E={e}: "
              + ", ".join(f"{k} {v:.1f} GiB" for k, v in estimate.items())
              + "; per experience: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in marginal.items())]
    (OUT / "geometry_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
