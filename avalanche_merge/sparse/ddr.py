"""Dynamic data removal (DDR) of SparCL (Wang et al., "SparCL: Sparse Continual Learning on the Edge", NeurIPS 2022).

SparCL drops a task's least informative training examples in stages. Informativeness is the number of forgetting
events of an example (Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural Network Learning",
ICLR 2019): a transition from correctly to incorrectly classified between two consecutive observations.

The schedule follows the authors' code (github.com/neu-spiral/SparCL,
``main_sparse_train_w_data_gradient_efficient.py``):

- a *stage* ends after every ``every`` epochs of a task, up to epoch ``until`` (the script: every 5 epochs up to
  epoch 20 of 50, so 4 stages);
- at the end of a stage the examples still trained on are ranked by the forgetting events counted *during that
  stage only* (the counts start again from zero after each removal); never-learned examples count as the most
  forgotten; the least forgotten are removed;
- each stage removes the same number of examples, ``floor(fraction * n / (until // every))`` of the task's ``n``
  examples (the script: 3000 of 10000 over 4 stages, 750 each).

An example observed once per epoch has ``every`` observations per stage, so a stage measures forgetting only if
``every >= 2`` (checked by :class:`DataRemoval`). Pure torch; no Avalanche import.
"""

from __future__ import annotations

import torch

from ..config import check_range


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


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
        return torch.sort(ranked[: round(fraction * ranked.numel())]).values


def removal_stages(n: int, fraction: float, every: int, until: int) -> dict[int, int]:
    """``{epoch: examples removed after it}`` of SparCL's data removal for a task of ``n`` examples.

    Stages end after epochs ``every, 2 * every, ...`` up to ``until`` (1-based counts of finished epochs); each
    removes ``floor(fraction * n / (until // every))`` examples, as the authors' script does with its absolute
    ``remove_n``. ``fraction == 0`` or ``until < every``: no stage.
    """
    _check_int("n", n, 0)
    check_range("fraction", fraction, 0.0, 1.0, high_open=True)
    _check_int("every", every, 1)
    _check_int("until", until, 0)
    stages = until // every
    if fraction == 0 or stages == 0:
        return {}
    per_stage = int(fraction * n / stages)
    return {every * (i + 1): per_stage for i in range(stages)}


class DataRemoval:
    """SparCL's dynamic data removal over one task of ``n`` training examples trained for ``epochs`` epochs.

    Call :meth:`observe` after every epoch for which :meth:`needs_observation` is true, with the correctness of
    the examples :attr:`active` (in that order), then :meth:`end_epoch`; when a stage ends it returns the new
    :attr:`active` indices (into the task's full dataset, sorted), else ``None``.

    Args:
        n: examples of the task.
        fraction: fraction of ``n`` removed over all stages, in [0, 1).
        every: epochs per stage (observations per stage), >= 2 when ``fraction > 0``.
        until: last epoch after which a stage may end.
        epochs: epochs the task trains; stages after the last epoch are dropped (nothing would train on the
            reduced data), and no stage before it raises (no forgetting could ever be measured).
        seed: order of ties in the ranking.

    Raises:
        ValueError: a removal that measures no forgetting (``every < 2``, or no stage ends before the last epoch).
    """

    def __init__(self, n: int, *, fraction: float, every: int, until: int, epochs: int, seed: int = 0) -> None:
        _check_int("epochs", epochs, 1)
        check_removal_schedule(fraction, every, until, epochs)
        stages = removal_stages(n, fraction, every, until)
        self.stages = {e: k for e, k in stages.items() if e < epochs}
        self.n, self.seed = n, seed
        self.active = torch.arange(n)
        self.tracker = ForgettingTracker(n)
        self.removed: list[torch.Tensor] = []  # per finished stage, the removed indices (sorted)
        self.stage_counts: list[torch.Tensor] = []  # per finished stage, the forgetting counts it ranked by
        self.stage_learned: list[torch.Tensor] = []  # per finished stage, which examples it saw learned

    def needs_observation(self, epoch: int) -> bool:
        """Whether correctness after epoch ``epoch`` (1-based) feeds a stage."""
        return bool(self.stages) and epoch <= max(self.stages)

    def observe(self, correct) -> None:
        """Record the correctness of :attr:`active` (one bool per active example, in order)."""
        self.tracker.update(self.active, correct)

    def end_epoch(self, epoch: int) -> torch.Tensor | None:
        """After epoch ``epoch`` (1-based): at a stage's end remove its least forgotten examples, start the counts
        again from zero and return the new :attr:`active`; else ``None``."""
        if epoch not in self.stages:
            return None
        ranked = self.tracker.ranking(self.active, seed=self.seed + 7919 * epoch)
        keep = max(0, ranked.numel() - self.stages[epoch])
        self.removed.append(torch.sort(ranked[keep:]).values)
        self.stage_counts.append(self.tracker.counts)
        self.stage_learned.append(self.tracker.learned)
        self.active = torch.sort(ranked[:keep]).values
        self.tracker = ForgettingTracker(self.n)  # per-stage counts, as the reference resets its statistics
        return self.active


def check_removal_schedule(fraction: float, every: int, until: int, epochs: int) -> None:
    """Raise ``ValueError`` unless a data removal of ``fraction`` (stages of ``every`` epochs up to ``until``)
    measures forgetting within ``epochs`` epochs per task: ``every >= 2`` (two observations per stage) and a first
    stage that ends before the last epoch. ``fraction == 0`` (no removal) always passes."""
    check_range("removal_fraction", fraction, 0.0, 1.0, high_open=True)
    _check_int("removal_every", every, 1)
    _check_int("removal_until", until, 0)
    if fraction == 0:
        return
    if every < 2:
        raise ValueError(
            f"removal_every={every}: a stage needs at least 2 epochs (two observations of an example) "
            f"to count a forgetting event; use removal_every >= 2 or removal_fraction=0"
        )
    if until < every:
        raise ValueError(
            f"removal_until={until} is before the first stage ends (removal_every={every}): nothing "
            f"would be removed; use removal_until >= removal_every or removal_fraction=0"
        )
    if every >= epochs:
        raise ValueError(
            f"removal_every={every} needs at least {every + 1} epochs per experience ({every} epochs of "
            f"forgetting statistics, then training on the reduced data), got epochs={epochs}: no "
            f"forgetting could be measured; raise the epochs, lower removal_every (>= 2) or set "
            f"removal_fraction=0"
        )
