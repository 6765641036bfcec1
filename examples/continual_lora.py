"""Continual LoRA inside Avalanche: O-LoRA vs InfLoRA vs plain sequential LoRA on four MNIST domains.

Each learner runs as a ``LoRAPlugin`` inside Avalanche's ``Replay`` (a 50-sample buffer) on the pretrained tiny
ViT; Avalanche's evaluator records accuracy, and avalanche-merge's metrics record interference (the increase of
earlier tasks' loss) and the overlap of the tasks' LoRA input subspaces (mean cos^2 of principal angles), which
is plotted for each learner.

Run: python examples/continual_lora.py [PLOT_DIR]   (about a minute on 2 CPU cores once the tiny ViT is cached;
plots go to PLOT_DIR, default a temporary folder)
"""

import sys
import tempfile
from pathlib import Path

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Replay
from avalanche.training.plugins import EvaluationPlugin

from avalanche_merge.analysis.subspace_plots import plot_overlap_matrix
from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.evaluation.interference import final_interference, interference_metrics, lora_overlap_metrics
from avalanche_merge.models.pretrain import pretrained_tiny_vit
from avalanche_merge.plugins import LoRAPlugin

bench = build_benchmark("domain_mnist", seed=0, domains=["rotate_90", "flip_lr", "edges", "noise"])
out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
out.mkdir(parents=True, exist_ok=True)
for method in ("lora", "olora", "inflora"):
    torch.manual_seed(0)
    model, _ = pretrained_tiny_vit()
    interference, overlap = interference_metrics(max_samples=200), lora_overlap_metrics()
    strategy = Replay(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), criterion=torch.nn.CrossEntropyLoss(),
        mem_size=50, train_mb_size=32, train_epochs=2, eval_mb_size=256,
        plugins=[LoRAPlugin(method=method, options={"rank": 4, "target_modules": ["q", "k", "v"]})],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), *interference, *overlap, loggers=[]),
    )
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    acc = strategy.eval(bench.scenario.test_stream)["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    matrix = overlap[0].result()
    plot = plot_overlap_matrix(matrix, out / f"{method}_overlap.png", title=f"{method}: LoRA input subspaces")
    off_diag = (matrix.sum() - matrix.trace()) / (matrix.size - len(matrix))
    forgetting = final_interference(interference[0].loss_matrix())
    print(f"{method:8s} final accuracy {acc:.3f}  mean interference {forgetting:+.3f}  "
          f"mean off-diagonal overlap {off_diag:.3f}  plot: {plot}")
