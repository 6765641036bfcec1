"""Dynamic sparse training (DST) for continual learning: the task's update mask moves while the task trains.

Yildirim et al., "Continual Learning with Dynamic Sparse Training: Exploring Algorithms for Effective Model
Updates" (CPAL 2024) give every task a sparse sub-network of the weights that earlier tasks left free, found by
DST: start from a random topology with per-layer densities from ERK or uniform, and every ``update_every``
optimizer steps drop the ``drop_fraction`` weakest active weights of each layer and regrow as many inactive ones:

Drop-fraction schedule: ``drop_schedule="constant"`` (default) or ``"cosine"`` from ``drop_fraction`` down to
``drop_fraction_min`` at ``end_step`` (or ``end_fraction`` of the task's steps), after which the mask is fixed
(:func:`cosine_drop_fraction`). The papers' settings are :data:`PAPER_SCHEDULES`: Yildirim et al.'s code decays
0.5 -> 0.005 over the whole task with updates every 400 batches; RigL decays 0.3 -> 0 with updates every 100 steps
until 75% of training. Drop counts round to nearest (``round(f * count)``; RigL's code truncates, Yildirim et al.'s
rounds up).

- :class:`SET` (Mocanu et al., Nature Communications 2018): regrow uniformly at random;
- :class:`RigL` (Evci et al., "Rigging the Lottery", ICML 2020): regrow the inactive weights whose *dense* gradient
  of the step is largest (captured in ``after_backward``, before the guard masks it).

Per-layer counts (:func:`erk_densities`, :func:`layer_counts`), for a tensor of shape ``s`` with ``n = prod(s)``
entries: ERK (Evci et al. 2020, Erdos-Renyi-Kernel) gives ``density_l = eps * sum(s) / prod(s)``, i.e.
``(n_in + n_out) / (n_in * n_out)`` for a linear weight, with ``eps`` solved so that ``sum_l density_l * n_l``
equals ``density * sum_l n_l``; a layer whose density would exceed its cap (1, or the fraction of its entries
still free under ownership) is set to its cap and ``eps`` is solved again over the others. Counts are rounded by
largest remainder, so the total is exactly ``round(density * N)`` (fewer only if fewer entries are free).
``"uniform"`` gives every tensor ``min(round(density * n_l), free_l)``. The counts never change during a task:
each update drops ``k_l = round(f * count_l)`` and regrows exactly ``k_l`` in the same tensor.

Continual fine-tuning of a pretrained model (documented choice). From-scratch DST's inactive weights are 0 and
regrown weights start at 0. Here the model is dense and pretrained: the mask says which weights this task may
*change*, every weight outside it keeps its value from the task's start. Hence:

- a dropped weight is reset to its value at the task's start (the task's change to it is undone), so at the end of
  the task the model differs from its start exactly on the final mask (which becomes owned), and weights the task
  touched and later dropped are really free for later tasks;
- a regrown weight starts from its current value, which is its value at the task's start (it was outside the mask,
  or was dropped and reset): its *change* starts at 0, as a RigL weight starts at 0;
- ``drop_by="change"`` (default) drops the active weights with the smallest ``|w - w_start|``: magnitude pruning of
  the task's update, which is RigL/SET's magnitude pruning when ``w_start = 0``; ``drop_by="magnitude"`` drops the
  smallest ``|w|`` literally (which in a pretrained model mostly measures the pretrained weight);
- weights owned by earlier tasks are never active, dropped or regrown: they stay bit-identical.

The learner keeps a copy of the selectable weights at the task's start (memory: one copy of those weights).
The optimizer is not the learner's: Adam moments of a weight dropped and later regrown in the same task resume
from their (decayed) values; masked gradients are zero, so they decay by ``beta1`` at every step in between.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..config import check_range
from .guard import MaskedUpdate
from .learner import SparseConfig, SparseLearner
from .masks import topk_mask
from .registry import register_sparse_learner

INITS = ("erk", "uniform")
SCHEDULES = ("constant", "cosine")
DROP_CRITERIA = ("change", "magnitude")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(kw_only=True)
class DSTConfig(SparseConfig):
    """Options of :class:`SET` and :class:`RigL` (and those of :class:`SparseConfig`).

    Args:
        init: per-layer densities of the task's mask: ``"erk"`` or ``"uniform"`` (the topology itself is random).
        update_every: optimizer steps between mask updates, >= 1 (RigL's ``delta T``).
        drop_fraction: fraction of each layer's active weights dropped (and regrown) per update, in (0, 1)
            (RigL's ``alpha``; with ``drop_schedule="cosine"`` its value at step 0).
        drop_schedule: ``"constant"`` or ``"cosine"``: at step ``t`` (optimizer steps of the task so far, the
            update's own step included) ``drop_fraction_min + (drop_fraction - drop_fraction_min) *
            (1 + cos(pi * min(t, end) / end)) / 2`` (:func:`cosine_drop_fraction`); needs ``end_step`` or
            ``end_fraction``.
        drop_fraction_min: the cosine's floor, in [0, drop_fraction) (RigL: 0; Yildirim et al.'s code: 0.005).
        end_step: last optimizer step of a task (counted from 1) at which the mask may change, >= 1, or ``None``.
        end_fraction: the same as a fraction of the task's optimizer steps, in (0, 1]: ``end = max(1,
            floor(end_fraction * task_steps))`` with ``task_steps`` from ``set_task_steps`` (the Avalanche plugin
            passes ``len(dataloader) * train_epochs``). RigL stops at 0.75; Yildirim et al. decay over the whole
            task (1.0). At most one of ``end_step`` and ``end_fraction``; with neither, updates never stop
            (``"constant"`` only).
        drop_by: ``"change"`` (smallest ``|w - w_start|``, default) or ``"magnitude"`` (smallest ``|w|``).

    Defaults: a constant 0.3 every 100 steps with no end (RigL's ``alpha`` and ``delta T``, without its decay).
    The registered methods ``dst_set`` / ``dst_rigl`` update every 10 steps (the offline bench's experiences are
    25-60 steps long). The papers' schedules are in :data:`PAPER_SCHEDULES`.

    ``scope`` must stay ``"tensor"``: the per-layer counts come from ``init``.
    """

    init: str = "erk"
    update_every: int = 100
    drop_fraction: float = 0.3
    drop_schedule: str = "constant"
    drop_fraction_min: float = 0.0
    end_step: int | None = None
    end_fraction: float | None = None
    drop_by: str = "change"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope != "tensor":
            raise ValueError(f"scope must be 'tensor' for dynamic sparse training (per-layer densities come from "
                             f"init={self.init!r}), got {self.scope!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        _check_int("update_every", self.update_every, 1)
        check_range("drop_fraction", self.drop_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.drop_schedule not in SCHEDULES:
            raise ValueError(f"drop_schedule must be one of {list(SCHEDULES)}, got {self.drop_schedule!r}")
        check_range("drop_fraction_min", self.drop_fraction_min, 0.0, self.drop_fraction, high_open=True)
        if self.end_step is not None:
            _check_int("end_step", self.end_step, 1)
        if self.end_fraction is not None:
            check_range("end_fraction", self.end_fraction, 0.0, 1.0, low_open=True)
            if self.end_step is not None:
                raise ValueError(f"give end_step or end_fraction, not both (got {self.end_step} and "
                                 f"{self.end_fraction})")
        if self.drop_schedule == "cosine" and self.end_step is None and self.end_fraction is None:
            raise ValueError("drop_schedule='cosine' needs end_step (an int >= 1) or end_fraction (in (0, 1])")
        if self.drop_by not in DROP_CRITERIA:
            raise ValueError(f"drop_by must be one of {list(DROP_CRITERIA)}, got {self.drop_by!r}")


# -- per-layer densities --------------------------------------------------------------------------------------------
def _erk_raw(shape: Sequence[int]) -> float:
    numel = math.prod(shape)
    return sum(shape) / numel if len(shape) and numel else 1.0


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float,
                  caps: Mapping[str, float] | None = None) -> dict[str, float]:
    """ERK densities (real-valued): ``min(eps * sum(shape) / prod(shape), cap)`` with ``eps`` such that
    ``sum_l density_l * n_l = density * sum_l n_l`` (all layers at their cap if that is not reachable).

    Args:
        shapes: ``{name: shape}``.
        density: global density, in (0, 1].
        caps: ``{name: largest density}`` (default 1; under ownership, the free fraction of the tensor).
    """
    check_range("density", density, 0.0, 1.0, low_open=True)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    caps = {n: float(caps[n]) if caps is not None and n in caps else 1.0 for n in shapes}
    raw = {n: _erk_raw(s) for n, s in shapes.items()}
    target = density * sum(numel.values())
    if target >= sum(caps[n] * numel[n] for n in shapes):
        return dict(caps)
    capped: set[str] = set()
    for _ in range(len(shapes) + 1):  # every round caps at least one more layer or stops
        rest = [n for n in shapes if n not in capped]
        budget = target - sum(caps[n] * numel[n] for n in capped)
        weight = sum(raw[n] * numel[n] for n in rest)
        eps = budget / weight if weight > 0 else 0.0
        over = {n for n in rest if eps * raw[n] > caps[n]}
        if not over:
            break
        capped |= over
    return {n: caps[n] if n in capped else eps * raw[n] for n in shapes}


def _largest_remainder(real: Mapping[str, float], total: int, caps: Mapping[str, int]) -> dict[str, int]:
    counts = {n: min(int(math.floor(v + 1e-9)), caps[n]) for n, v in real.items()}
    order = sorted(real, key=lambda n: -(real[n] - math.floor(real[n] + 1e-9)))
    missing = total - sum(counts.values())
    while missing > 0:
        grew = False
        for n in order:
            if missing > 0 and counts[n] < caps[n]:
                counts[n] += 1
                missing -= 1
                grew = True
        if not grew:
            break
    return counts


def layer_counts(shapes: Mapping[str, Sequence[int]], density: float, init: str = "erk",
                 free: Mapping[str, int] | None = None) -> dict[str, int]:
    """Active entries per tensor: ``"uniform"``: ``min(round(density * n_l), free_l)``; ``"erk"``:
    :func:`erk_densities` capped at ``free_l / n_l``, rounded by largest remainder to exactly
    ``min(round(density * N), sum_l free_l)`` in total."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    free = {n: int(free[n]) if free is not None and n in free else numel[n] for n in shapes}
    if init == "uniform":
        check_range("density", density, 0.0, 1.0, low_open=True)
        return {n: min(round(density * numel[n]), free[n]) for n in shapes}
    if init != "erk":
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    caps = {n: free[n] / numel[n] if numel[n] else 0.0 for n in shapes}
    dens = erk_densities(shapes, density, caps)
    total = min(round(density * sum(numel.values())), sum(free.values()))
    return _largest_remainder({n: dens[n] * numel[n] for n in shapes}, total, free)


def cosine_drop_fraction(step: int, drop_fraction: float, end_step: int, minimum: float = 0.0) -> float:
    """Cosine decay of the drop fraction from ``drop_fraction`` at step 0 to ``minimum`` at ``end_step``:
    ``minimum + (drop_fraction - minimum) * (1 + cos(pi * min(step, end_step) / end_step)) / 2``.

    With ``minimum = 0`` this is RigL's schedule (Evci et al. 2020; google-research/rigl anneals the drop fraction
    with TensorFlow's ``cosine_decay(drop_fraction, global_step, end_step - begin_step)``, alpha 0); with
    ``minimum = 0.005`` and ``end_step`` the task's length it is the ``CosineAnnealingLR(death_rate, T_max,
    eta_min=0.005)`` of Yildirim et al.'s code (muratonuryildirim/CL-with-DST), stepped once per batch.
    """
    return minimum + (drop_fraction - minimum) * (1.0 + math.cos(math.pi * min(step, end_step) / end_step)) / 2.0


# The papers' schedules, for ``make_sparse_learner("set" | "rigl", model, **PAPER_SCHEDULES[name])``.
PAPER_SCHEDULES: dict[str, dict] = {
    # Yildirim et al. (CPAL 2024), CL-with-DST's cifar100.py defaults: death_rate 0.5, update_frequency 400,
    # cosine over the task's batches (T_max = len(loader) * epochs) down to eta_min 0.005, no end step
    "yildirim2024": {"drop_schedule": "cosine", "drop_fraction": 0.5, "drop_fraction_min": 0.005,
                     "update_every": 400, "end_fraction": 1.0},
    # Evci et al. (ICML 2020), ImageNet: alpha 0.3, delta T 100, cosine decay, updates stop at 75% of training
    "rigl2020": {"drop_schedule": "cosine", "drop_fraction": 0.3, "update_every": 100, "end_fraction": 0.75},
}


# -- learners -------------------------------------------------------------------------------------------------------
class DynamicSparseLearner(SparseLearner):
    """Base of :class:`SET` and :class:`RigL`: random initial topology (ERK/uniform counts over the free weights),
    drop by magnitude of the change (or weight) and regrow by :meth:`grow_scores` every ``update_every`` steps.

    Attributes (current task): ``step`` (optimizer steps), ``updates`` (list of ``{"step", "drop_fraction",
    "moved"}``, one per mask update), ``counts`` (active entries per tensor, constant).
    """

    name = "dst"
    config_cls = DSTConfig
    needs_dense_gradient = False

    def __init__(self, model, *, config: DSTConfig | None = None) -> None:
        super().__init__(model, config=config)
        self.start: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.step = 0
        self.updates: list[dict] = []
        self.dense_grads: dict[str, torch.Tensor] | None = None
        self.generator = torch.Generator()
        self.end_step: int | None = None  # the current task's last update step (from end_step or end_fraction)

    def resolve_end_step(self) -> int | None:
        """The current task's last update step: ``end_step``, or ``max(1, floor(end_fraction * task_steps))``."""
        cfg: DSTConfig = self.config
        if cfg.end_fraction is None:
            return cfg.end_step
        if self.task_steps is None:
            raise RuntimeError("end_fraction needs the task's length: call set_task_steps(n) before begin_task "
                               "(the Avalanche plugin does)")
        return max(1, math.floor(cfg.end_fraction * self.task_steps + 1e-9))

    def begin_task(self, batches=None):
        self.end_step = self.resolve_end_step()
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.step = 0
        self.updates = []
        self.dense_grads = None
        self.generator = torch.Generator().manual_seed(self.config.seed + 1000 * (self.task + 1))
        return super().begin_task(batches)

    def choose_masks(self, batches: list, frozen: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        cfg: DSTConfig = self.config
        free = {n: ~frozen[n] if frozen else torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.counts = layer_counts({n: tuple(p.shape) for n, p in self.params.items()}, cfg.density, cfg.init,
                                   {n: int(f.sum()) for n, f in free.items()})
        masks = {}
        for name, p in self.params.items():
            scores = torch.rand(p.shape, generator=self.generator).to(p.device)
            masks[name] = topk_mask(scores.masked_fill(~free[name], -math.inf), self.counts[name])
        return masks

    def requested_counts(self) -> dict[str, int]:
        """``init``'s counts on a model where nothing is owned (ERK or uniform)."""
        return layer_counts({n: tuple(p.shape) for n, p in self.params.items()}, self.config.density,
                            self.config.init)

    # -- protocol ------------------------------------------------------------------------------------------
    def _update_due(self, step: int) -> bool:
        cfg: DSTConfig = self.config
        return step % cfg.update_every == 0 and (self.end_step is None or step <= self.end_step)

    def after_backward(self) -> None:
        if self.needs_dense_gradient and self._update_due(self.step + 1):
            self.dense_grads = {n: p.grad.detach().clone() for n, p in self.params.items() if p.grad is not None}
        super().after_backward()

    def after_step(self) -> None:
        super().after_step()
        self.step += 1
        if self._update_due(self.step):
            self.update_masks()

    def end_task(self) -> None:
        super().end_task()
        self.start, self.dense_grads = {}, None

    # -- mask update ---------------------------------------------------------------------------------------
    def current_drop_fraction(self) -> float:
        cfg: DSTConfig = self.config
        if cfg.drop_schedule == "cosine":
            return cosine_drop_fraction(self.step, cfg.drop_fraction, self.end_step, cfg.drop_fraction_min)
        return cfg.drop_fraction

    @torch.no_grad()
    def update_masks(self) -> None:
        """Drop ``round(f * count)`` active entries per tensor (reset to their task-start value) and regrow as many
        free inactive ones; refresh the guard."""
        fraction = self.current_drop_fraction()
        frozen = self.owned if self.config.ownership else None
        moved = 0
        new_masks = {}
        for name, p in self.params.items():
            mask = self.masks[name]
            k = min(round(fraction * self.counts[name]), self.counts[name])
            if k == 0:
                new_masks[name] = mask
                continue
            w = p.detach()
            drop_score = (w - self.start[name]).abs() if self.config.drop_by == "change" else w.abs()
            drop_score = torch.nan_to_num(drop_score.float(), nan=math.inf).masked_fill(~mask, math.inf)
            dropped = topk_mask(-drop_score, k)
            kept = mask & ~dropped
            candidates = ~kept
            if frozen is not None:
                candidates &= ~frozen[name].to(mask.device)
            grow = self.grow_scores(name, p).to(mask.device).float()
            grow = torch.nan_to_num(grow, nan=0.0).masked_fill(~candidates, -math.inf)
            new = kept | topk_mask(grow, k)
            gone = mask & ~new
            p.copy_(torch.where(gone, self.start[name], w))
            moved += int((new & ~mask).sum())
            new_masks[name] = new
        self.masks = new_masks
        self.guard = MaskedUpdate(self.params, self.masks)
        self.dense_grads = None
        self.updates.append({"step": self.step, "drop_fraction": fraction, "moved": moved})

    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Scores of the inactive entries (larger regrows first)."""
        raise NotImplementedError


@register_sparse_learner
class SET(DynamicSparseLearner):
    """Sparse Evolutionary Training (Mocanu et al. 2018): regrow uniformly at random among free inactive weights."""

    name = "set"

    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return torch.rand(param.shape, generator=self.generator)


@register_sparse_learner
class RigL(DynamicSparseLearner):
    """RigL (Evci et al. 2020): regrow the free inactive weights with the largest ``|dense gradient|`` of the step
    that triggered the update."""

    name = "rigl"
    needs_dense_gradient = True

    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        if self.dense_grads is None:
            raise RuntimeError("RigL needs the dense gradient of the update step: call after_backward() after "
                               "backward() and before the optimizer step")
        grad = self.dense_grads.get(name)
        return torch.zeros_like(param) if grad is None else grad.abs()
