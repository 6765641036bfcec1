"""``PromptPlugin``: the Avalanche side of L2P, DualPrompt and CODA-Prompt (the maths is in
:mod:`avalanche_merge.prompts`).

It only wires callbacks to the prompted model:

- before each training experience: ``model.begin_task(experience index)`` (DualPrompt copies the previous
  E-prompt, CODA adds and orthogonalises a slice), then a fresh optimizer state over the parameters that task
  trains (the references re-create the optimizer per task);
- CODA's cosine schedule, set at the start of each epoch;
- before backward: ``loss -= pull_weight * model.last_pull`` (L2P / DualPrompt key pull term);
- after backward: gradient-norm clipping of the trained parameters;
- during evaluation: prompt-selection accuracy (the share of inputs of experience ``j`` whose selected E-prompts are
  task ``j``'s), one row per evaluation after training; :meth:`method_info` returns it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from .optim import restrict_optimizer


class PromptPlugin(SupervisedPlugin):
    """Drive a :class:`~avalanche_merge.prompts.PromptedViT` inside an Avalanche strategy.

    Args:
        lr: the Adam rate of every task (before the schedule).
        pull_weight: weight of the pull term (0: none).
        clip_grad: gradient-norm clip, or None.
        cosine: CODA's per-epoch cosine schedule.
        selection: record prompt-selection accuracy at evaluation (task-keyed pools: DualPrompt).
    """

    def __init__(self, *, lr: float, pull_weight: float = 0.0, clip_grad: float | None = None, cosine: bool = False,
                 selection: bool = False) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr, self.pull_weight, self.clip_grad = lr, pull_weight, clip_grad
        self.cosine, self.selection = cosine, selection
        self.trained = 0
        self.rows: list[dict[int, float]] = []
        self._hits = self._seen = 0
        self._row: dict[int, float] = {}

    # -- training ------------------------------------------------------------------------------------------
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = strategy.model
        model.begin_task(int(strategy.experience.current_experience))
        restrict_optimizer(strategy, model.trainable_parameters(), self.lr, reset_state=True)  # fresh per task

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if self.cosine:
            epochs = strategy.train_epochs
            e = strategy.clock.train_exp_epochs
            factor = 1.0 if epochs <= 1 else math.cos(99 * math.pi * e / (200 * (epochs - 1)))
            for group in strategy.optimizer.param_groups:
                group["lr"] = self.lr * factor

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        pull = getattr(strategy.model, "last_pull", None)
        if pull is not None and self.pull_weight:
            strategy.loss = strategy.loss - self.pull_weight * pull

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(strategy.model.trainable_parameters(), self.clip_grad)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.trained += 1

    # -- evaluation ----------------------------------------------------------------------------------------
    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._hits = self._seen = 0

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        idx = getattr(strategy.model, "last_selection", None)
        if not self.selection or idx is None:
            return
        task = int(strategy.experience.current_experience)
        n = idx.shape[1]
        want = torch.arange(task * n, (task + 1) * n, device=idx.device)
        self._hits += int((idx.sort(dim=1).values == want).all(dim=1).sum())
        self._seen += idx.shape[0]

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.selection and self._seen:
            self._row[int(strategy.experience.current_experience)] = self._hits / self._seen

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        if self.selection and self.trained and self._row:
            self.rows.append(dict(self._row))
        self._row = {}

    def method_info(self) -> dict:
        """Prompt-selection accuracy per evaluation (after each trained experience) and its final mean over the
        experiences trained so far."""
        if not self.rows:
            return {}
        last = self.rows[-1]
        seen = [last[j] for j in sorted(last) if j < self.trained] or list(last.values())
        return {"prompt_selection": [[row.get(j) for j in sorted(row)] for row in self.rows],
                "final_prompt_selection_acc": sum(seen) / len(seen)}
