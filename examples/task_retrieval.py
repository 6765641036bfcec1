"""Task retrieval on class-incremental split MNIST: Proteus (DP-GMM signatures, per-task LoRA with an LDA head) vs
CoLoR (k-means prototypes, per-task LoRA with a linear head) vs RanPAC on frozen features.

The routed methods embed each test image with the frozen pretrained ViT, pick the task whose signature explains
the embedding best, and run that task's LoRA and head; Avalanche's evaluator records class accuracy and
avalanche-merge's retrieval accuracy (how often the right task was chosen).

Run: python examples/task_retrieval.py   (about a minute on 2 CPU cores once the tiny ViT is cached)
"""

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.evaluation.retrieval import retrieval_metrics
from avalanche_merge.models.pretrain import pretrained_tiny_vit
from avalanche_merge.models.vit import FeatureExtractor
from avalanche_merge.retrieval import CoLoRConfig, ProteusConfig, RanPAC, RanPACConfig, RoutedLoRA
from avalanche_merge.strategies.prototypes import FrozenFeatureClassifier
from avalanche_merge.strategies.routed import RoutedStrategy

bench = build_benchmark("split_mnist", seed=0)
common = dict(criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=2, eval_mb_size=256)
for name, config in (("proteus", ProteusConfig()), ("color", CoLoRConfig()), ("ranpac", RanPACConfig())):
    torch.manual_seed(0)
    backbone, _ = pretrained_tiny_vit()
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), *retrieval_metrics(), loggers=[])
    if name == "ranpac":
        core = RanPAC(backbone.feature_dim, bench.num_classes, config)
        strategy = FrozenFeatureClassifier(feature_model=FeatureExtractor(backbone), core=core, streaming=False,
                                           evaluator=evaluator, **common)
    else:
        model = RoutedLoRA(backbone, config=config, num_classes=bench.num_classes)
        strategy = RoutedStrategy(model=model, optimizer=torch.optim.AdamW(backbone.parameters(), lr=1e-3),
                                  evaluator=evaluator, **common)
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    results = strategy.eval(bench.scenario.test_stream)
    acc = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    retrieval = results.get("RetrievalAcc_Stream/eval_phase/test_stream")
    print(f"{name:8s} class accuracy {acc:.3f}" + (f"  retrieval accuracy {retrieval:.3f}" if retrieval else ""))
