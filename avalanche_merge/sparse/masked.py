"""``MaskedFineTuner``: sparse fine-tuning with one fixed mask per task, chosen when the task starts.

The criteria are those of :mod:`avalanche_merge.sparse.masks` (SIFT's gradient magnitude, Fisher information,
LT-SFT's weight change after a dense phase, random); with ``ownership`` each task may only take weights that no
earlier task took, and every task's weights stay in use at test time (no task label needed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import check_range
from .learner import SparseConfig, SparseLearner
from .masks import change_scores, cross_entropy_loss, fisher_scores, gradient_scores, random_scores, select_masks
from .registry import register_sparse_learner

CRITERIA = ("gradient", "fisher", "change", "random")


@dataclass(kw_only=True)
class MaskedConfig(SparseConfig):
    """Options of :class:`MaskedFineTuner`.

    Args:
        criterion: ``"gradient"`` (SIFT), ``"fisher"``, ``"change"`` (LT-SFT) or ``"random"``.
        dense_steps: SGD steps of the dense phase of ``"change"``, >= 1.
        dense_lr: learning rate of that phase, > 0.
    """

    criterion: str = "gradient"
    dense_steps: int = 20
    dense_lr: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {self.criterion!r}")
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 1:
            raise ValueError(f"dense_steps must be an int >= 1, got {self.dense_steps!r}")
        check_range("dense_lr", self.dense_lr, 0.0, None, low_open=True)


@register_sparse_learner
class MaskedFineTuner(SparseLearner):
    """Sparse fine-tuning with one fixed mask per task, chosen at the task's start by ``criterion``."""

    name = "masked"
    config_cls = MaskedConfig

    def choose_masks(self, batches: list, frozen: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        cfg: MaskedConfig = self.config
        if cfg.criterion in ("gradient", "fisher", "change") and not batches:
            raise ValueError(f"criterion {cfg.criterion!r} needs the task's (x, y) batches")
        if cfg.criterion == "gradient":
            scores = gradient_scores(self.model, self.params, batches)
        elif cfg.criterion == "fisher":
            scores = fisher_scores(self.model, self.params, batches)
        elif cfg.criterion == "change":
            scores = self._dense_phase_change(batches)
        else:
            scores = random_scores(self.params, seed=cfg.seed + 1000 * self.task)
        return select_masks(scores, cfg.density, scope=cfg.scope, frozen=frozen)

    def _dense_phase_change(self, batches: list) -> dict[str, torch.Tensor]:
        """LT-SFT: fine-tune the selectable weights densely for ``dense_steps`` SGD steps on a copy, score the
        change; the model itself is untouched (the copy is discarded)."""
        cfg: MaskedConfig = self.config
        probe = copy.deepcopy(self.model)
        probe_params = dict(probe.named_parameters())
        params = [probe_params[n] for n in self.params]
        probe.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=cfg.dense_lr)
        for step in range(cfg.dense_steps):
            opt.zero_grad(set_to_none=True)
            cross_entropy_loss(probe, batches[step % len(batches)]).backward()
            opt.step()
        return change_scores({n: p for n, p in self.params.items()}, {n: probe_params[n] for n in self.params})
