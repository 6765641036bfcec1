"""The main job: representative methods of every family (or, with ``full``, every bench-enabled registered
method) on every offline benchmark, several seeds.

The full suite is built from the registries at call time, so a method registered by any module appears in it
without editing this file. The default (quick) suite is :data:`QUICK_METHODS`: the Avalanche baselines and one or
two methods per avalanche-merge family, chosen for coverage at low cost; a test checks that every family of the
registry is represented. Both suites use the same run configs, so their runs share ids and a quick bench's runs
are reused by a full one in the same folder.
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


QUICK_METHODS = (
    "naive", "ewc", "lwf", "replay", "joint",  # Avalanche baselines: lower bound, regularisers, replay, upper bound
    "continual_ta", "opcm",  # merging: running task arithmetic, and the projection-based merger
    "sdlora",  # LoRA learners
    "sparse_fisher",  # sparse fine-tuning
    "ncm", "ranpac",  # retrieval / prototypes on frozen pretrained features
    "dualprompt",  # prompt-based (the cheapest of the three per step)
    "tent",  # test-time adaptation (TTACIL costs 8 augmented views and a step per test batch)
    "pretrained_head",  # zero-shot-like: the pretrained head, never trained
)


def bench_methods(*, full: bool = False) -> list[str]:
    """The methods of ``avalanche-merge bench``: :data:`QUICK_METHODS`, or every method with ``in_bench``."""
    from ..strategies import list_methods

    everything = list_methods(bench_only=True)
    return everything if full else [m for m in QUICK_METHODS if m in everything]


def bench_config(*, seeds: int = 3, methods: list[str] | None = None, benchmarks: list[str] | None = None,
                 epochs: int = 2, full: bool = False) -> ExperimentConfig:
    """The ``avalanche-merge bench`` experiment.

    Args:
        seeds: number of seeds (0, 1, ..., seeds-1), >= 1.
        methods: these registered methods (default: :func:`bench_methods`).
        benchmarks: restrict to these offline benchmarks (default: ``split_mnist`` and ``domain_mnist``).
        epochs: epochs per experience.
        full: without ``methods``, every method with ``in_bench`` instead of the quick selection.
    """
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
    chosen = methods or bench_methods(full=full)
    return ExperimentConfig(
        name="bench",
        benchmarks=[BenchmarkEntry(name=b, options=dict(BENCH_BENCHMARKS[b]["options"]),
                                   train=dict(BENCH_BENCHMARKS[b]["train"])) for b in names],
        methods=[MethodEntry(name=m) for m in chosen],
        seeds=list(range(seeds)),
        train=train,
    )


MAX_DEFAULT_JOBS = 8
WORKER_MEMORY_GB = 2.0  # a bench worker peaks well under this (see docs/guide/running_grids.md)


def default_bench_jobs() -> int:
    """``--jobs`` of ``avalanche-merge bench`` when not given: this machine's cores, at most
    :data:`MAX_DEFAULT_JOBS` and at most one worker per :data:`WORKER_MEMORY_GB` of available memory."""
    import psutil

    from .parallel import available_cores

    by_memory = int(psutil.virtual_memory().available / 2**30 / WORKER_MEMORY_GB)
    return max(1, min(available_cores(), MAX_DEFAULT_JOBS, by_memory))
