"""``HeadProtocolPlugin``: run any Avalanche strategy under a head protocol (``masked``, ``per_task``, ``frozen``).

The plugin only wires Avalanche's callbacks to the pure functions of :mod:`avalanche_merge.protocol`:

- ``masked``: while an experience trains, the strategy's criterion sees only the columns of the experience's
  classes (:func:`~avalanche_merge.protocol.masked_loss`); evaluation outputs are restricted to the classes
  trained so far (:func:`~avalanche_merge.protocol.restrict_logits`). Other plugins (LwF, EWC, ...) see the full
  logits.
- ``per_task``: the model's head is replaced by a :class:`~avalanche_merge.protocol.PerTaskHead` before the
  first experience; each experience adds its head before Avalanche builds the optimizer (so any strategy's
  optimizer picks it up) and trains with the masked loss; with ``prototypes`` the class means of the
  experience's training inputs (evaluation transforms, no augmentation) are stored after it.
- ``frozen``: the head's parameters never receive a gradient (re-checked every iteration, so a plugin that
  makes them trainable again cannot undo it).
- ``shared``: nothing (kept so that a config can name every protocol).

Put it before plugins that build their own trainable parameter lists from the model (the runner does): those
then see the new per-task head. Works with an ``nn.Linear`` head and with Avalanche's ``IncrementalClassifier``;
``classes_in_this_experience`` may be a set or a list.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from ..merging.heads import find_head
from ..protocol import (
    CHOOSABLE,
    PerTaskHead,
    check_protocol,
    class_list,
    class_means,
    find_linear,
    masked_loss,
    replace_module,
    restrict_logits,
)


class MaskedCriterion:
    """``criterion`` restricted to ``classes`` (see :func:`~avalanche_merge.protocol.masked_loss`)."""

    def __init__(self, criterion: Any, classes: list[int]) -> None:
        self.criterion = criterion
        self.classes = classes

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_loss(self.criterion, logits, targets, self.classes)


def experience_classes(experience: Any) -> list[int]:
    """The classes of an experience: ``classes_in_this_experience`` (list or set), else the dataset's targets."""
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        targets = getattr(experience.dataset, "targets", None)
        if targets is None:
            raise ValueError("cannot tell the experience's classes: it has no classes_in_this_experience and its "
                             "dataset no targets")
        classes = torch.as_tensor(list(targets)).unique()
    return class_list(classes)


class HeadProtocolPlugin(SupervisedPlugin):
    """Apply a head protocol to the strategy's model and loss.

    Args:
        protocol: ``"shared"``, ``"masked"``, ``"per_task"`` or ``"frozen"``.
        prototypes: with ``per_task``, evaluate by cosine similarity to class-mean prototypes (CL-LoRA).
        head: module name of the head, or ``"auto"`` (``head``/``classifier``/last ``nn.Linear``).
        prototype_batch_size: batch size of the pass that computes the prototypes.
    """

    def __init__(self, *, protocol: str = "masked", prototypes: bool = False, head: str = "auto",
                 prototype_batch_size: int = 256) -> None:
        super().__init__()
        self.protocol = check_protocol(protocol, CHOOSABLE)
        if prototypes and protocol != "per_task":
            raise ValueError(f"prototypes=True needs protocol='per_task', got {protocol!r}")
        if not isinstance(prototype_batch_size, int) or prototype_batch_size < 1:
            raise ValueError(f"prototype_batch_size must be an int >= 1, got {prototype_batch_size!r}")
        self.prototypes = bool(prototypes)
        self.head = head
        self.prototype_batch_size = prototype_batch_size
        self.head_name: str | None = None
        self.seen: list[int] = []
        self.current: list[int] = []
        self._criterion = None

    # -- set-up --------------------------------------------------------------------------------------------
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.head_name is not None or self.protocol == "shared":
            return
        model = strategy.model
        self.head_name = find_head(model, self.head)
        head = model.get_submodule(self.head_name)
        if self.protocol == "per_task" and not isinstance(head, PerTaskHead):
            linear = find_linear(head)
            new = PerTaskHead(linear.in_features, linear.out_features, initial=head, prototypes=self.prototypes)
            replace_module(model, self.head_name, new.to(linear.weight.device))

    def _head(self, strategy: Any) -> torch.nn.Module:
        return strategy.model.get_submodule(self.head_name)

    def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        # runs before Avalanche (re)builds the optimizer: the new task's head joins it like any new parameter
        if self.protocol == "per_task":
            self.before_training(strategy)
            self._head(strategy).add_task(experience_classes(strategy.experience))

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.current = experience_classes(strategy.experience)
        if self.protocol in ("masked", "per_task"):
            self._criterion = strategy._criterion
            strategy._criterion = MaskedCriterion(self._criterion, self.current)
        elif self.protocol == "frozen":
            self._freeze(strategy)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.protocol == "frozen":
            self._freeze(strategy)

    def _freeze(self, strategy: Any) -> None:
        for p in self._head(strategy).parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                p.grad = None  # optimizers skip parameters without a gradient

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._criterion is not None:
            strategy._criterion = self._criterion
            self._criterion = None
        self.seen = class_list([*self.seen, *self.current])
        if self.protocol == "per_task" and self.prototypes:
            self._store_prototypes(strategy)

    @torch.no_grad()
    def _store_prototypes(self, strategy: Any) -> None:
        head: PerTaskHead = self._head(strategy)
        dataset = strategy.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        loader = DataLoader(dataset, batch_size=self.prototype_batch_size, shuffle=False)
        was_training = strategy.model.training
        strategy.model.eval()
        labels = []
        try:
            with head.recording() as features:
                for batch in loader:
                    strategy.model(batch[0].to(strategy.device))
                    labels.append(batch[1])
        finally:
            strategy.model.train(was_training)
        feats = torch.cat(features).reshape(-1, head.in_features).cpu()
        ys = torch.cat(labels).cpu()
        if feats.shape[0] != ys.shape[0]:
            raise RuntimeError(f"the head saw {feats.shape[0]} feature rows for {ys.shape[0]} samples; prototypes "
                               "need one head call per sample")
        head.set_prototypes(self.current, class_means(feats.double(), ys, self.current).float())

    # -- evaluation ----------------------------------------------------------------------------------------
    def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.protocol == "masked" and self.seen:
            strategy.mb_output = restrict_logits(strategy.mb_output, self.seen)
