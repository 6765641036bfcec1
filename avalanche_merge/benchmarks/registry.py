"""Benchmark registry: name -> builder, config class and capabilities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import from_dict
from ..registry import Registry
from .base import SCENARIO_TYPES, Benchmark


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to build one registered benchmark.

    Attributes:
        name: registry name.
        build: ``build(config, seed) -> Benchmark``.
        config_cls: dataclass of the benchmark's options (validated in ``__post_init__``).
        description: one line for ``avalanche-merge list``.
        offline: True when the data ships in installed packages (such benchmarks run in ``bench`` and tests).
        default_head: ``"pretrained"`` to keep the pretrained backbone's classifier (same label space, e.g.
            domain shifts) or ``"reset"`` to start from a fresh head (class-incremental).
        held_out: ``held_out(config, seed, domains, per_domain) -> {name: dataset}``, probe tasks never trained on
            (for the retention metric); None when the benchmark cannot build them.
    """

    name: str
    build: Callable[[Any, int], Benchmark]
    config_cls: type
    description: str
    offline: bool = True
    default_head: str = "reset"
    scenario: str = "class_incremental"
    held_out: Callable[..., dict] | None = None

    def scenario_type(self, config: Any) -> str:
        """Scenario type of the benchmark built from ``config`` (task-incremental when it sets task labels)."""
        return "task_incremental" if getattr(config, "task_labels", False) else self.scenario


BENCHMARKS: Registry[BenchmarkSpec] = Registry("benchmark")


def register_benchmark(name: str, *, config_cls: type, description: str, offline: bool = True,
                       default_head: str = "reset", scenario: str = "class_incremental",
                       held_out: Callable[..., dict] | None = None) -> Callable:
    """Decorator registering ``build(config, seed) -> Benchmark`` under ``name``."""
    if default_head not in ("pretrained", "reset"):
        raise ValueError(f"default_head must be 'pretrained' or 'reset', got {default_head!r}")
    if scenario not in SCENARIO_TYPES:
        raise ValueError(f"scenario must be one of {SCENARIO_TYPES}, got {scenario!r}")

    def decorator(build: Callable[[Any, int], Benchmark]) -> Callable[[Any, int], Benchmark]:
        BENCHMARKS.add(name, BenchmarkSpec(name, build, config_cls, description, offline, default_head, scenario,
                                             held_out))
        return build

    return decorator


def list_benchmarks(*, offline_only: bool = False) -> list[str]:
    """Registered benchmark names (only those whose data ships in packages if ``offline_only``)."""
    return [n for n in BENCHMARKS.names() if BENCHMARKS.get(n).offline or not offline_only]


def build_benchmark(name: str, seed: int = 0, **options: Any) -> Benchmark:
    """Build benchmark ``name`` with ``options`` validated against its config class."""
    spec = BENCHMARKS.get(name)
    return spec.build(from_dict(spec.config_cls, options, where=name), seed)
