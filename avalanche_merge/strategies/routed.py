"""Registration of the retrieval-routed per-task LoRA methods ``color`` and ``proteus`` (family ``"retrieval"``).

The backbone is wrapped in a :class:`~avalanche_merge.retrieval.routed.RoutedLoRA` before the strategy is built,
so the strategy trains and evaluates the routed model (before the first task it is the pretrained backbone).
Each task's head predicts only that task's classes, written into their global label columns (the usual choice of
routing methods; the task is chosen by the router, the class within it by the head).
"""

from __future__ import annotations

from typing import Any

from avalanche.training.templates import SupervisedTemplate

from ..plugins.optim import restrict_optimizer
from ..plugins.routed import RoutedPlugin
from ..retrieval.routed import CoLoRConfig, ProteusConfig, RoutedLoRA, RoutedLoRAConfig
from .registry import BuildContext, register_method


class RoutedStrategy(SupervisedTemplate):
    """Sequential training of a :class:`RoutedLoRA`; only the current task's parameters reach the optimizer.

    Args:
        model: the :class:`RoutedLoRA` (the strategy's model; its forward routes at evaluation).
        optimizer: a single-group optimizer (its parameter list is replaced per task).
        plugins: other Avalanche plugins (the routed plugin is appended after them).
        **kwargs: the other ``SupervisedTemplate`` arguments.
    """

    def __init__(self, *, model: RoutedLoRA, optimizer, plugins=None, **kwargs) -> None:
        self.routed_plugin = RoutedPlugin(model=model, reset_optimizer_state=True)
        super().__init__(model=model, optimizer=optimizer, plugins=[*(plugins or []), self.routed_plugin], **kwargs)

    @property
    def router(self) -> RoutedLoRA:
        return self.routed_plugin.router

    def make_optimizer(self, **kwargs: Any) -> None:
        """Keep only the trainable parameters in the optimizer (Avalanche's version adds frozen ones)."""
        restrict_optimizer(self, [p for p in self.model.parameters() if p.requires_grad], reset_state=True)


def _build(ctx: BuildContext, cfg: RoutedLoRAConfig) -> RoutedStrategy:
    optimizer = ctx.optimizer()  # over the backbone's parameters, before RoutedLoRA freezes them (replaced per task)
    model = RoutedLoRA(ctx.model, config=cfg, num_classes=ctx.benchmark.num_classes)
    return RoutedStrategy(model=model, optimizer=optimizer, **ctx.strategy_kwargs())


register_method("color", config_cls=CoLoRConfig, family="retrieval", protocol="routed",
                description="CoLoR: a LoRA and head per task, routed by k-means prototypes of pretrained "
                            "features (Wistuba et al. 2023)")(_build)
register_method("proteus", config_cls=ProteusConfig, family="retrieval", protocol="routed",
                description="Proteus: orthogonal per-task LoRA with gated transfer, routed by DP-GMM signatures "
                            "(Le et al. 2026)")(_build)
