"""``c_clip``: C-CLIP (Liu et al., ICLR 2025) on an open_clip backbone, as an Avalanche strategy.

Per experience: a fresh peft LoRA on the MLP layers of both towers, trained with CLIP's contrastive loss on
(image, caption) pairs plus CKC against the frozen model of the previous experience through the shared projector
(:mod:`avalanche_merge.lora.cclip`); afterwards the LoRA is merged into the weights with ``merge_alpha`` and the
zero-shot head is rebuilt from the updated text tower, which is what evaluation uses.

Captions: the offline and classic benchmarks are classification data without captions, so each training image's
caption is a prompt template filled with its class name (one template drawn per image and step from
``templates``); two images of one class in a batch then share a caption and count as each other's negatives, a
deviation from caption data that the fidelity table records.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..config import check_range
from ..lora.adapters import add_adapter, resolve_targets
from ..lora.cclip import Projector, ckc_loss, clip_contrastive_loss, merge_lora_
from ..lora.config import LoRAConfig
from ..models.clip import DEFAULT_TEMPLATES, build_zero_shot_head
from .registry import BuildContext, register_method


@dataclass(kw_only=True)
class CCLIPConfig:
    """C-CLIP's hyper-parameters (defaults: the paper and the KoyoImai/C-CLIP reimplementation).

    Args:
        rank, alpha, dropout: the per-task LoRA (16, 32, 0.1).
        target_modules: LoRA targets in both towers (open_clip's MLP ``c_fc``/``c_proj``; its attention reads
            ``out_proj.weight`` directly, so a LoRA there would be ignored).
        merge_alpha: factor of the LoRA update merged into the weights after each task, in (0, 1] (0.5).
        temperature: CKC temperature (0.07).
        ckc_weight: weight of the CKC loss next to the CLIP loss (1).
        text_lr_scale: text-tower learning rate over the image one (10); the image rate is ``train.lr``.
        weight_decay: AdamW weight decay (0.2).
        grad_clip: gradient-norm clip (1.0); 0 disables.
        projector_hidden: hidden width of the projector; None: twice the embedding width.
        templates: caption templates with ``{}`` for the class name (classification data has no captions).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("c_fc", "c_proj")
    merge_alpha: float = 0.5
    temperature: float = 0.07
    ckc_weight: float = 1.0
    text_lr_scale: float = 10.0
    weight_decay: float = 0.2
    grad_clip: float = 1.0
    projector_hidden: int | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def __post_init__(self) -> None:
        self.lora = LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                               target_modules=tuple(self.target_modules))
        check_range("merge_alpha", self.merge_alpha, 0.0, 1.0, low_open=True)
        check_range("temperature", self.temperature, 0.0, 10.0, low_open=True)
        check_range("ckc_weight", self.ckc_weight, 0.0, 100.0)
        check_range("text_lr_scale", self.text_lr_scale, 0.0, 1000.0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        check_range("grad_clip", self.grad_clip, 0.0, 1e6)
        if not self.templates:
            raise ValueError("c_clip trains on image-caption pairs and a classification benchmark has no captions: "
                             "give caption templates with '{}' for the class name, e.g. ['a photo of a {}.']")
        for t in self.templates:
            if not isinstance(t, str) or "{}" not in t:
                raise ValueError(f"every caption template must be a str containing '{{}}', got {t!r}")

    def check_model(self, model: str, options: object = None) -> None:
        """Plan-time check: C-CLIP trains both towers of a CLIP model."""
        if model != "open_clip":
            raise ValueError(f"c_clip trains the image and text towers of a CLIP model; backbone {model!r} has no "
                             f"text tower (use model 'open_clip')")


class CCLIP(SupervisedTemplate):
    """C-CLIP over a :class:`~avalanche_merge.models.clip.ZeroShotClassifier` that keeps its ``text_tower``.

    Raises:
        ValueError: the model has no text tower or the benchmark no class names (before any training).
    """

    def __init__(self, *, model: nn.Module, class_names: list[str], config: CCLIPConfig, lr: float,
                 seed: int = 0, **kwargs) -> None:
        tower = getattr(model, "text_tower", None)
        if tower is None or not callable(getattr(tower.clip, "encode_text", None)):
            raise ValueError(f"c_clip needs a CLIP classifier with its text tower ({type(model).__name__} has none); "
                             f"build it with the 'open_clip' backbone")
        if not class_names:
            raise ValueError("c_clip builds captions from class names, and the benchmark gives none")
        self.config, self.class_names, self.image_lr = config, list(class_names), lr
        self.clip, self.tokenizer = tower.clip, tower.tokenizer
        self.head_templates = tower.templates
        dim = model.head.in_features
        self.projector = Projector(dim, config.projector_hidden)
        self.teacher: nn.Module | None = None
        self.n_trained = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._tokens: torch.Tensor | None = None  # (classes, templates, context)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        placeholder = torch.optim.AdamW(self.projector.parameters(), lr=lr)  # replaced per experience
        super().__init__(model=model, optimizer=placeholder, **kwargs)

    # -- per experience --------------------------------------------------------------------------------------------
    def _before_training_exp(self, **kwargs) -> None:
        cfg = self.config
        self.clip.to(self.device)
        self.projector.to(self.device)
        self.teacher = None
        if self.n_trained > 0:  # CKC from the second task: the frozen model of the previous one
            self.teacher = copy.deepcopy(self.clip).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        add_adapter(self.clip, f"task{self.n_trained}", cfg.lora, resolve_targets(self.clip, cfg.target_modules))
        self.clip.to(self.device)
        prompts = [t.replace("{}", c) for c in self.class_names for t in cfg.templates]
        self._tokens = self.tokenizer(prompts).view(len(self.class_names), len(cfg.templates), -1)
        super()._before_training_exp(**kwargs)

    def make_optimizer(self, **kwargs) -> None:
        visual = {id(p) for p in self.clip.visual.parameters()}
        lora = [p for n, p in self.clip.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([
            {"params": [p for p in lora if id(p) in visual], "lr": self.image_lr},
            {"params": [p for p in lora if id(p) not in visual], "lr": self.image_lr * self.config.text_lr_scale},
            {"params": list(self.projector.parameters()), "lr": self.image_lr},
        ], weight_decay=self.config.weight_decay)

    def _after_training_exp(self, **kwargs) -> None:
        merge_lora_(self.clip, self.config.merge_alpha)
        for p in self.clip.parameters():
            p.requires_grad_(False)
        head = build_zero_shot_head(self.clip, self.tokenizer, self.class_names, self.head_templates,
                                    device=self.device)
        with torch.no_grad():
            self.model.head.weight.copy_(head.to(self.model.head.weight.dtype))
        self.teacher = None
        self.n_trained += 1
        super()._after_training_exp(**kwargs)

    # -- per step --------------------------------------------------------------------------------------------------
    def forward(self):
        if not self.is_training:
            return super().forward()
        return self.model.features(self.mb_x)  # the image tower with its LoRA, L2-normalised

    def criterion(self):
        if not self.is_training:
            return super().criterion()
        cfg, y = self.config, self.mb_y.cpu()
        pick = torch.randint(len(cfg.templates), (y.numel(),), generator=self._generator)
        tokens = self._tokens[y, pick].to(self.device)
        image = self.mb_output
        text = F.normalize(self.clip.encode_text(tokens), dim=-1)
        loss = clip_contrastive_loss(image, text, self.model.logit_scale)
        if self.teacher is not None and cfg.ckc_weight > 0:
            with torch.no_grad():
                old_image = F.normalize(self.teacher.encode_image(self.mb_x), dim=-1)
                old_text = F.normalize(self.teacher.encode_text(tokens), dim=-1)
            loss = loss + cfg.ckc_weight * ckc_loss(self.projector(image), self.projector(text), old_image,
                                                    old_text, cfg.temperature)
        return loss

    def optimizer_step(self) -> None:
        if self.config.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        super().optimizer_step()


@register_method("c_clip", config_cls=CCLIPConfig, family="lora", in_bench=False, protocol="frozen",
                 protocols=("frozen",),
                 description="C-CLIP: per-task LoRA on both CLIP towers + CKC, merged at 0.5 (Liu et al. ICLR 2025)")
def build_cclip(ctx: BuildContext, cfg: CCLIPConfig) -> CCLIP:
    return CCLIP(model=ctx.model, class_names=ctx.benchmark.class_names, config=cfg, lr=ctx.train.lr, seed=ctx.seed,
                 **ctx.strategy_kwargs())


__all__ = ["CCLIP", "CCLIPConfig"]
