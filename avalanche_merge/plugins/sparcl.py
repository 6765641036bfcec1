"""``SparCLPlugin``: SparCL (Wang et al., NeurIPS 2022) inside any Avalanche ``SupervisedTemplate``.

Weight and gradient sparsity (TDM, DGM) are the :class:`~avalanche_merge.sparse.sparcl.SparCL` learner, driven
by :class:`~avalanche_merge.plugins.sparse.SparsePlugin`'s callbacks. This plugin adds dynamic data removal (DDR):

- *per-example correctness*: Avalanche mini-batches carry no example indices, so correctness comes from a
  fixed-order pass (evaluation mode and transforms, no gradients, ``eval_mb_size`` batches) over the examples the
  task still trains on, once before the first epoch and after every epoch up to the last removal stage. Every
  example is thus observed once per epoch, as in Toneva et al. (who record correctness when an example's
  mini-batch is presented, once per epoch too), but at the epoch's end and without augmentation. Cost: one forward
  pass over the remaining data per observed epoch (about a third of a training epoch), nothing after the last
  stage; with ``removal_fraction=0`` (or no stage followed by another epoch) there is no extra pass at all;
- *removal*: after epoch ``e`` of ``removal_epochs`` the least informative examples (fewest forgetting events;
  never-learned ones count as most forgotten; ties in a seeded random order) are dropped from
  ``strategy.adapted_dataset`` (``AvalancheDataset.subset``) and ``strategy.make_train_dataloader`` rebuilds the
  loader with the arguments the strategy's ``train`` call received. Removal is per experience: the next
  experience starts from its full dataset.

Limitation: a plugin that builds its own ``strategy.dataloader`` in ``before_training_exp`` (Avalanche's
``ReplayPlugin``) is bypassed by the rebuilt loader after the first removal stage; use SparCL with ``Naive`` (as
the registered ``sparcl`` method does) or ``removal_fraction=0``.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.models.utils import avalanche_forward
from torch.utils.data import DataLoader

from ..sparse.sparcl import ForgettingTracker, SparCLConfig, removal_schedule
from .sparse import SparsePlugin


class SparCLPlugin(SparsePlugin):
    """SparCL: TDM + DGM (the ``sparcl`` sparse learner) and dynamic data removal.

    Args:
        options: :class:`~avalanche_merge.sparse.sparcl.SparCLConfig` fields (validated now).

    Attributes:
        tracker: the current experience's :class:`ForgettingTracker` (indices into its training dataset).
        active: indices of the examples the current experience still trains on.
        kept_fractions: per finished experience, the fraction of its training examples left at the end.
        passes: per finished experience, the number of correctness passes made.
    """

    def __init__(self, *, options: dict | None = None) -> None:
        super().__init__(method="sparcl", options=options)
        self.config: SparCLConfig
        self.tracker: ForgettingTracker | None = None
        self.active: torch.Tensor | None = None
        self.kept_fractions: list[float] = []
        self.passes: list[int] = []
        self._full = None
        self._schedule: dict[int, int] = {}
        self._epoch = 0
        self._passes = 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        cfg = self.config
        self._full = strategy.adapted_dataset
        n = len(self._full)
        self.tracker = ForgettingTracker(n)
        self.active = torch.arange(n)
        self._epoch = self._passes = 0
        schedule = removal_schedule(n, cfg.removal_fraction, cfg.removal_epochs) if cfg.removal_fraction > 0 else {}
        # a stage only matters if another epoch follows it
        self._schedule = {e: k for e, k in schedule.items() if e < strategy.train_epochs}
        if self._schedule:
            self._observe(strategy)

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._epoch += 1
        if not self._schedule or self._epoch > max(self._schedule):
            return
        self._observe(strategy)
        if self._epoch in self._schedule:
            ranked = self.tracker.ranking(self.active, seed=self.config.seed + 7919 * self.learner.task)
            self.active = torch.sort(ranked[:self._schedule[self._epoch]]).values
            strategy.adapted_dataset = self._full.subset(self.active.tolist())
            strategy.make_train_dataloader(**kwargs)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)
        self.kept_fractions.append(len(self.active) / max(1, self.tracker.n))
        self.passes.append(self._passes)
        self._full = None

    @torch.no_grad()
    def _observe(self, strategy: Any) -> None:
        """One fixed-order pass over the active examples: record which are classified correctly."""
        dataset = self._full.subset(self.active.tolist())
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        loader = DataLoader(dataset, batch_size=max(1, getattr(strategy, "eval_mb_size", 64)), shuffle=False,
                            collate_fn=getattr(dataset, "collate_fn", None))
        model = strategy.model
        was_training = model.training
        model.eval()
        correct = []
        try:
            for batch in loader:
                x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
                t = batch[-1].to(strategy.device) if len(batch) > 2 else None
                out = avalanche_forward(model, x, t)
                correct.append((out.argmax(dim=1) == y).cpu())
        finally:
            model.train(was_training)
        self.tracker.update(self.active, torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool))
        self._passes += 1
