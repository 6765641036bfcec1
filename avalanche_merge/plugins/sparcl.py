"""``SparCLPlugin``: SparCL (Wang et al., NeurIPS 2022) inside an Avalanche rehearsal strategy (DER++ as published).

Callbacks -> core calls (the maths is in :mod:`avalanche_merge.sparse.sparcl` and :mod:`avalanche_merge.sparse.ddr`):

- ``before_training_exp``: ``learner.begin_task()`` (magnitude pruning before the first task), the optimizer is
  pointed at the trainable parameters, a :class:`~avalanche_merge.sparse.ddr.DataRemoval` is started over the
  experience's training data; the epochs are checked (``SparCLConfig.check_epochs``, also run at plan time);
- ``before_training_epoch``: ``learner.begin_epoch(grads)`` (TDM) with the gradients the last training step left
  (``p.grad``: the rehearsal strategy's whole loss, buffer terms included, as masked by that step);
- ``after_backward`` / ``before_update`` / ``after_update``: DGM and the update guard;
- ``after_training_epoch``: DDR. The correctness of every example still trained on comes from one fixed-order pass
  (evaluation mode and transforms, no gradients, unmasked logits) after each epoch that feeds a stage; Avalanche
  mini-batches carry no example indices, so the reference's per-presentation record during training is not
  available. At a stage's end the least forgotten examples are dropped from ``strategy.adapted_dataset`` and
  ``strategy.make_train_dataloader`` rebuilds the loader with the arguments of the ``train`` call. The next
  experience starts from its full dataset.

Use it inside a strategy whose replay does not go through ``strategy.dataloader`` (Avalanche's ``DER``, as the
registered ``sparcl`` does): a plugin that builds its own loader in ``before_training_exp`` (``ReplayPlugin``) is
bypassed by the rebuilt loader after the first removal.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.models.utils import avalanche_forward
from torch.utils.data import DataLoader

from ..sparse.ddr import DataRemoval
from ..sparse.sparcl import SparCLConfig
from .optim import restrict_optimizer
from .sparse import SparsePlugin


class SparCLPlugin(SparsePlugin):
    """SparCL's TDM + DGM (the ``sparcl`` sparse learner) and DDR.

    Args:
        options: :class:`~avalanche_merge.sparse.sparcl.SparCLConfig` fields (validated now).

    Attributes:
        removal: the current experience's :class:`~avalanche_merge.sparse.ddr.DataRemoval`.
        kept_fractions: per finished experience, the fraction of its training examples left at the end.
        passes: per finished experience, the number of correctness passes made.
    """

    def __init__(self, *, options: dict | None = None, reset_optimizer_state: bool = False) -> None:
        super().__init__(method="sparcl", options=options, reset_optimizer_state=reset_optimizer_state)
        self.config: SparCLConfig
        self.removal: DataRemoval | None = None
        self.kept_fractions: list[float] = []
        self.passes: list[int] = []
        self._full = None
        self._epoch = 0
        self._passes = 0

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training(strategy, **kwargs)
        loaders = [f"plugin {type(p).__name__}" for p in strategy.plugins
                   if hasattr(p, "storage_policy") or type(p).__name__ in ("ReplayPlugin", "GDumbPlugin")]
        if loaders and self.config.removal_fraction > 0:
            raise ValueError(f"SparCLPlugin's data removal rebuilds the training loader after each removal stage, "
                             f"which drops the replay loader of {', '.join(loaders)} (it would silently stop "
                             f"replaying); use Avalanche's DER strategy (SparCL's published base, as the registered "
                             f"'sparcl' does) or set removal_fraction=0")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        cfg = self.config
        cfg.check_epochs(strategy.train_epochs)
        restrict_optimizer(strategy, self.learner.begin_task(), cfg.lr, reset_state=self.reset_optimizer_state)
        self._full = strategy.adapted_dataset
        self.removal = DataRemoval(
            len(self._full),
            fraction=cfg.removal_fraction,
            every=cfg.removal_every,
            until=cfg.removal_until,
            epochs=strategy.train_epochs,
            seed=cfg.seed + 7919 * self.learner.task,
        )
        self._epoch = self._passes = 0

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.learner.begin_epoch({n: p.grad for n, p in self.learner.params.items()})

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._epoch += 1
        if not self.removal.needs_observation(self._epoch):
            return
        self.removal.observe(self._correct(strategy))
        active = self.removal.end_epoch(self._epoch)
        if active is not None:
            strategy.adapted_dataset = self._full.subset(active.tolist())
            strategy.make_train_dataloader(**kwargs)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().after_training_exp(strategy, **kwargs)
        self.kept_fractions.append(len(self.removal.active) / max(1, self.removal.n))
        self.passes.append(self._passes)
        self._full = None

    @torch.no_grad()
    def _correct(self, strategy: Any) -> torch.Tensor:
        """One fixed-order pass over the examples still trained on: which are classified correctly."""
        dataset = self._full.subset(self.removal.active.tolist())
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        loader = DataLoader(
            dataset,
            batch_size=max(1, getattr(strategy, "eval_mb_size", 64) or 64),
            shuffle=False,
            collate_fn=getattr(dataset, "collate_fn", None),
        )
        model = strategy.model
        was_training = model.training
        model.eval()
        correct = []
        try:
            for batch in loader:
                x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
                t = batch[2].to(strategy.device) if len(batch) > 2 else None
                correct.append((avalanche_forward(model, x, t).argmax(dim=1) == y).cpu())
        finally:
            model.train(was_training)
        self._passes += 1
        return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)

    def state_dict(self) -> dict:
        """The learner's state (:meth:`SparsePlugin.state_dict`) and the finished experiences' removal records."""
        return {**super().state_dict(), "kept_fractions": list(self.kept_fractions), "passes": list(self.passes)}

    def load_state_dict(self, state: dict, strategy: Any) -> None:
        super().load_state_dict({"learner": state["learner"]}, strategy)
        self.kept_fractions, self.passes = list(state["kept_fractions"]), list(state["passes"])
