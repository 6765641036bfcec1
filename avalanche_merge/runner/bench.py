"""The main job: every bench-enabled registered method on every offline benchmark, several seeds.

The suite is built from the registries at call time, so a method registered by any module appears here
without editing this file.
"""

from __future__ import annotations

from ..config import ConfigError
from ..strategies.registry import TrainConfig
from .plan import BenchmarkEntry, ExperimentConfig, MethodEntry

BENCH_BENCHMARKS = {
    # name: options of the benchmark and overrides of the shared train settings (none needed at present)
    "split_mnist": {"options": {}, "train": {}},
    "domain_mnist": {"options": {}, "train": {}},
}


def bench_config(*, seeds: int = 3, methods: list[str] | None = None, benchmarks: list[str] | None = None,
                 epochs: int = 2) -> ExperimentConfig:
    """The ``avalanche-merge bench`` experiment.

    Args:
        seeds: number of seeds (0, 1, ..., seeds-1), >= 1.
        methods: restrict to these registered methods (default: every method with ``in_bench``).
        benchmarks: restrict to these offline benchmarks (default: ``split_mnist`` and ``domain_mnist``).
        epochs: epochs per experience.
    """
    from ..strategies import list_methods

    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    try:
        train = TrainConfig(epochs=epochs)
    except ValueError as exc:
        raise ConfigError(f"--epochs: {exc}") from None
    names = list(benchmarks or BENCH_BENCHMARKS)
    unknown = [b for b in names if b not in BENCH_BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown bench benchmark {unknown[0]!r}; valid: {sorted(BENCH_BENCHMARKS)}")
    chosen = methods or list_methods(bench_only=True)
    return ExperimentConfig(
        name="bench",
        benchmarks=[BenchmarkEntry(name=b, options=dict(BENCH_BENCHMARKS[b]["options"]),
                                   train=dict(BENCH_BENCHMARKS[b]["train"])) for b in names],
        methods=[MethodEntry(name=m) for m in chosen],
        seeds=list(range(seeds)),
        train=train,
    )
