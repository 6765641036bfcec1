"""SparCL: sparse continual learning (Wang et al., "SparCL: Sparse Continual Learning on the Edge", NeurIPS 2022).

SparCL combines three kinds of sparsity; here, adapted to the sparse fine-tuning of a pretrained backbone:

- **TDM, task-aware dynamic masking** (paper Sec. 4.1): a task trains a sparse set of weights (``density`` of the
  selectable weights) whose support changes during the task. Every ``update_interval`` optimizer steps a
  ``prune_fraction`` of the task's active weights is pruned (smallest magnitude) and as many weights are regrown
  where the current mini-batch gradient is largest. *Task-aware*: weights taken by earlier tasks (``owned``) are
  never pruned nor regrown, so earlier tasks keep them bit for bit.

  Adaptation: the paper trains a sparse network from scratch, where pruning a weight sets it to zero. Zeroing 90%
  of a pretrained backbone destroys it, so here the *task's update* is what is sparse: a pruned weight returns to
  its value at the start of the task (its delta becomes zero, the fine-tuning analogue of zeroing it), and the
  default ``prune_criterion="delta"`` ranks active weights by ``|w - w_task_start|`` (the magnitude of the task's
  sparse update); ``"weight"`` uses ``|w|`` as in the paper. Consequence: every weight outside the task's final
  mask is bit-identical to its value before the task, and that mask becomes owned at ``end_task``.
- **DGM, dynamic gradient masking** (paper Sec. 4.3): of the active weights' gradients only the largest
  ``gradient_density`` fraction (by magnitude) is applied; the gradient mask is recomputed from the current
  gradient every ``gradient_interval`` steps (steps 0, N, 2N, ... of the task) and reused in between. Weights
  outside the gradient mask are restored after the optimizer step, so Adam's moments and weight decay cannot move
  them either. Weights regrown by TDM between two refreshes join the gradient mask at once (they were chosen for
  their large gradient); pruned ones leave it. The classification head, when ``train_head``, trains densely (it
  is not selectable).
- **DDR, dynamic data removal** (paper Sec. 4.2): the task's training examples with the fewest forgetting events
  (Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural Network Learning", ICLR 2019) are
  the least informative and are removed in stages: ``removal_fraction`` of the task's data in total, in equal
  parts after each epoch of ``removal_epochs``. :class:`ForgettingTracker` counts the events; the Avalanche side
  (getting per-example correctness, rebuilding the data loader) is :mod:`avalanche_merge.plugins.sparcl`.

Pure torch; no Avalanche import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import check_range
from .learner import SparseConfig, SparseLearner
from .masks import gradient_scores, random_scores, select_masks
from .registry import register_sparse_learner

PRUNE_CRITERIA = ("delta", "weight")
INIT_CRITERIA = ("gradient", "random")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(kw_only=True)
class SparCLConfig(SparseConfig):
    """Options of :class:`SparCL` (and of its plugin's data removal).

    Args:
        density: weight density, the fraction of the selectable weights a task trains at any time, in (0, 1].
        init: first mask of a task: ``"gradient"`` (largest accumulated gradient on the task's first batches;
            random when no batches are given) or ``"random"``.
        update_interval: TDM prune/regrow every this many optimizer steps (steps N, 2N, ... of the task, before
            the step), int >= 0; 0 keeps the first mask (no TDM).
        prune_fraction: fraction of the active weights pruned and regrown at each TDM update, in [0, 1).
        prune_criterion: ``"delta"`` (``|w - w_task_start|``, default) or ``"weight"`` (``|w|``, the paper's).
        gradient_density: DGM: fraction of the active weights' gradient entries applied, in (0, 1]; 1 disables DGM.
        gradient_interval: DGM: the gradient mask is refreshed every this many steps (steps 0, N, 2N, ...), >= 1.
        removal_fraction: DDR: fraction of the task's training examples removed in total, in [0, 1); 0 disables.
        removal_epochs: DDR: after which epochs (1-based, strictly increasing) a stage of removal happens; each
            stage removes an equal share of ``removal_fraction``. Stages at or after the last epoch are skipped.
        seed: seeds the random first mask and the tie-breaking of data removal.
    """

    init: str = "gradient"
    update_interval: int = 5
    prune_fraction: float = 0.2
    prune_criterion: str = "delta"
    gradient_density: float = 0.5
    gradient_interval: int = 5
    removal_fraction: float = 0.2
    removal_epochs: tuple[int, ...] = (1,)

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
        check_range("removal_fraction", self.removal_fraction, 0.0, 1.0, high_open=True)
        if isinstance(self.removal_epochs, int) or not isinstance(self.removal_epochs, Sequence):
            raise ValueError(f"removal_epochs must be a sequence of ints >= 1, got {self.removal_epochs!r}")
        self.removal_epochs = tuple(self.removal_epochs)
        for epoch in self.removal_epochs:
            _check_int("each of removal_epochs", epoch, 1)
        if any(b <= a for a, b in zip(self.removal_epochs, self.removal_epochs[1:])):
            raise ValueError(f"removal_epochs must be strictly increasing, got {list(self.removal_epochs)}")
        if self.removal_fraction > 0 and not self.removal_epochs:
            raise ValueError(f"removal_fraction={self.removal_fraction} needs at least one of removal_epochs")


# -- top-k helpers over a dict of tensors (per tensor or global) ----------------------------------------------------
def _pick(scores: dict[str, torch.Tensor], allowed: dict[str, torch.Tensor], counts: dict[str, int] | int, *,
          largest: bool) -> dict[str, torch.Tensor]:
    """Masks of the ``counts`` entries (per tensor: a dict; global: an int) with the largest (or smallest) scores
    among the ``allowed`` ones. Ties are broken by ``torch.topk`` (deterministic on CPU)."""
    fill = -float("inf") if largest else float("inf")
    masked = {n: torch.nan_to_num(s.float(), nan=-fill).masked_fill(~allowed[n], fill) for n, s in scores.items()}
    if isinstance(counts, dict):
        out = {}
        for n, s in masked.items():
            k = min(counts[n], int(allowed[n].sum()))
            out[n] = _topk(s.flatten(), k, largest).view_as(s)
        return out
    flat = torch.cat([s.flatten() for s in masked.values()])
    k = min(counts, int(sum(int(a.sum()) for a in allowed.values())))
    chosen = _topk(flat, k, largest)
    out, start = {}, 0
    for n, s in masked.items():
        out[n] = chosen[start:start + s.numel()].view_as(s)
        start += s.numel()
    return out


def _topk(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, largest=largest, sorted=False).indices] = True
    return mask


@register_sparse_learner
class SparCL(SparseLearner):
    """SparCL's weight (TDM) and gradient (DGM) sparsity on a backbone's selectable weights.

    Per optimizer step ``s`` of a task (counted from 0), in :meth:`after_backward`:

    1. TDM (``update_interval = U > 0``, ``s > 0`` and ``s % U == 0``): prune ``round(prune_fraction * active)``
       active weights (smallest ``prune_criterion``; they return to their task-start values) and regrow as many
       free weights (not active, not owned, not just pruned) with the largest ``|grad|`` of this step; fewer free
       weights than that: fewer are pruned, so the density never changes;
    2. DGM (``s % gradient_interval == 0``): the gradient mask becomes the top ``gradient_density`` fraction of
       ``|grad|`` over the active weights;
    3. gradients outside (weight mask & gradient mask) are zeroed; the guard restores those entries after the step.

    Statistics: ``updates`` (TDM updates of the current task), ``refreshes`` (steps at which the gradient mask was
    recomputed, current task), ``regrown`` (weights regrown per TDM update, current task).
    """

    name = "sparcl"
    config_cls = SparCLConfig

    def __init__(self, model, *, config: SparCLConfig | None = None) -> None:
        super().__init__(model, config=config)
        self.step = 0
        self.grad_masks: dict[str, torch.Tensor] = {}
        self.start: dict[str, torch.Tensor] = {}
        self.updates: list[int] = []
        self.refreshes: list[int] = []
        self.regrown: list[int] = []

    # -- masks -----------------------------------------------------------------------------------------------
    def choose_masks(self, batches: list, frozen: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        cfg: SparCLConfig = self.config
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
        cfg: SparCLConfig = self.config
        grads = {n: (p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.params.items()}
        frozen = self._frozen()
        free = {n: ~self.masks[n] & ~frozen[n].to(self.masks[n].device) for n in self.params}
        n_prune = self._counts(self.masks, cfg.prune_fraction)
        if isinstance(n_prune, dict):  # never prune more than can be regrown: the density stays put
            n_prune = {n: min(k, int(free[n].sum())) for n, k in n_prune.items()}
        else:
            n_prune = min(n_prune, sum(int(f.sum()) for f in free.values()))
        grown = _pick(grads, free, n_prune, largest=True)
        if isinstance(n_prune, dict):
            n_prune = {n: int(g.sum()) for n, g in grown.items()}
        if cfg.prune_criterion == "delta":
            prune_scores = {n: (p.detach() - self.start[n]).abs() for n, p in self.params.items()}
        else:
            prune_scores = {n: p.detach().abs() for n, p in self.params.items()}
        pruned = _pick(prune_scores, self.masks, n_prune, largest=False)
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
        self.grad_masks = _pick(grads, self.masks, self._counts(self.masks, self.config.gradient_density),
                                largest=True)
        self.refreshes.append(self.step)

    # -- protocol ---------------------------------------------------------------------------------------------
    def after_backward(self) -> None:
        cfg: SparCLConfig = self.config
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
        active = sum(int(m.sum()) for m in self.masks.values())
        applied = sum(int((m & self.grad_masks[n]).sum()) for n, m in self.masks.items())
        return applied / active if active else 0.0


# -- dynamic data removal ----------------------------------------------------------------------------------------
class ForgettingTracker:
    """Per-example forgetting events (Toneva et al., ICLR 2019) over a dataset of ``n`` examples.

    A *forgetting event* is a transition from correctly to incorrectly classified between two consecutive
    observations of the same example (:meth:`update`). Examples never classified correctly are *never learned*:
    Toneva et al. count them as forgotten infinitely often, the most informative; examples learned once and never
    forgotten ("unforgettable") are the least informative, those SparCL's data removal drops first.

    Args:
        n: number of examples (indices ``0 .. n-1``).
    """

    def __init__(self, n: int) -> None:
        _check_int("n", n, 0)
        self.n = n
        self._counts = torch.zeros(n, dtype=torch.long)
        self._last = torch.zeros(n, dtype=torch.bool)
        self._learned = torch.zeros(n, dtype=torch.bool)
        self._seen = torch.zeros(n, dtype=torch.long)

    def update(self, indices, correct) -> None:
        """Record one observation of the examples ``indices``: ``correct[i]`` says whether ``indices[i]`` is
        classified correctly now. Each index at most once per call."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten().cpu()
        ok = torch.as_tensor(correct).flatten().cpu().bool()
        if idx.shape != ok.shape:
            raise ValueError(f"indices and correct must have the same length, got {idx.numel()} and {ok.numel()}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise ValueError(f"indices must be in [0, {self.n}), got min {int(idx.min())}, max {int(idx.max())}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("indices must not repeat within one update")
        forgotten = self._last[idx] & ~ok & (self._seen[idx] > 0)
        self._counts[idx] += forgotten.long()
        self._last[idx] = ok
        self._learned[idx] |= ok
        self._seen[idx] += 1

    @property
    def counts(self) -> torch.Tensor:
        """Forgetting events per example (a copy)."""
        return self._counts.clone()

    @property
    def learned(self) -> torch.Tensor:
        """Whether each example was ever classified correctly (a copy)."""
        return self._learned.clone()

    @property
    def observations(self) -> torch.Tensor:
        """How many times each example was observed (a copy)."""
        return self._seen.clone()

    def ranking(self, among=None, *, seed: int = 0) -> torch.Tensor:
        """``among`` (default: all indices) from most to least informative: never learned first, then by
        decreasing forgetting count; ties in a random order seeded by ``seed`` (a fixed order such as the index
        would remove whole classes first from a class-sorted dataset)."""
        idx = torch.arange(self.n) if among is None else torch.as_tensor(among, dtype=torch.long).flatten().cpu()
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("among must not repeat indices")
        idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))]  # tie order
        key = self._counts[idx].clone()
        key[~self._learned[idx]] = torch.iinfo(torch.long).max
        return idx[torch.argsort(key, descending=True, stable=True)]

    def keep(self, fraction: float, among=None, *, seed: int = 0) -> torch.Tensor:
        """The ``round(fraction * len(among))`` most informative examples of ``among`` (default: all), sorted by
        index: the rest, those with the fewest forgetting events, are removed."""
        check_range("fraction", fraction, 0.0, 1.0)
        ranked = self.ranking(among, seed=seed)
        return torch.sort(ranked[:round(fraction * ranked.numel())]).values


def removal_schedule(n: int, removal_fraction: float, removal_epochs: Sequence[int]) -> dict[int, int]:
    """``{epoch: examples kept after it}``: stage ``i`` of ``k`` keeps ``n - round(removal_fraction * n * i / k)``."""
    k = len(removal_epochs)
    return {e: n - round(removal_fraction * n * (i + 1) / k) for i, e in enumerate(removal_epochs)}
