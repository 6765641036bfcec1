"""Analysis metrics inside any Avalanche strategy: the papers' forgetting metrics with held-out retention,
task-vector geometry and CKA representation drift, for Naive and EWC on four MNIST domains.

The three plugin metrics join Avalanche's own in one ``EvaluationPlugin``; they do not change what the strategy
trains. Held-out tasks are two domains never trained on (``identity``: the clean digits the tiny ViT was
pretrained on). Plots go to ``analysis_example/``.

Run: python examples/analysis_metrics.py   (under a minute on 2 CPU cores once the tiny ViT is cached)
"""

from pathlib import Path

import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import EWC, Naive
from avalanche.training.plugins import EvaluationPlugin

from avalanche_merge.analysis.analysis_plots import plot_cka_curves, plot_cosine_heatmap
from avalanche_merge.benchmarks import BENCHMARKS, build_benchmark
from avalanche_merge.evaluation import (
    ContinualMetricsPluginMetric,
    ParameterGeometryPluginMetric,
    RepresentationDriftPluginMetric,
)
from avalanche_merge.models.pretrain import pretrained_tiny_vit

out = Path("analysis_example")
options = {"domains": ["rotate_90", "flip_lr", "edges", "noise"]}
bench = build_benchmark("domain_mnist", seed=0, **options)
spec = BENCHMARKS.get("domain_mnist")
held_out = spec.held_out(spec.config_cls(**options), 0, ["identity", "rotate_180"], 200)
for name, cls, kwargs in (("naive", Naive, {}), ("ewc", EWC, {"ewc_lambda": 1000.0})):
    torch.manual_seed(0)
    model, _ = pretrained_tiny_vit()
    continual = ContinualMetricsPluginMetric(held_out=held_out)
    geometry = ParameterGeometryPluginMetric()
    drift = RepresentationDriftPluginMetric(bench.test_stream, probe_samples=128)
    strategy = cls(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                   criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, eval_mb_size=256,
                   evaluator=EvaluationPlugin(accuracy_metrics(stream=True), continual, geometry, drift, loggers=[]),
                   **kwargs)
    strategy.eval(bench.test_stream)  # the pretrained row: reference of forward transfer and retention
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream)
    c, g, d = continual.result(), geometry.report(), drift.report()
    cka_last = np.asarray(d["cka_pretrained"], dtype=float)[-1, -1]  # last block, after the last domain
    print(f"{name}: average accuracy {c['average_accuracy']:.3f}, BWT {c['bwt']:+.3f}, forgetting (max-based) "
          f"{c['forgetting']:.3f}, FWT vs pretrained {c['fwt_pretrained']:+.3f}; accumulation "
          f"{c['final_accumulation']:.3f} (pretrained {c['pretrained_accumulation']:.3f}), retention "
          f"{c['final_retention']:.3f} (pretrained {c['pretrained_retention']:.3f}); mean cosine of the domains' "
          f"task vectors {g['mean_step_cosine']:.3f}, sign conflicts {g['sign_conflict_rate']:.3f}; CKA of the last "
          f"block to the pretrained features {np.round(cka_last, 3).tolist()}")
    plot_cosine_heatmap(g["step_cosine"], out / f"{name}_cosine.png", title=f"{name}: task-vector cosines")
    plot_cka_curves(d["cka_pretrained"], d["layers"], out / f"{name}_cka.png", title=f"{name}: CKA drift",
                    learned=d["cka_learned"])
print(f"plots in {out}/")
