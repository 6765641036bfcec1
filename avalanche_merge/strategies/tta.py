"""Zero-shot and test-time-adaptation methods: ``zeroshot``, ``pretrained_head``, ``tent``, ``ttacil``.

- ``zeroshot`` (Continual-CLIP, Thengane et al. 2022): an open_clip model is never trained; after every
  experience its head is rebuilt from the text tower over the classes seen so far (all classes of a
  domain-incremental stream are seen in its first experience), with configurable prompt templates.
- ``pretrained_head``: the zero-shot-like baseline of a backbone without a text tower (the offline ``tiny_vit``):
  its pretrained head, never trained, predictions restricted to the classes seen so far. The tiny ViT is
  pretrained on the ten digits of the benchmarks' label space, so its frozen head plays the part of CLIP's text
  head; class-mean prototypes of frozen features need training data and are the ``ncm`` method already.
- ``tent``: Avalanche's ``Naive`` training with :class:`~avalanche_merge.plugins.tta.TentPlugin` at evaluation.
- ``ttacil``: :class:`TTACILStrategy` (Marouf et al., arXiv 2310.11482).
"""

from __future__ import annotations

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader

from ..merging.heads import find_head
from ..plugins.protocol import experience_classes
from ..plugins.tta import MemoLayerNormPlugin, TentPlugin
from ..protocol import class_list, masked_loss, replace_module, restrict_logits
from ..tta.adapters import ClassMeans, CosineHead, attach_parallel_adapters
from ..tta.config import TentConfig, TTACILConfig, ZeroShotConfig, resolve_templates
from .registry import BuildContext, NoOptions, register_method, register_plugin_method


class ZeroShotStrategy(SupervisedTemplate):
    """Never trains; predicts with the model's head restricted to the classes seen so far.

    Args:
        model: the classifier (its head is the zero-shot / pretrained head).
        class_head: ``class_head(class_ids) -> (len(ids), dim)`` head rows (e.g. text embeddings of prompts),
            called over the classes seen so far after every experience and over all classes at construction;
            None keeps the model's head as it is.
        head_name: module name of the head (``nn.Linear``) whose rows ``class_head`` writes.
        **kwargs: ``SupervisedTemplate`` arguments except ``model``, ``optimizer`` and ``train_epochs``.
    """

    def __init__(self, *, model: nn.Module, class_head=None, head_name: str = "head", **kwargs) -> None:
        kwargs.pop("train_epochs", None)
        for p in model.parameters():
            p.requires_grad_(False)
        super().__init__(model=model.eval(), optimizer=None, train_epochs=1, **kwargs)  # type: ignore[arg-type]
        self.class_head = class_head
        self.head_name = head_name
        self.seen: list[int] = []
        self.head_builds = 0
        if class_head is not None:
            self._write_rows(list(range(self.model.get_submodule(head_name).weight.shape[0])))

    @torch.no_grad()
    def _write_rows(self, classes: list[int]) -> None:
        weight = self.model.get_submodule(self.head_name).weight
        rows = self.class_head(classes)
        weight[classes] = rows.to(weight.device, weight.dtype)
        self.head_builds += 1

    def make_optimizer(self, **kwargs):
        """No optimizer: nothing is trained."""

    def training_epoch(self, **kwargs):
        """No pass over the data: a zero-shot model takes no step."""

    def _after_training_exp(self, **kwargs):
        self.seen = class_list([*self.seen, *experience_classes(self.experience)])
        if self.class_head is not None:
            self._write_rows(self.seen)
        super()._after_training_exp(**kwargs)

    def forward(self):
        out = super().forward()
        return restrict_logits(out, self.seen) if self.seen else out


def _text_head(model: nn.Module, class_names: list[str], templates: tuple[str, ...]):
    """``class_ids -> text-embedding rows`` from the open_clip text tower the backbone keeps (``text_tower``)."""
    from ..models.clip import build_zero_shot_head

    tower = getattr(model, "text_tower", None)
    if tower is None:
        raise ValueError(f"zeroshot needs an open_clip backbone (a text tower); {type(model).__name__} has none "
                         f"(for the offline tiny_vit use 'pretrained_head')")

    def rows(classes: list[int]) -> torch.Tensor:
        device = next(tower.clip.parameters()).device
        return build_zero_shot_head(tower.clip, tower.tokenizer, [class_names[c] for c in classes], templates,
                                    device=device)

    return rows


@register_method("zeroshot", config_cls=ZeroShotConfig, family="zeroshot", protocol="frozen", protocols=("frozen",),
                 in_bench=False,
                 description="zero-shot CLIP, never trained; text head over the classes seen so far (Continual-CLIP, "
                             "Thengane et al. 2022); open_clip backbones only")
def build_zeroshot(ctx: BuildContext, cfg: ZeroShotConfig):
    templates = resolve_templates(cfg.templates)
    class_head = _text_head(ctx.model, list(ctx.benchmark.class_names), templates)
    return ZeroShotStrategy(model=ctx.model, class_head=class_head, head_name=find_head(ctx.model),
                            **ctx.strategy_kwargs())


@register_method("pretrained_head", family="zeroshot", protocol="frozen", protocols=("frozen",),
                 description="the backbone's pretrained head, never trained, restricted to the classes seen so far "
                             "(zero-shot-like baseline of the offline tiny_vit)")
def build_pretrained_head(ctx: BuildContext, cfg: NoOptions):
    return ZeroShotStrategy(model=ctx.model, **ctx.strategy_kwargs())


register_plugin_method("tent", make_plugin=lambda ctx, cfg: TentPlugin(config=cfg), config_cls=TentConfig, family="tta",
                       description="TENT: Naive training; at test time one entropy step per batch on the "
                                   "normalisation affine parameters (Wang et al. 2021)")


class TTACILStrategy(SupervisedTemplate):
    """TTACIL: first-experience adapters, class-mean cosine prototypes, MEMO LayerNorm adaptation at test time.

    Experience 0 trains the parallel adapters and a cosine head (the backbone frozen; cross-entropy over the
    experience's classes); adapters and head are then frozen and the LayerNorms saved. After every experience the
    class means of the adapted features (evaluation transforms, no augmentation) become the head rows of their
    classes; later experiences take no optimizer step. Predictions are restricted to the classes seen so far.
    At test time :class:`~avalanche_merge.plugins.tta.MemoLayerNormPlugin` adapts each batch.

    Args:
        model: a model with ``features(x)``, a linear head and transformer blocks (see
            :func:`~avalanche_merge.tta.adapters.attach_parallel_adapters`).
        config: :class:`~avalanche_merge.tta.config.TTACILConfig`.
        num_classes: classes of the benchmark.
        make_optimizer: ``params -> optimizer`` for the first experience.
        seed: seed of the AugMix views.
        **kwargs: ``SupervisedTemplate`` arguments except ``model`` and ``optimizer``.
    """

    def __init__(self, *, model: nn.Module, config: TTACILConfig, num_classes: int, make_optimizer, seed: int = 0,
                 **kwargs) -> None:
        if not callable(getattr(model, "features", None)):
            raise TypeError(f"ttacil needs a model with features(x); {type(model).__name__} has none")
        for p in model.parameters():
            p.requires_grad_(False)
        attach_parallel_adapters(model, bottleneck=config.bottleneck, scale=config.adapter_scale,
                                 dropout=config.adapter_dropout)
        self.head_name = find_head(model)
        old = model.get_submodule(self.head_name)
        device = next(old.parameters()).device
        replace_module(model, self.head_name, CosineHead(old.in_features, num_classes).to(device))
        trainable = [p for n, p in model.named_parameters() if ".adaptmlp." in n or n.startswith(self.head_name + ".")]
        for p in trainable:
            p.requires_grad_(True)
        self.memo = MemoLayerNormPlugin(config=config, seed=seed)
        kwargs["plugins"] = list(kwargs.get("plugins") or []) + [self.memo]
        super().__init__(model=model, optimizer=make_optimizer(trainable), **kwargs)
        self.means = ClassMeans(num_classes, old.in_features)
        self.seen: list[int] = []
        self.adapted = False  # True once the first experience has trained the adapters

    def make_optimizer(self, **kwargs):
        if not self.adapted:
            super().make_optimizer(**kwargs)

    def training_epoch(self, **kwargs):
        if not self.adapted:  # later experiences: prototypes only
            super().training_epoch(**kwargs)

    def criterion(self):
        if self.is_training:
            return masked_loss(self._criterion, self.mb_output, self.mb_y, experience_classes(self.experience))
        return super().criterion()

    def forward(self):
        out = super().forward()
        return out if self.is_training or not self.seen else restrict_logits(out, self.seen)

    def adapt_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction logits of ``x`` (restricted to the seen classes): what the MEMO step differentiates."""
        out = self.model(x)
        return restrict_logits(out, self.seen) if self.seen else out

    def _after_training_exp(self, **kwargs):
        if not self.adapted:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.adapted = True
            self.memo.snapshot(self.model)
        self._add_prototypes()
        super()._after_training_exp(**kwargs)

    @torch.no_grad()
    def _add_prototypes(self) -> None:
        dataset = self.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in DataLoader(dataset, batch_size=self.eval_mb_size, shuffle=False):
                self.means.update(self.model.features(batch[0].to(self.device)), batch[1])
        finally:
            self.model.train(was_training)
        self.seen = self.means.seen()
        head = self.model.get_submodule(self.head_name)
        head.weight[self.seen] = self.means.means()[self.seen].to(head.weight.device, head.weight.dtype)


@register_method("ttacil", config_cls=TTACILConfig, family="tta", protocol="prototype", pretrained_eval=False,
                 description="TTACIL: first-task adapters, cosine prototypes, MEMO LayerNorm test-time adaptation "
                             "(Marouf et al. 2023)")
def build_ttacil(ctx: BuildContext, cfg: TTACILConfig):
    return TTACILStrategy(model=ctx.model, config=cfg, num_classes=ctx.benchmark.num_classes,
                          make_optimizer=ctx.optimizer, seed=ctx.seed, **ctx.strategy_kwargs())
