"""Prompt-based continual learning (L2P, DualPrompt, CODA-Prompt) on a frozen pretrained ViT, inside Avalanche.

Each method wraps the frozen backbone in its prompted model (:mod:`avalanche_merge.prompts`), trains only prompts,
keys and a new linear head with :class:`~avalanche_merge.strategies.prompts.PromptStrategy`, and uses the papers'
masked head protocol (:class:`~avalanche_merge.plugins.protocol.HeadProtocolPlugin`). The same models attach to a
timm or open_clip ViT: the last lines prompt a (random) timm ViT of your own.

Run: python examples/prompts.py   (a few minutes on 2 CPU cores once the tiny ViT is cached)
"""

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.models.pretrain import pretrained_tiny_vit
from avalanche_merge.plugins.prompts import PromptPlugin
from avalanche_merge.plugins.protocol import HeadProtocolPlugin
from avalanche_merge.prompts import CodaPromptConfig, CodaPromptModel, DualPromptModel, L2PConfig, L2PModel
from avalanche_merge.strategies.prompts import PromptStrategy

bench = build_benchmark("split_mnist", seed=0)
n_tasks, batch = bench.n_experiences, 32
for name in ("l2p", "dualprompt", "coda_prompt"):
    torch.manual_seed(0)
    backbone, _ = pretrained_tiny_vit()  # the 4-block, 64-wide ViT pretrained offline on reserved MNIST images
    if name == "l2p":
        cfg = L2PConfig()
        model = L2PModel(backbone, bench.num_classes, cfg)
        plugin = PromptPlugin(lr=cfg.effective_lr(batch), pull_weight=cfg.pull_weight, clip_grad=cfg.clip_grad)
    elif name == "dualprompt":
        model = DualPromptModel(backbone, bench.num_classes, n_tasks=n_tasks)
        cfg = model.config
        plugin = PromptPlugin(lr=cfg.effective_lr(batch), pull_weight=cfg.pull_weight, clip_grad=cfg.clip_grad,
                              selection=True)
    else:
        cfg = CodaPromptConfig()
        model = CodaPromptModel(backbone, bench.num_classes, cfg, n_tasks=n_tasks)
        plugin = PromptPlugin(lr=cfg.effective_lr(batch), cosine=cfg.cosine)
    strategy = PromptStrategy(
        model=model, plugin=plugin, plugins=[HeadProtocolPlugin(protocol="masked")],
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=batch, train_epochs=2, eval_mb_size=256,
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
    )
    for exp in bench.train_stream:
        strategy.train(exp)
    acc = strategy.eval(bench.test_stream)["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    extra = plugin.method_info().get("final_prompt_selection_acc")
    print(f"{name:12s} final accuracy {acc:.3f}  trained parameters "
          f"{sum(p.numel() for p in model.trainable_parameters())}"
          + (f"  prompt-selection accuracy {extra:.3f}" if extra is not None else ""))

# your own ViT: a timm VisionTransformer (fused qkv) gets the same prompts without any change to its code
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=0)
prompted = DualPromptModel(vit, num_classes=10, n_tasks=5)
print("timm ViT + DualPrompt logits:", tuple(prompted(torch.randn(2, 3, 32, 32)).shape),
      "prefix layers G", prompted.g_layers, "E", prompted.e_layers)
