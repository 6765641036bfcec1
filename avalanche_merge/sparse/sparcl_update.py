"""``sparcl_update``: SparCL-style dynamic weight and gradient masks on a pretrained backbone's *task update*.

Not SparCL as published (that is :mod:`avalanche_merge.sparse.sparcl`, registered as ``sparcl``): an adaptation of
two of its ideas (Wang et al., "SparCL: Sparse Continual Learning on the Edge", NeurIPS 2022) to sparse fine-tuning
with task ownership, with no replay and no data removal:

- **dynamic weight masks** (after SparCL's TDM): a task trains a sparse set of weights (``density`` of the
  selectable weights) whose support changes during the task. Every ``update_interval`` optimizer steps a
  ``prune_fraction`` of the task's active weights is pruned and as many weights are regrown where the current
  mini-batch gradient is largest (RigL's rule; SparCL regrows at random). Weights taken by earlier tasks
  (``owned``) are never pruned nor regrown, so earlier tasks keep them bit for bit (SparCL has no ownership).
  The task's *update* is what is sparse: a pruned weight returns to its value at the start of the task (its delta
  becomes zero), and the default ``prune_criterion="delta"`` ranks active weights by ``|w - w_task_start|``;
  ``"weight"`` uses ``|w|``. Every weight outside the task's final mask is bit-identical to its value before the
  task, and that mask becomes owned at ``end_task``.
- **gradient masks** (after SparCL's DGM): of the active weights' gradients only the largest ``gradient_density``
  fraction (by magnitude) is applied; the gradient mask is recomputed from the current gradient every
  ``gradient_interval`` steps (steps 0, N, 2N, ... of the task) and reused in between. Weights outside the gradient
  mask are restored after the optimizer step, so Adam's moments and weight decay cannot move them either. Weights
  regrown between two refreshes join the gradient mask at once; pruned ones leave it. The classification head,
  when ``train_head``, trains densely (it is not selectable).

Pure torch; no Avalanche import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_range
from .learner import SparseConfig, SparseLearner
from .masks import applied_fraction, gradient_scores, pick_among, random_scores, select_masks
from .registry import register_sparse_learner

PRUNE_CRITERIA = ("delta", "weight")
INIT_CRITERIA = ("gradient", "random")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(kw_only=True)
class SparCLUpdateConfig(SparseConfig):
    """Options of :class:`SparCLUpdate`.

    Args:
        density: weight density, the fraction of the selectable weights a task trains at any time, in (0, 1].
        init: first mask of a task: ``"gradient"`` (largest accumulated gradient on the task's first batches;
            random when no batches are given) or ``"random"``.
        update_interval: prune/regrow every this many optimizer steps (steps N, 2N, ... of the task, before the
            step), int >= 0; 0 keeps the first mask.
        prune_fraction: fraction of the active weights pruned and regrown at each update, in [0, 1).
        prune_criterion: ``"delta"`` (``|w - w_task_start|``, default) or ``"weight"`` (``|w|``).
        gradient_density: fraction of the active weights' gradient entries applied, in (0, 1]; 1 disables the
            gradient masks.
        gradient_interval: the gradient mask is refreshed every this many steps (steps 0, N, 2N, ...), >= 1.
        seed: seeds the random first mask.
    """

    init: str = "gradient"
    update_interval: int = 5
    prune_fraction: float = 0.2
    prune_criterion: str = "delta"
    gradient_density: float = 0.5
    gradient_interval: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INIT_CRITERIA:
            raise ValueError(f"init must be one of {list(INIT_CRITERIA)}, got {self.init!r}")
        _check_int("update_interval", self.update_interval, 0)
        check_range("prune_fraction", self.prune_fraction, 0.0, 1.0, high_open=True)
        if self.prune_criterion not in PRUNE_CRITERIA:
            raise ValueError(f"prune_criterion must be one of {list(PRUNE_CRITERIA)}, got {self.prune_criterion!r}")
        check_range("gradient_density", self.gradient_density, 0.0, 1.0, low_open=True)
        _check_int("gradient_interval", self.gradient_interval, 1)


@register_sparse_learner
class SparCLUpdate(SparseLearner):
    """Dynamic weight and gradient masks on the task update of a backbone's selectable weights, with ownership.

    Per optimizer step ``s`` of a task (counted from 0), in :meth:`after_backward`:

    1. weight masks (``update_interval = U > 0``, ``s > 0`` and ``s % U == 0``): prune
       ``round(prune_fraction * active)`` active weights (smallest ``prune_criterion``; they return to their
       task-start values) and regrow as many free weights (not active, not owned, not just pruned) with the
       largest ``|grad|`` of this step; fewer free weights than that: fewer are pruned, so the density never
       changes;
    2. gradient masks (``s % gradient_interval == 0``): the gradient mask becomes the top ``gradient_density``
       fraction of ``|grad|`` over the active weights;
    3. gradients outside (weight mask & gradient mask) are zeroed; the guard restores those entries after the step.

    Statistics: ``updates`` (weight-mask updates of the current task), ``refreshes`` (steps at which the gradient
    mask was recomputed, current task), ``regrown`` (weights regrown per update, current task).
    """

    name = "sparcl_update"
    config_cls = SparCLUpdateConfig

    def __init__(self, model, *, config: SparCLUpdateConfig | None = None) -> None:
        super().__init__(model, config=config)
        self.step = 0
        self.grad_masks: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.updates: list[int] = []
        self.refreshes: list[int] = []
        self.regrown: list[int] = []

    # -- masks -----------------------------------------------------------------------------------------------
    def choose_masks(self, batches: list, frozen: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        cfg: SparCLUpdateConfig = self.config
        if cfg.init == "gradient" and batches:
            scores = gradient_scores(self.model, self.params, batches)
        else:
            scores = random_scores(self.params, seed=cfg.seed + 1000 * self.task)
        return select_masks(scores, cfg.density, scope=cfg.scope, frozen=frozen)

    def begin_task(self, batches=None) -> list:
        params = super().begin_task(batches)
        self.step = 0
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.grad_masks = {n: m.clone() for n, m in self.masks.items()}
        self.updates, self.refreshes, self.regrown = [], [], []
        self._sync_guard()
        return params

    def _sync_guard(self) -> None:
        """The guard lets through exactly (weight mask & gradient mask)."""
        self.guard.masks = {n: (self.masks[n] & self.grad_masks[n]).to(p.device) for n, p in self.params.items()}

    def _frozen(self) -> dict[str, torch.Tensor]:
        if self.config.ownership:
            return self.owned
        return {n: torch.zeros_like(m) for n, m in self.masks.items()}

    def _counts(self, masks: dict[str, torch.Tensor], fraction: float) -> dict[str, int] | int:
        if self.config.scope == "tensor":
            return {n: round(fraction * int(m.sum())) for n, m in masks.items()}
        return round(fraction * sum(int(m.sum()) for m in masks.values()))

    @torch.no_grad()
    def _tdm_update(self) -> None:
        cfg: SparCLUpdateConfig = self.config
        grads = {n: (p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.params.items()}
        frozen = self._frozen()
        free = {n: ~self.masks[n] & ~frozen[n].to(self.masks[n].device) for n in self.params}
        n_prune = self._counts(self.masks, cfg.prune_fraction)
        if isinstance(n_prune, dict):  # never prune more than can be regrown: the density stays put
            n_prune = {n: min(k, int(free[n].sum())) for n, k in n_prune.items()}
        else:
            n_prune = min(n_prune, sum(int(f.sum()) for f in free.values()))
        grown = pick_among(grads, free, n_prune, largest=True)
        if isinstance(n_prune, dict):
            n_prune = {n: int(g.sum()) for n, g in grown.items()}
        if cfg.prune_criterion == "delta":
            prune_scores = {n: (p.detach() - self.start[n]).abs() for n, p in self.params.items()}
        else:
            prune_scores = {n: p.detach().abs() for n, p in self.params.items()}
        pruned = pick_among(prune_scores, self.masks, n_prune, largest=False)
        for n, p in self.params.items():
            p.copy_(torch.where(pruned[n], self.start[n], p))  # a pruned weight's delta returns to zero
            self.masks[n] = (self.masks[n] & ~pruned[n]) | grown[n]
            self.grad_masks[n] = (self.grad_masks[n] & ~pruned[n]) | grown[n]
        self.updates.append(self.step)
        self.regrown.append(sum(int(g.sum()) for g in grown.values()))

    @torch.no_grad()
    def _dgm_refresh(self) -> None:
        grads = {n: (p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.params.items()}
        self.grad_masks = pick_among(grads, self.masks, self._counts(self.masks, self.config.gradient_density),
                                largest=True)
        self.refreshes.append(self.step)

    # -- protocol ---------------------------------------------------------------------------------------------
    def after_backward(self) -> None:
        cfg: SparCLUpdateConfig = self.config
        s = self.step
        if cfg.update_interval and cfg.prune_fraction > 0 and s > 0 and s % cfg.update_interval == 0:
            self._tdm_update()
        if s % cfg.gradient_interval == 0:
            self._dgm_refresh()
        self._sync_guard()
        self.guard.mask_gradients()

    def after_step(self) -> None:
        super().after_step()
        self.step += 1

    def gradient_fraction(self) -> float:
        """Fraction of the active weights whose gradient is currently applied."""
        return applied_fraction(self.masks, self.grad_masks)
