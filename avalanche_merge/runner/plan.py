"""Experiment configs as data, and their validation into a list of concrete runs.

A config (JSON) names benchmarks, methods, a backbone, training settings and seeds. :func:`plan_experiment`
resolves every name against the registries and builds every options dataclass, so an unknown method or
benchmark, a wrong type or an out-of-range value fails with a clear message before any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict
from ..strategies.registry import TrainConfig
from .analysis import AnalysisConfig, describe_analysis

LOGGERS = ("interactive", "text", "csv", "tensorboard")
RESULT_FORMAT = 1


@dataclass
class BenchmarkEntry:
    """A benchmark of the experiment: registry name, its options, and overrides of the train settings."""

    name: str
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


@dataclass
class MethodEntry:
    """A method of the experiment: registry name, its options and a label (defaults to the name)."""

    name: str
    options: dict = field(default_factory=dict)
    label: str | None = None


@dataclass
class ModelEntry:
    """The backbone: registry name and its options."""

    name: str = "tiny_vit"
    options: dict = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    """A whole experiment: every (benchmark, method, seed) combination is one run.

    Args:
        name: experiment name (for logs).
        benchmarks: benchmarks to run on.
        methods: methods to compare.
        seeds: run seeds (they also seed the benchmark's train/test split and class order).
        train: optimisation settings (a benchmark entry may override fields).
        model: the backbone every method starts from.
        loggers: Avalanche loggers per run, from ``interactive``, ``text``, ``csv``, ``tensorboard``.
        device: torch device string.
        eval_pretrained: evaluate the model before any training (the pretrained/zero-shot reference row).
        analysis: record parameter geometry, representation drift and held-out retention per run (for
            ``avalanche-merge report``); absent: none of it is recorded.
    """

    benchmarks: list[BenchmarkEntry]
    methods: list[MethodEntry]
    name: str = "experiment"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelEntry = field(default_factory=ModelEntry)
    loggers: list[str] = field(default_factory=lambda: ["text", "csv"])
    device: str = "cpu"
    eval_pretrained: bool = True
    analysis: AnalysisConfig | None = None

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ValueError("benchmarks must name at least one benchmark")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        for s in self.seeds:
            if s < 0:
                raise ValueError(f"seeds must be >= 0, got {s}")
        bad = [name for name in self.loggers if name not in LOGGERS]
        if bad:
            raise ValueError(f"unknown logger {bad[0]!r}; valid loggers: {list(LOGGERS)}")


@dataclass(frozen=True)
class RunPlan:
    """One fully resolved run: everything needed to reproduce it, and its identity."""

    benchmark: str
    benchmark_options: Any
    method: str
    label: str
    method_options: Any
    model: str
    model_options: Any
    train: TrainConfig
    seed: int
    loggers: tuple[str, ...]
    device: str
    eval_pretrained: bool
    analysis: AnalysisConfig | None = None

    def describe(self) -> dict:
        """The JSON-ready config of this run (what its hash covers; ``analysis`` only when present)."""
        out = {
            "benchmark": self.benchmark, "benchmark_options": dataclasses.asdict(self.benchmark_options),
            "method": self.method, "label": self.label, "method_options": dataclasses.asdict(self.method_options),
            "model": self.model, "model_options": dataclasses.asdict(self.model_options),
            "train": dataclasses.asdict(self.train), "seed": self.seed, "eval_pretrained": self.eval_pretrained,
            "format": RESULT_FORMAT,
        }
        if self.analysis is not None:
            out["analysis"] = describe_analysis(self.analysis)
        return out

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def run_id(self) -> str:
        return f"{self.benchmark}__{self.label}__seed{self.seed}__{self.config_hash}"


def _normalise(raw: dict) -> dict:
    """Accept shorthand: a method or benchmark given as a bare name string."""
    if not isinstance(raw, dict):
        raise ConfigError(f"an experiment config must be a mapping, got {type(raw).__name__}")
    data = dict(raw)
    for key in ("benchmarks", "methods"):
        if isinstance(data.get(key), list):
            data[key] = [{"name": v} if isinstance(v, str) else v for v in data[key]]
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    return data


def load_experiment(source: str | Path | dict) -> ExperimentConfig:
    """Parse an experiment config from a JSON file path or a dict (strict keys and types)."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    return from_dict(ExperimentConfig, _normalise(raw))


def plan_experiment(config: ExperimentConfig) -> list[RunPlan]:
    """Resolve and validate every run of ``config`` (no data is loaded and nothing is trained)."""
    from ..benchmarks import BENCHMARKS
    from ..models import BACKBONES
    from ..strategies import METHODS

    try:
        model_spec = BACKBONES.get(config.model.name)
    except ValueError as exc:
        raise ConfigError(f"model.name: {exc}") from None
    model_options = from_dict(model_spec.config_cls, config.model.options, where="model.options")
    labels = [m.label or m.name for m in config.methods]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"methods: label {dupes[0]!r} is used twice; give each entry a distinct 'label'")
    methods = []
    for i, entry in enumerate(config.methods):
        try:
            spec = METHODS.get(entry.name)
        except ValueError as exc:
            raise ConfigError(f"methods[{i}].name: {exc}") from None
        methods.append((spec, from_dict(spec.config_cls, entry.options, where=f"methods[{i}].options"),
                        labels[i]))
    runs = []
    for i, bentry in enumerate(config.benchmarks):
        try:
            bspec = BENCHMARKS.get(bentry.name)
        except ValueError as exc:
            raise ConfigError(f"benchmarks[{i}].name: {exc}") from None
        boptions = from_dict(bspec.config_cls, bentry.options, where=f"benchmarks[{i}].options")
        train = from_dict(TrainConfig, {**dataclasses.asdict(config.train), **bentry.train},
                          where=f"benchmarks[{i}].train")
        scenario = bspec.scenario_type(boptions)
        if config.analysis is not None and config.analysis.held_out_domains:
            _check_held_out(bentry.name, bspec, boptions, config.analysis.held_out_domains, i)
        for spec, moptions, label in methods:
            try:
                spec.check_compatible(bentry.name, scenario)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            for seed in config.seeds:
                runs.append(RunPlan(bentry.name, boptions, spec.name, label, moptions, config.model.name,
                                    model_options, train, seed, tuple(config.loggers), config.device,
                                    config.eval_pretrained, config.analysis))
    return runs


def _check_held_out(name: str, spec: Any, options: Any, domains: list[str], i: int) -> None:
    if spec.held_out is None:
        raise ConfigError(f"benchmarks[{i}]: {name!r} cannot build held-out domains (analysis.held_out_domains); "
                          f"offline MNIST/digits benchmarks can")
    trained = set(getattr(options, "domains", None) or [])
    overlap = sorted(trained & set(domains))
    if overlap:
        raise ConfigError(f"analysis.held_out_domains: {overlap[0]!r} is trained on in benchmarks[{i}] ({name}); "
                          f"held-out tasks must never be trained on")
