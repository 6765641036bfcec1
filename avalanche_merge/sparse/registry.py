"""Registry of sparse learners: ``list_sparse_learners()``, ``make_sparse_learner(name, model, **options)``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry, make_item_config
from .learner import SparseLearner

SPARSE_LEARNERS: Registry[type[SparseLearner]] = Registry("sparse learner")


def register_sparse_learner(cls: type[SparseLearner]) -> type[SparseLearner]:
    """Class decorator: register a :class:`SparseLearner` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, SparseLearner)):
        raise TypeError(f"register_sparse_learner needs a SparseLearner subclass, got {cls!r}")
    SPARSE_LEARNERS.add(cls.name, cls)
    return cls


def list_sparse_learners() -> list[str]:
    return SPARSE_LEARNERS.names()


def make_sparse_config(name: str, **options: Any):
    """The validated config of learner ``name`` (unknown name or option -> ``ValueError``)."""
    return make_item_config(SPARSE_LEARNERS, name, **options)


def make_sparse_learner(name: str, model: nn.Module, **options: Any) -> SparseLearner:
    return SPARSE_LEARNERS.get(name)(model, config=make_sparse_config(name, **options))
