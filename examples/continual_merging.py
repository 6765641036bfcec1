"""Continual model merging inside a plain Avalanche strategy, and the same merge on saved checkpoints.

1. Avalanche ``Naive`` + ``MergePlugin``: each domain of ``domain_mnist`` is fine-tuned from the pretrained tiny
   ViT, and its task vector is merged with OPCM; Avalanche evaluates the merged model after every experience.
2. The pure core, without Avalanche: the fine-tuned checkpoints, saved as safetensors, are merged with TIES
   tensor by tensor (``merge_safetensors``).

Run: python examples/continual_merging.py   (about 15 s on 2 CPU cores once the tiny ViT is cached; the first
run pretrains it, about 30 s more)
"""

import tempfile
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from safetensors.torch import load_file, save_file

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.merging import merge_safetensors
from avalanche_merge.models.pretrain import pretrained_tiny_vit
from avalanche_merge.plugins import MergePlugin

torch.manual_seed(0)
bench = build_benchmark("domain_mnist", seed=0, domains=["rotate_90", "flip_lr", "edges", "noise"])
model, _ = pretrained_tiny_vit()
pretrained = {k: v.clone() for k, v in model.state_dict().items()}
out = Path(tempfile.mkdtemp())


class SaveFinetuned(SupervisedPlugin):
    """Saves each experience's fine-tuned weights (runs before the merge plugin in after_training_exp)."""

    def after_training_exp(self, strategy, **kwargs):
        save_file(dict(strategy.model.state_dict()), str(out / f"exp{strategy.experience.current_experience}.st"))


strategy = Naive(
    model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), criterion=torch.nn.CrossEntropyLoss(),
    train_mb_size=32, train_epochs=2, eval_mb_size=256,
    plugins=[SaveFinetuned(), MergePlugin(merger="opcm", merger_options={"alpha": 0.5}, start="pretrained")],
    evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]),
)
for exp in bench.scenario.train_stream:
    strategy.train(exp)
    acc = strategy.eval(bench.scenario.test_stream)
    seen = [acc[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(exp.current_experience + 1)]
    print(f"after {bench.experience_names[exp.current_experience]:>9}: OPCM merge, mean accuracy on seen domains "
          f"{100 * sum(seen) / len(seen):.1f}%")

save_file(pretrained, str(out / "pretrained.st"))
merged = merge_safetensors(out / "pretrained.st", sorted(out.glob("exp*.st")), out / "ties.st", merge="ties",
                           options={"density": 0.2}, scaling=1.0, progress=False)
model.load_state_dict(load_file(str(merged)))
acc = strategy.eval(bench.scenario.test_stream)
stream_acc = acc["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
print(f"TIES of the saved checkpoints (streamed from disk): {100 * stream_acc:.1f}%")
