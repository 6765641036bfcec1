"""``SparsePlugin``: any sparse learner of :mod:`avalanche_merge.sparse` inside any Avalanche strategy.

Callbacks -> learner calls (the maths lives in the learner):

- ``before_training``: build the learner on ``strategy.model``;
- ``before_training_exp``: before the first experience ``learner.set_stream_length(n)`` (a capacity forecast under
  ownership); ``learner.set_task_steps(len(dataloader) * train_epochs)``; ``learner.begin_task(batches)`` on up to
  ``max_samples`` ``(x, y)`` samples of the experience (seeded order, evaluation transforms), which records the
  task's capacity and applies ``on_exhausted``; then the optimizer is reset to the learner's parameters;
- ``after_backward``: ``learner.after_backward()`` (gradient masks);
- ``before_update`` / ``after_update``: ``learner.before_step()`` / ``learner.after_step()`` around the optimizer
  step (masked weights restored bit for bit; dynamic masks refreshed);
- ``after_training_exp``: ``learner.end_task()``.

:meth:`SparsePlugin.method_info` returns the per-task capacity records (requested and granted update budget).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader, Subset

from ..sparse import SparseLearner, make_sparse_config
from ..sparse.registry import SPARSE_LEARNERS
from .lora import stream_length
from .optim import restrict_optimizer


def task_steps(strategy: Any) -> int | None:
    """Optimizer steps of the experience about to train: ``len(strategy.dataloader) * train_epochs`` (``None``
    when the loader has no length)."""
    try:
        n = len(strategy.dataloader) * int(strategy.train_epochs)
    except (AttributeError, TypeError):
        return None
    return n if n >= 1 else None


def experience_batches(strategy: Any, max_samples: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``max_samples`` ``(x, y)`` pairs of the current experience, batched, on the strategy's device."""
    dataset = strategy.experience.dataset
    dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
    if len(dataset) > max_samples:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:max_samples]
        dataset = Subset(dataset, order.tolist())
    loader = DataLoader(dataset, batch_size=max(1, getattr(strategy, "train_mb_size", 64)), shuffle=False)
    return [(b[0].to(strategy.device), b[1].to(strategy.device)) for b in loader]


class SparsePlugin(SupervisedPlugin):
    """Train a sparse learner inside any ``SupervisedTemplate`` (Naive, Replay, ...).

    Args:
        method: a registered sparse learner (``avalanche_merge.sparse.list_sparse_learners()``).
        options: the learner's config fields (validated now; an unknown field raises a ``ValueError`` listing the
            valid ones).
        reset_optimizer_state: clear the optimizer state every experience; by default the parameters that stay in
            the optimizer keep theirs (masked weights are restored after each step, so momentum cannot move them).
    """

    def __init__(self, *, method: str = "masked", options: dict | None = None,
                 reset_optimizer_state: bool = False) -> None:
        super().__init__()
        self.method = method
        self.config = make_sparse_config(method, **(options or {}))
        self.reset_optimizer_state = reset_optimizer_state
        self.learner: SparseLearner | None = None

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.learner is None:
            self.learner = SPARSE_LEARNERS.get(self.method)(strategy.model, config=self.config)
        elif self.learner.model is not strategy.model:
            raise RuntimeError("SparsePlugin is bound to another model; use one plugin per strategy")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.learner.task < 0:
            n = stream_length(strategy.experience)
            if n is not None:
                self.learner.set_stream_length(n)
        self.learner.set_task_steps(task_steps(strategy))
        batches = experience_batches(strategy, self.config.max_samples, self.config.seed)
        restrict_optimizer(strategy, self.learner.begin_task(batches), self.config.lr,
                           reset_state=self.reset_optimizer_state)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.after_backward()

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.before_step()

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.after_step()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.end_task()

    def method_info(self) -> dict:
        """JSON-ready per-task capacity records (:meth:`SparseLearner.capacity_record`; empty before training)."""
        return {"capacity": [] if self.learner is None else self.learner.capacity_record()}

    #: learner attributes rebuilt from the model and config (not saved)
    REBUILT = ("model", "config", "params", "guard", "head_name")

    def state_dict(self) -> dict:
        """The learner's continual state (masks, ownership, counters, capacity records, generators)."""
        if self.learner is None:
            return {"learner": None}
        return {"learner": {k: v for k, v in vars(self.learner).items() if k not in self.REBUILT}}

    def load_state_dict(self, state: dict, strategy: Any) -> None:
        """Build the learner on ``strategy.model`` and restore :meth:`state_dict` into it."""
        if state["learner"] is None:
            return
        self.before_training(strategy)
        for k, v in state["learner"].items():
            setattr(self.learner, k, v)
