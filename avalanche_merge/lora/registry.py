"""Registry of continual LoRA learners: ``list_learners()``, ``make_learner(name, model, **options)``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry, make_item_config
from .learner import ContinualLoRA

LEARNERS: Registry[type[ContinualLoRA]] = Registry("LoRA learner")


def register_learner(cls: type[ContinualLoRA]) -> type[ContinualLoRA]:
    """Class decorator: register a :class:`ContinualLoRA` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, ContinualLoRA)):
        raise TypeError(f"register_learner needs a ContinualLoRA subclass, got {cls!r}")
    LEARNERS.add(cls.name, cls)
    return cls


def list_learners() -> list[str]:
    """Registered learner names."""
    return LEARNERS.names()


def make_config(name: str, **options: Any):
    """The validated config of learner ``name`` (unknown name or option -> ``ValueError``)."""
    return make_item_config(LEARNERS, name, **options)


def make_learner(name: str, model: nn.Module, **options: Any) -> ContinualLoRA:
    """Learner ``name`` on ``model`` with ``options`` (fields of its config)."""
    return LEARNERS.get(name)(model, config=make_config(name, **options))
