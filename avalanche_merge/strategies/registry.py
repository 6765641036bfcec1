"""Method registry: Avalanche strategies and plugins, by name, with declared capabilities.

A method registers once and then appears in ``avalanche-merge list``, in ``avalanche-merge bench`` and in the
shared test matrix (``tests/strategies/test_method_matrix.py``), with no edit to those places:

>>> @register_method("my_method", config_cls=MyConfig, description="...")
... def build(ctx: BuildContext, cfg: MyConfig) -> SupervisedTemplate: ...

Plugin methods need only the plugin: ``register_plugin_method("my_plugin", make_plugin=..., ...)`` runs it inside
Avalanche's ``Naive`` (or another registered base strategy). Capabilities (mammoth's ``COMPATIBILITY`` idea) are
checked against the benchmark before any training starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..benchmarks.base import SCENARIO_TYPES
from ..config import check_range
from ..protocol import CHOOSABLE, check_protocol
from ..registry import Registry

MAX_RATE = 10.0  # learning rates and weight decays above this are refused (a run would only diverge)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every gradient-trained method of a run.

    Args:
        epochs: epochs per training experience.
        batch_size: training mini-batch size.
        eval_batch_size: evaluation mini-batch size.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"``.
        lr: learning rate, > 0.
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD) weight decay, >= 0.
        momentum: SGD momentum in [0, 1).
    """

    epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {self.optimizer!r}")
        check_range("lr", self.lr, 0.0, MAX_RATE, low_open=True)  # above it no optimizer trains: a typo
        check_range("weight_decay", self.weight_decay, 0.0, MAX_RATE)
        check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (frozen ones never reach the optimizer)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over ``params``."""
    params = list(params)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


@dataclass
class BuildContext:
    """Everything a method builder needs to construct its Avalanche strategy.

    Attributes:
        model: the backbone (pretrained weights already loaded; the builder may wrap or modify it).
        benchmark: the :class:`~avalanche_merge.benchmarks.base.Benchmark` being run.
        train: optimisation settings.
        evaluator: the run's Avalanche ``EvaluationPlugin``.
        plugins: extra Avalanche plugins from the runner (copied into the strategy, never mutated).
        device: torch device.
        seed: the run seed.
    """

    model: nn.Module
    benchmark: Any
    train: TrainConfig
    evaluator: Any
    plugins: list = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0

    def optimizer(self, params=None) -> torch.optim.Optimizer:
        """Optimizer over ``params`` (default: the model's trainable parameters)."""
        return make_optimizer(trainable_parameters(self.model) if params is None else params, self.train)

    def strategy_kwargs(self, extra_plugins: list | None = None) -> dict:
        """Keyword arguments shared by every ``SupervisedTemplate`` constructor."""
        return dict(
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=self.train.batch_size,
            train_epochs=self.train.epochs,
            eval_mb_size=self.train.eval_batch_size,
            device=self.device,
            plugins=list(self.plugins) + list(extra_plugins or []),
            evaluator=self.evaluator,
            eval_every=-1,
        )


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name.
        build: ``build(ctx, config) -> SupervisedTemplate``.
        config_cls: dataclass of the method's hyper-parameters.
        description: one line for ``avalanche-merge list``.
        kind: ``"strategy"`` or ``"plugin"`` (a plugin run inside a base strategy).
        family: ``"baseline"`` for Avalanche's own methods, else the avalanche-merge family.
        scenarios: scenario types the method supports.
        needs_task_labels: the method needs task labels at test time (only task-incremental benchmarks).
        trains_once: the method trains a single time on the whole train stream (Joint); its accuracy matrix has
            one row.
        in_bench: include the method in ``avalanche-merge bench``.
        pretrained_eval: evaluating the strategy before training measures the pretrained model (False for
            methods whose predictor only exists after training, e.g. SLDA's class means).
        protocol: the head protocol of the method's paper (:mod:`avalanche_merge.protocol`), its default.
        protocols: the protocols a config may choose for it (``()`` when the method owns its classifier:
            ``prototype`` and ``routed`` methods).
        prototypes: with ``per_task``, evaluate by class-mean prototypes (CL-LoRA).
        base: the registered method whose strategy this one runs inside (e.g. ``"der"`` for SparCL), or None.
    """

    name: str
    build: Callable[[BuildContext, Any], Any]
    config_cls: type
    description: str
    kind: str = "strategy"
    family: str = "baseline"
    scenarios: tuple[str, ...] = SCENARIO_TYPES
    needs_task_labels: bool = False
    trains_once: bool = False
    in_bench: bool = True
    pretrained_eval: bool = True
    protocol: str = "shared"
    protocols: tuple[str, ...] = CHOOSABLE
    prototypes: bool = False
    base: str | None = None

    def resolve_protocol(self, override: str | None, scenario_type: str, benchmark_name: str,
                         classes_repeat: bool | None = None) -> str:
        """The protocol of a run: ``override`` if given (checked against :attr:`protocols`), else the paper's.

        A declared ``per_task`` protocol becomes ``masked`` on a benchmark whose experiences share classes
        (domain-incremental, with or without task labels): every experience then trains every class, so the
        paper's per-task head over the task's classes is one head over all classes. An explicit ``per_task``
        there is an error.

        Args:
            override: the config's protocol, or None for the method's declared one.
            scenario_type: the benchmark's scenario type.
            benchmark_name: for messages.
            classes_repeat: whether experiences share classes (default: ``scenario_type`` is domain-incremental).

        Raises:
            TypeError, ValueError: an unknown protocol, one the method cannot run, or ``per_task`` without
                disjoint task boundaries (a method that trains once, or experiences that share classes).
        """
        if classes_repeat is None:
            classes_repeat = scenario_type == "domain_incremental"
        if override is None:
            protocol = self.protocol
            if protocol == "per_task" and classes_repeat:
                protocol = "masked"
        else:
            check_protocol(override)
            if override not in self.protocols:
                allowed = list(self.protocols) or [self.protocol]
                raise ValueError(f"method {self.name!r} cannot run under protocol {override!r}; it supports "
                                 f"{allowed}")
            protocol = override
        if protocol == "per_task":
            if self.trains_once:
                raise ValueError(f"protocol 'per_task' needs task boundaries; method {self.name!r} trains once on "
                                 f"the whole stream (use 'shared', 'masked' or 'frozen')")
            if classes_repeat:
                raise ValueError(f"protocol 'per_task' needs disjoint classes per experience; the experiences of "
                                 f"{benchmark_name!r} share classes (domain-incremental): use 'masked', 'shared' "
                                 f"or 'frozen'")
        return protocol

    def check_compatible(self, benchmark_name: str, scenario_type: str) -> None:
        """Raise ``ValueError`` if the method cannot run on a benchmark of ``scenario_type``."""
        if scenario_type not in self.scenarios:
            raise ValueError(f"method {self.name!r} does not support {scenario_type} benchmarks "
                             f"({benchmark_name!r}); it supports {list(self.scenarios)}")
        if self.needs_task_labels and scenario_type != "task_incremental":
            raise ValueError(f"method {self.name!r} needs task labels at test time; {benchmark_name!r} is "
                             f"{scenario_type} (set task_labels=true in its options)")


METHODS: Registry[MethodSpec] = Registry("method")


@dataclass
class NoOptions:
    """A method without hyper-parameters."""


def register_method(name: str, *, config_cls: type = NoOptions, description: str, kind: str = "strategy",
                    family: str = "baseline", scenarios: tuple[str, ...] = SCENARIO_TYPES,
                    needs_task_labels: bool = False, trains_once: bool = False, in_bench: bool = True,
                    pretrained_eval: bool = True, protocol: str = "shared",
                    protocols: tuple[str, ...] | None = None, prototypes: bool = False,
                    base: str | None = None) -> Callable:
    """Decorator registering ``build(ctx, config) -> SupervisedTemplate`` as method ``name``.

    ``protocol`` is the head protocol of the method's paper; ``protocols`` the ones a config may choose
    (default: every choosable protocol when ``protocol`` is one, none for ``prototype``/``routed`` methods);
    ``base`` the registered method whose strategy the method runs inside, if any.
    """
    if kind not in ("strategy", "plugin"):
        raise ValueError(f"kind must be 'strategy' or 'plugin', got {kind!r}")
    check_protocol(protocol)
    if protocols is None:
        protocols = CHOOSABLE if protocol in CHOOSABLE else ()
    for p in protocols:
        check_protocol(p, CHOOSABLE)
    if protocol in CHOOSABLE and protocol not in protocols:
        raise ValueError(f"protocols {list(protocols)} must contain the default protocol {protocol!r}")
    if trains_once and "per_task" in protocols:
        protocols = tuple(p for p in protocols if p != "per_task")
    bad = [s for s in scenarios if s not in SCENARIO_TYPES]
    if bad or not scenarios:
        raise ValueError(f"scenarios must be a non-empty subset of {SCENARIO_TYPES}, got {scenarios}")

    def decorator(build: Callable) -> Callable:
        METHODS.add(name, MethodSpec(name, build, config_cls, description, kind, family, tuple(scenarios),
                                     needs_task_labels, trains_once, in_bench, pretrained_eval, protocol,
                                     tuple(protocols), prototypes, base))
        return build

    return decorator


def register_plugin_method(name: str, *, make_plugin: Callable[[BuildContext, Any], Any], config_cls: type,
                           description: str, base: str = "naive", **capabilities: Any) -> None:
    """Register a plugin as a method: the registered ``base`` strategy with the plugin appended."""

    def build(ctx: BuildContext, cfg: Any):
        base_spec = METHODS.get(base)
        plugged = dataclasses.replace(ctx, plugins=list(ctx.plugins) + [make_plugin(ctx, cfg)])
        return base_spec.build(plugged, base_spec.config_cls())

    register_method(name, config_cls=config_cls, description=description, kind="plugin", base=base,
                    **capabilities)(build)


def list_methods(*, bench_only: bool = False) -> list[str]:
    """Registered method names (only those in ``bench`` if ``bench_only``)."""
    return [n for n in METHODS.names() if METHODS.get(n).in_bench or not bench_only]


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; unknown names raise ``ValueError`` listing valid ones."""
    return METHODS.get(name)
