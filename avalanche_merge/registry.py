"""Validated name registries for methods, benchmarks and backbones.

Modelled on timm's ``register_model`` and peft's ``register_peft_method``: names are lowercase and unique,
``names()`` lists them, and an unknown name raises a ``ValueError`` that lists the valid ones.
Third-party packages can add methods through the ``avalanche_merge.methods`` entry-point group: each entry
point names a module whose import registers its methods.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """A mapping from validated lowercase names to objects of one kind.

    Args:
        kind: what the registry holds ("method", "benchmark", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``.

        Raises:
            TypeError: ``name`` is not a string.
            ValueError: ``name`` is not lowercase snake_case or is already taken.
        """
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name must be lowercase snake_case ([a-z][a-z0-9_]*), got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(item: T) -> T:
            return self.add(name, item)

        return decorator

    def get(self, name: str) -> T:
        """Look ``name`` up; an unknown name raises ``ValueError`` listing the valid names."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (for tests and interactive use)."""
        self.get(name)
        del self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def make_item_config(registry: Registry, name: str, **options):
    """The validated ``config_cls`` of the class registered as ``name`` (unknown name or option: ``ValueError``).

    For registries of classes that declare their options as a dataclass ``config_cls`` (the LoRA and sparse
    learners).
    """
    cls = registry.get(name)
    fields = set(cls.config_cls.__dataclass_fields__)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for {registry.kind} {name!r}; valid: {sorted(fields)}")
    return cls.config_cls(**options)
