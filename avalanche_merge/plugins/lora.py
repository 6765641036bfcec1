"""``LoRAPlugin``: any continual LoRA learner of :mod:`avalanche_merge.lora` inside any Avalanche strategy.

The plugin only connects Avalanche's callbacks to the learner's four calls; the maths lives in the learner:

- ``before_training``: build the learner on ``strategy.model`` (peft injects the adapters in place);
- ``before_training_exp``: ``learner.begin_task(inputs)``, then the optimizer is reset to the learner's trainable
  parameters only (Avalanche's ``make_optimizer``/``update_optimizer`` would also add the frozen base and
  earlier adapters); the user's parameter groups and rates are kept, a new adapter joins the group of the layer it
  adapts (:func:`~avalanche_merge.plugins.optim.restrict_optimizer`);
- ``before_backward``: ``strategy.loss += learner.penalty()``;
- ``after_backward``: ``learner.after_backward()`` (gradient projections);
- ``after_update``: ``learner.after_step()`` (constraints restored after the optimizer step);
- ``after_training_exp``: ``learner.end_task(inputs)``.

Before the first experience the learner is told the stream's length (``set_stream_length``: InfLoRA's
threshold schedule), read from the experience's ``origin_stream``.

``inputs`` are up to ``max_samples`` inputs of the current experience (never the replay buffer), taken in a
fixed seeded order with the evaluation transforms.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from ..lora import ContinualLoRA, make_config
from ..lora.registry import LEARNERS
from .optim import restrict_optimizer


def experience_inputs(strategy: Any, max_samples: int, seed: int = 0) -> list:
    """Up to ``max_samples`` inputs of the current experience, as mini-batches on the strategy's device."""
    dataset = strategy.experience.dataset
    dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
    n = len(dataset)
    if n > max_samples:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
        dataset = Subset(dataset, order.tolist())
    loader = DataLoader(dataset, batch_size=max(1, getattr(strategy, "train_mb_size", 64)), shuffle=False)
    return [batch[0].to(strategy.device) for batch in loader]


def stream_length(experience: Any) -> int | None:
    """The number of experiences of the stream ``experience`` comes from (None when it cannot be told)."""
    try:
        return len(experience.origin_stream)
    except (AttributeError, TypeError):
        return None


class LoRAPlugin(SupervisedPlugin):
    """Train a continual LoRA learner inside any ``SupervisedTemplate`` (Naive, Replay, ...).

    Args:
        method: a registered learner name (``avalanche_merge.lora.list_learners()``; the same names as the CLI's
            LoRA methods).
        options: the learner's config fields (validated now, before training; an unknown field raises a
            ``ValueError`` listing the valid ones).
        reset_optimizer_state: clear the optimizer state every experience; by default parameters that stay in the
            optimizer (e.g. a head trained in every experience) keep theirs, as with Avalanche's ``make_optimizer``.
    """

    def __init__(self, *, method: str = "olora", options: dict | None = None,
                 reset_optimizer_state: bool = False) -> None:
        super().__init__()
        self.method = method
        self.config = make_config(method, **(options or {}))
        self.reset_optimizer_state = reset_optimizer_state
        self.learner: ContinualLoRA | None = None
        self._inputs: list | None = None
        self._stream_length: int | None = None

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.learner is None:
            self.learner = LEARNERS.get(self.method)(strategy.model, config=self.config)
        elif self.learner.model is not strategy.model:
            raise RuntimeError("LoRAPlugin is bound to another model; use one plugin per strategy")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        learner = self.learner
        if learner.task < 0:
            n = stream_length(strategy.experience)
            if n is not None:
                learner.set_stream_length(n)
                self._stream_length = n
        self._inputs = experience_inputs(strategy, self.config.max_samples) if learner.needs_inputs else None
        params = learner.begin_task(self._inputs)
        restrict_optimizer(strategy, params, self.config.lr, reset_state=self.reset_optimizer_state)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        penalty = self.learner.penalty()
        if penalty is not None:
            strategy.loss = strategy.loss + penalty

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.after_backward()

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.after_step()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.end_task(self._inputs)
        self._inputs = None

    def state_dict(self) -> dict:
        """The learner's adapters, extra state and head as :meth:`ContinualLoRA.save` writes them."""
        if self.learner is None:
            return {"learner": None}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "learner.safetensors"
            self.learner.save(path)
            with safe_open(str(path), framework="pt") as f:
                saved = {"meta": f.metadata(), "tensors": {k: f.get_tensor(k) for k in f.keys()}}  # noqa: SIM118
        return {"learner": saved, "stream_length": self._stream_length}

    def load_state_dict(self, state: dict, strategy: Any) -> None:
        """Build the learner on ``strategy.model`` and restore :meth:`state_dict` into it."""
        if state["learner"] is None:
            return
        self.before_training(strategy)
        self._stream_length = state["stream_length"]
        if self._stream_length is not None:
            self.learner.set_stream_length(self._stream_length)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "learner.safetensors"
            tensors = {k: v.detach().cpu().contiguous() for k, v in state["learner"]["tensors"].items()}
            save_file(tensors, str(path), metadata=state["learner"]["meta"])
            self.learner.load(path)
