"""SparCL as published (Wang et al., "SparCL: Sparse Continual Learning on the Edge", NeurIPS 2022).

Checked against the authors' code, github.com/neu-spiral/SparCL (``main_sparse_train_w_data_gradient_efficient.py``,
``prune_utils/retrain.py``, ``prune_utils/utils_pr.py`` and the script ``run_mag_prune_irr_sp_EM_0.75_gradient0.80.sh``:
ResNet-18 on DER++ with a 500-sample buffer, 75% weight sparsity, 80% gradient sparsity). SparCL trains one sparse
network, shared by every task, on top of a rehearsal method; its three parts:

- **TDM, task-aware dynamic masking** (paper Sec. 4.1). The selectable weights are magnitude-pruned to ``density``
  before the first task (weights outside the mask are zero and stay zero). At the start of epoch ``e`` (0-based) of
  every task, when ``e % mask_update_every == 0`` (:func:`tdm_densities`):

  * ``e == 0`` (a new task): prune to ``density`` by importance, then regrow at random to
    ``density + regrow_fraction`` (room for the new task);
  * ``0 < e < mask_fixed_from``: prune to ``density - regrow_fraction`` by importance, regrow at random to
    ``density``;
  * ``e >= mask_fixed_from``: prune to ``density`` by importance, no regrowth (the mask is fixed).

  Importance (:func:`importance`) is ``|w| + importance_lambda * |g|`` where ``g`` is the gradient left by the last
  training step: the gradient of the rehearsal method's whole loss, current mini-batch *and* buffer terms. The
  paper weighs the current-data and buffer gradients separately (alpha, beta of its Eq. 1); the authors' code merges
  them into this single term (their README: alpha = beta performs the same). Pruned weights are set to zero;
  regrown weights are drawn uniformly among all zero weights (the just-pruned ones included) and start at zero.
- **DGM, dynamic gradient masking** (paper Sec. 4.3). Every ``gradient_every`` iterations of an epoch (iterations 0,
  N, 2N, ...; the count restarts each epoch) the gradient mask is recomputed: of each tensor's entries only the
  ``1 - gradient_sparsity`` fraction with the largest nonzero ``|g|`` among the active weights keep their gradient;
  in between, the stored mask is applied (:func:`gradient_mask`). The reference zeroes the other gradients under
  SGD without momentum; here the update guard also restores them after the step, so Adam's moments and weight
  decay cannot move them either.
- **DDR, dynamic data removal** (paper Sec. 4.2): :mod:`avalanche_merge.sparse.ddr` (per-stage forgetting counts);
  its schedule options live in :class:`SparCLConfig`.

Deviations: the classification head (``train_head``) and the non-selectable parameters train densely, as the
reference's unpruned layers do; ``scope="global"`` ranks all tensors together (the reference ranks per tensor, the
default). Pure torch; no Avalanche import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_range
from .ddr import check_removal_schedule
from .guard import MaskedUpdate
from .learner import SparseConfig, SparseLearner
from .masks import applied_fraction, pick_among
from .registry import register_sparse_learner


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(kw_only=True)
class SparCLConfig(SparseConfig):
    """Options of :class:`SparCL` and of its data removal; defaults from the authors' script.

    Args:
        density: weight density of the selectable weights, in (0, 1] (the script: sparsity 0.75).
        regrow_fraction: fraction of each tensor regrown at random at a mask update (the script's bounds differ by
            0.01), in [0, density); ``density + regrow_fraction`` must be <= 1.
        mask_update_every: the mask is updated at the start of epochs 0, N, 2N, ... of every task, >= 1 (the
            script: 5).
        mask_fixed_from: from this epoch on an update only prunes to ``density`` (the script: 45 of 50), >= 1.
        importance_lambda: weight of ``|gradient|`` in the importance ``|w| + lambda |g|``, >= 0 (the code's
            ``sp_lmd``: 0.5).
        gradient_sparsity: fraction of each tensor's gradient entries dropped by DGM, in [0, 1) (the script: 0.8,
            so 80% of the active weights' gradients are kept at weight sparsity 0.75).
        gradient_every: DGM recomputes the gradient mask every this many iterations of an epoch, >= 1 (the code's
            ``sample_frequency``: 30).
        removal_fraction: DDR: fraction of a task's examples removed over all stages, in [0, 1); 0 disables (the
            script: 3000 of 10000).
        removal_every: DDR: a stage ends every this many epochs (its forgetting statistics), >= 2 when removing
            (the script: 5).
        removal_until: DDR: last epoch after which a stage may end (the script: 20).
        ownership: must stay False: SparCL shares every weight across tasks (``sparcl_update`` owns masks).
        max_samples: unused (the first mask is chosen by magnitude, from no data).
        seed: seeds the random regrowth and the order of ties in data removal.
    """

    density: float = 0.25
    ownership: bool = False
    regrow_fraction: float = 0.01
    mask_update_every: int = 5
    mask_fixed_from: int = 45
    importance_lambda: float = 0.5
    gradient_sparsity: float = 0.8
    gradient_every: int = 30
    removal_fraction: float = 0.3
    removal_every: int = 5
    removal_until: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ownership:
            raise ValueError(
                "ownership must be False: SparCL trains one sparse network shared by every task (the "
                "owned-mask variant is the 'sparcl_update' learner)"
            )
        check_range("regrow_fraction", self.regrow_fraction, 0.0, self.density, high_open=True)
        if self.density + self.regrow_fraction > 1:
            raise ValueError(f"density + regrow_fraction must be <= 1, got {self.density} + {self.regrow_fraction}")
        _check_int("mask_update_every", self.mask_update_every, 1)
        _check_int("mask_fixed_from", self.mask_fixed_from, 1)
        check_range("importance_lambda", self.importance_lambda, 0.0)
        check_range("gradient_sparsity", self.gradient_sparsity, 0.0, 1.0, high_open=True)
        _check_int("gradient_every", self.gradient_every, 1)
        check_removal_schedule(self.removal_fraction, self.removal_every, self.removal_until, epochs=10**9)

    def check_epochs(self, epochs: int) -> None:
        """Refuse a training schedule of ``epochs`` per experience that cannot run SparCL's schedule: a mask that
        is never adjusted within a task, or a data removal that measures no forgetting.

        Raises:
            ValueError: naming the option and the epochs needed.
        """
        _check_int("epochs", epochs, 1)
        if self.mask_update_every >= epochs:
            raise ValueError(
                f"mask_update_every={self.mask_update_every} never adjusts the mask within a task of "
                f"{epochs} epochs (only the task-start regrowth would run); SparCL needs at least "
                f"{self.mask_update_every + 1} epochs per experience, or a smaller mask_update_every"
            )
        check_removal_schedule(self.removal_fraction, self.removal_every, self.removal_until, epochs)


# -- the maths of one update, on plain tensors ---------------------------------------------------------------------
def importance(weight: torch.Tensor, grad: torch.Tensor | None, lam: float) -> torch.Tensor:
    """SparCL's weight importance ``|w| + lam * |g|`` (``g``: the training loss's gradient, buffer terms included;
    ``None``: no gradient yet, ``|w|``)."""
    score = weight.detach().abs().float()
    if grad is not None and lam:
        score = score + lam * grad.detach().abs().float()
    return score


def tdm_densities(
    epoch: int, *, density: float, regrow_fraction: float, every: int, fixed_from: int
) -> tuple[float, float] | None:
    """TDM's ``(density kept by pruning, density after random regrowth)`` at the start of epoch ``epoch``
    (0-based, within a task), or ``None`` when the mask is not updated then."""
    if epoch % every:
        return None
    if epoch >= fixed_from:
        return density, density
    if epoch == 0:
        return density, density + regrow_fraction
    return density - regrow_fraction, density


def gradient_mask(
    grads: dict[str, torch.Tensor | None], masks: dict[str, torch.Tensor], counts: dict[str, int] | int
) -> dict[str, torch.Tensor]:
    """DGM: the ``counts`` active entries with the largest nonzero ``|grad|`` (``grads`` already masked or not)."""
    scores, allowed = {}, {}
    for n, m in masks.items():
        g = grads.get(n)
        g = torch.zeros_like(m, dtype=torch.float32) if g is None else g.detach().abs().float() * m
        scores[n], allowed[n] = g, m & (g != 0)
    return pick_among(scores, allowed, counts, largest=True)


@register_sparse_learner
class SparCL(SparseLearner):
    """SparCL's weight (TDM) and gradient (DGM) sparsity on a model's selectable weights.

    Protocol (the Avalanche plugin :class:`~avalanche_merge.plugins.sparcl.SparCLPlugin` drives it):
    ``begin_task()`` -> per epoch ``begin_epoch(grads)`` -> per iteration ``after_backward()``, ``before_step()``,
    ``after_step()`` -> ``end_task()``. ``grads`` is ``{name: p.grad}`` as the last training step left it.

    Statistics (current task): ``updates``, one ``(epoch, pruned, regrown)`` per TDM update; ``refreshes``, one
    ``(epoch, iteration)`` per DGM recomputation.
    """

    name = "sparcl"
    config_cls = SparCLConfig

    def __init__(self, model, *, config: SparCLConfig | None = None) -> None:
        super().__init__(model, config=config)
        self.epoch = self.iteration = 0
        self.grad_masks: dict[str, torch.Tensor] = {}
        self.updates: list[tuple[int, int, int]] = []
        self.refreshes: list[tuple[int, int]] = []
        self._rng = torch.Generator().manual_seed(self.config.seed)

    def _counts(self, density: float) -> dict[str, int] | int:
        if self.config.scope == "tensor":
            return {n: round(density * p.numel()) for n, p in self.params.items()}
        return round(density * sum(p.numel() for p in self.params.values()))

    def _sync_guard(self) -> None:
        self.guard.masks = {n: (self.masks[n] & self.grad_masks[n]).to(p.device) for n, p in self.params.items()}

    @torch.no_grad()
    def begin_task(self, batches=None) -> list[torch.nn.Parameter]:
        """Start a task; before the first one, magnitude-prune the selectable weights to ``density``."""
        self.task += 1
        if not self.masks:
            scores = {n: p.detach().abs().float() for n, p in self.params.items()}
            every = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
            self.masks = pick_among(scores, every, self._counts(self.config.density))
            for n, p in self.params.items():
                p.mul_(self.masks[n].to(p.dtype))
            self.guard = MaskedUpdate(self.params, self.masks)
        self.grad_masks = {n: m.clone() for n, m in self.masks.items()}
        self.epoch = self.iteration = 0
        self.updates, self.refreshes = [], []
        self._sync_guard()
        for p in self.params.values():
            p.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def begin_epoch(self, grads: dict[str, torch.Tensor | None] | None = None) -> None:
        """TDM at the start of the task's next epoch: prune by importance, regrow at random (:func:`tdm_densities`)."""
        cfg: SparCLConfig = self.config
        epoch, self.epoch, self.iteration = self.epoch, self.epoch + 1, 0
        step = tdm_densities(
            epoch,
            density=cfg.density,
            regrow_fraction=cfg.regrow_fraction,
            every=cfg.mask_update_every,
            fixed_from=cfg.mask_fixed_from,
        )
        if step is None:
            return
        grads = grads or {}
        scores = {n: importance(p, grads.get(n), cfg.importance_lambda) for n, p in self.params.items()}
        kept = pick_among(scores, self.masks, self._counts(step[0]))
        free = {n: ~k for n, k in kept.items()}
        target = self._counts(step[1])
        if isinstance(target, dict):
            grow = {n: max(0, target[n] - int(kept[n].sum())) for n in kept}
        else:
            grow = max(0, target - sum(int(k.sum()) for k in kept.values()))
        noise = {n: torch.rand(p.shape, generator=self._rng).to(p.device) for n, p in self.params.items()}
        grown = pick_among(noise, free, grow)
        pruned = sum(int((self.masks[n] & ~kept[n]).sum()) for n in kept)
        for n, p in self.params.items():
            p.mul_(kept[n].to(p.dtype))  # pruned weights become zero; regrown ones start at zero
            self.masks[n] = kept[n] | grown[n]
            self.grad_masks[n] &= self.masks[n]
        self._sync_guard()
        self.updates.append((epoch, pruned, sum(int(g.sum()) for g in grown.values())))

    @torch.no_grad()
    def after_backward(self) -> None:
        """DGM: recompute the gradient mask every ``gradient_every`` iterations of the epoch, apply it always."""
        cfg: SparCLConfig = self.config
        if self.iteration % cfg.gradient_every == 0:
            grads = {n: p.grad for n, p in self.params.items()}
            self.grad_masks = gradient_mask(grads, self.masks, self._counts(1.0 - cfg.gradient_sparsity))
            self.refreshes.append((self.epoch - 1, self.iteration))
        self._sync_guard()
        self.guard.mask_gradients()

    def after_step(self) -> None:
        super().after_step()
        self.iteration += 1

    def gradient_fraction(self) -> float:
        """Fraction of the active weights whose gradient is currently applied."""
        return applied_fraction(self.masks, self.grad_masks)
