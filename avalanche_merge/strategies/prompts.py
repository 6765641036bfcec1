"""L2P, DualPrompt and CODA-Prompt as Avalanche strategies, and their registration (family ``"prompt"``).

Each builder wraps the run's backbone in its prompted model (:mod:`avalanche_merge.prompts.model`), gives Adam the
prompt parameters and the new head, and adds :class:`~avalanche_merge.plugins.prompts.PromptPlugin`. All three
papers train with the logits of the current task's classes only and predict over the classes seen so far: the
``masked`` head protocol (:mod:`avalanche_merge.protocol`), which the runner applies through
:class:`~avalanche_merge.plugins.protocol.HeadProtocolPlugin` and which accepts a set-typed
``classes_in_this_experience`` (Avalanche 0.6's own L2P blanks every logit then).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.templates import SupervisedTemplate

from ..plugins.optim import restrict_optimizer
from ..plugins.prompts import PromptPlugin
from ..prompts.config import CodaPromptConfig, DualPromptConfig, L2PConfig
from ..prompts.model import CodaPromptModel, DualPromptModel, L2PModel, PromptedViT
from .registry import BuildContext, register_method

PROTOCOLS = ("masked", "shared", "per_task")


class PromptStrategy(SupervisedTemplate):
    """Sequential training of a :class:`~avalanche_merge.prompts.PromptedViT`; only prompts and head train.

    Args:
        model: the prompted model.
        plugin: its :class:`~avalanche_merge.plugins.prompts.PromptPlugin`.
        plugins: other Avalanche plugins (the prompt plugin is appended after them).
        **kwargs: the other ``SupervisedTemplate`` arguments (an optimizer is made over the prompt parameters).
    """

    def __init__(self, *, model: PromptedViT, plugin: PromptPlugin, plugins=None, **kwargs: Any) -> None:
        if not isinstance(model, PromptedViT):
            raise TypeError(f"model must be a PromptedViT, got {type(model).__name__}")
        self.prompt_plugin = plugin
        optimizer = kwargs.pop("optimizer", None) or torch.optim.Adam(model.trainable_parameters(), lr=plugin.lr)
        super().__init__(model=model, optimizer=optimizer, plugins=[*(plugins or []), plugin], **kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        """Only the trainable prompt parameters (Avalanche's version would add the frozen backbone)."""
        restrict_optimizer(self, self.model.trainable_parameters())


MODELS = {"l2p": L2PModel, "dualprompt": DualPromptModel, "coda_prompt": CodaPromptModel}


def check_prompt_model(method: str, cfg: Any, backbone: torch.nn.Module, num_classes: int, n_tasks: int) -> None:
    """Build ``method``'s prompted model on ``backbone`` (e.g. a meta-device skeleton) and remove its hooks again.

    Raises:
        TypeError: the backbone is not a supported ViT or its attention form is not supported.
        ValueError: a prompted layer outside the model, a pool smaller than top-N, CODA components that do not fit.
    """
    extra = {} if method == "l2p" else {"n_tasks": n_tasks}
    MODELS[method](backbone, num_classes, cfg, **extra).detach_backbone()


def _strategy(ctx: BuildContext, model: PromptedViT, cfg: Any, *, pull: float = 0.0, cosine: bool = False,
              selection: bool = False) -> PromptStrategy:
    plugin = PromptPlugin(lr=cfg.effective_lr(ctx.train.batch_size), pull_weight=pull, clip_grad=cfg.clip_grad,
                          cosine=cosine, selection=selection)
    return PromptStrategy(model=model, plugin=plugin, **ctx.strategy_kwargs())


@register_method("l2p", config_cls=L2PConfig, family="prompt", protocol="masked", protocols=PROTOCOLS,
                 description="L2P: prompt pool with key-query selection on a frozen ViT (Wang et al., CVPR 2022)")
def build_l2p(ctx: BuildContext, cfg: L2PConfig) -> PromptStrategy:
    model = L2PModel(ctx.model, ctx.benchmark.num_classes, cfg, seed=ctx.seed)
    return _strategy(ctx, model, cfg, pull=cfg.pull_weight)


@register_method("dualprompt", config_cls=DualPromptConfig, family="prompt", protocol="masked", protocols=PROTOCOLS,
                 description="DualPrompt: G- and task-keyed E-prefix prompts on a frozen ViT (Wang et al., ECCV "
                             "2022)")
def build_dualprompt(ctx: BuildContext, cfg: DualPromptConfig) -> PromptStrategy:
    model = DualPromptModel(ctx.model, ctx.benchmark.num_classes, cfg, n_tasks=ctx.benchmark.n_experiences,
                            seed=ctx.seed)
    return _strategy(ctx, model, cfg, pull=cfg.pull_weight, selection=True)


@register_method("coda_prompt", config_cls=CodaPromptConfig, family="prompt", protocol="masked",
                 protocols=PROTOCOLS,
                 description="CODA-Prompt: attention-weighted orthogonal prompt components (Smith et al., CVPR "
                             "2023)")
def build_coda_prompt(ctx: BuildContext, cfg: CodaPromptConfig) -> PromptStrategy:
    model = CodaPromptModel(ctx.model, ctx.benchmark.num_classes, cfg, n_tasks=ctx.benchmark.n_experiences,
                            seed=ctx.seed)
    return _strategy(ctx, model, cfg, cosine=cfg.cosine)
