"""``RoutedPlugin``: drives a :class:`~avalanche_merge.retrieval.routed.RoutedLoRA` (CoLoR, Proteus) in Avalanche.

The strategy's model must be the :class:`RoutedLoRA` itself (its ``forward`` routes, so Avalanche's evaluation
just calls ``model(x)``). Per experience:

- ``before_training_exp``: ``model.begin_task(classes of the experience)`` adds the task's adapter, head (over the
  experience's classes, global labels) and gates; the optimizer is reset to those parameters only (at ``lr``);
- ``before_backward``: ``strategy.loss += model.penalty()`` (Proteus);
- ``after_training_exp``: up to ``max_samples`` inputs and labels of the experience (fixed seeded order,
  evaluation transforms) go to ``model.end_task``: LDA head if any, then the signature of their *pretrained*
  embeddings;
- ``before_eval_exp`` (router ``"oracle"`` only): the oracle task is the evaluated experience's index.

A routed model trains one task's adapter and head at a time, and each head predicts only its own task's classes:
a strategy that mixes earlier experiences' samples into training (Avalanche's ``Replay`` and other plugins with a
replay buffer, ``Cumulative``) would send them to a head without their class. That is refused with a clear error
before training (``before_training``), and any mini-batch holding a class outside the current experience's is
refused before its forward pass (issue 14: it used to train silently on placeholder logits).

The plugin exposes the model as ``.router`` (the :class:`~avalanche_merge.retrieval.router.Router` interface).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader, Subset

from ..retrieval.routed import RoutedLoRA
from .optim import restrict_optimizer
from .protocol import experience_classes


def experience_batches(strategy: Any, max_samples: int, seed: int = 0) -> tuple[list, list]:
    """Up to ``max_samples`` (inputs, labels) of the current experience, as mini-batches on the strategy's device."""
    dataset = strategy.experience.dataset
    dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
    n = len(dataset)
    if n > max_samples:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
        dataset = Subset(dataset, order.tolist())
    loader = DataLoader(dataset, batch_size=max(1, getattr(strategy, "train_mb_size", 64)), shuffle=False)
    xs, ys = [], []
    for batch in loader:
        xs.append(batch[0].to(strategy.device))
        ys.append(torch.as_tensor(batch[1]).to(strategy.device))
    return xs, ys


class RoutedPlugin(SupervisedPlugin):
    """Trains one task module per experience of a :class:`RoutedLoRA` and fits its signature afterwards."""

    def __init__(self, model: RoutedLoRA) -> None:
        super().__init__()
        if not isinstance(model, RoutedLoRA):
            raise TypeError(f"model must be a RoutedLoRA, got {type(model).__name__}")
        self.router = model
        self._classes: list[int] = []

    def _check(self, strategy: Any) -> RoutedLoRA:
        if strategy.model is not self.router:
            raise RuntimeError("RoutedPlugin: the strategy's model must be the plugin's RoutedLoRA")
        return self.router

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._check(strategy)
        mixing = [type(p).__name__ for p in strategy.plugins if hasattr(p, "storage_policy")]
        if mixing or any(c.__name__ == "Cumulative" for c in type(strategy).__mro__):
            what = f"plugin {mixing[0]}" if mixing else f"strategy {type(strategy).__name__}"
            raise ValueError(f"retrieval-routed methods (CoLoR, Proteus) cannot train with earlier experiences' "
                             f"samples mixed in ({what}): each task's head predicts only its own classes; use "
                             f"Naive or the registered 'color' / 'proteus' strategies")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = self._check(strategy)
        self._classes = experience_classes(strategy.experience)
        params = model.begin_task(self._classes)
        restrict_optimizer(strategy, params, model.config.lr)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if not strategy.is_training:
            return
        present = torch.as_tensor(strategy.mb_y).unique().tolist()
        foreign = sorted(set(present) - set(self._classes))
        if foreign:
            raise ValueError(f"a training mini-batch of a retrieval-routed method holds classes {foreign[:4]} that are "
                             f"not in the current experience ({self._classes[:8]}): samples of earlier experiences "
                             f"(replay) cannot train a routed model, whose heads predict only their own task's classes")

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        penalty = self.router.penalty()
        if penalty is not None:
            strategy.loss = strategy.loss + penalty

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = self._check(strategy)
        xs, ys = experience_batches(strategy, model.config.max_samples)
        model.end_task(xs, ys)

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.router.config.router == "oracle":
            self.router.oracle_task = int(strategy.experience.current_experience)
