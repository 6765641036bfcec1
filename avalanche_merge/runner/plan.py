"""Experiment configs as data, and their validation into a list of concrete runs.

A config (JSON) names benchmarks, methods, a backbone, training settings and seeds. :func:`plan_experiment`
resolves every name against the registries and builds every options dataclass, so an unknown method or
benchmark, a wrong type or an out-of-range value fails with a clear message before any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, from_dict, substitute_variables
from ..strategies.registry import TrainConfig
from .analysis import AnalysisConfig, describe_analysis
from .fomo import FomoConfig, describe_fomo
from .precision import check_precision, resolve_device

LOGGERS = ("interactive", "text", "csv", "tensorboard")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+.\-]{0,79}$")
RESULT_FORMAT = 1


@dataclass
class BenchmarkEntry:
    """A benchmark of the experiment: registry name, its options, and overrides of the train settings."""

    name: str
    options: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


@dataclass
class MethodEntry:
    """A method of the experiment: registry name, its options, a label and a head protocol.

    ``protocol`` overrides the method's declared (paper) head protocol for ablations (``shared``, ``masked``,
    ``per_task``, ``frozen``; see :mod:`avalanche_merge.protocol`); ``prototypes`` (with ``per_task``) evaluates
    by class-mean prototypes, default: the method's declaration. The label defaults to the name, with
    ``-<protocol>`` appended when the protocol is overridden, so that ablations get their own rows.
    """

    name: str
    options: dict = field(default_factory=dict)
    label: str | None = None
    protocol: str | None = None
    prototypes: bool | None = None


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
        device: torch device string, or ``"auto"`` (CUDA when available, else CPU); checked at plan time.
        precision: ``"fp32"``, ``"bf16"`` (autocast; CPU or CUDA) or ``"fp16"`` (autocast and a grad scaler; CUDA
            only) for training and evaluation forward passes (see :mod:`.precision`).
        num_workers: DataLoader worker processes of training and evaluation (0: load in the main process).
        pin_memory: pin DataLoader batches in page-locked memory; None: Avalanche's default (on CUDA devices).
        eval_pretrained: evaluate the model before any training (the pretrained/zero-shot reference row).
        analysis: record parameter geometry, representation drift and held-out retention per run (for
            ``avalanche-merge report``); absent: none of it is recorded.
        fomo: the FoMo-in-Flux protocol (:mod:`avalanche_merge.runner.fomo`): ``A_KA``/``A_ZS``/``GM`` per step
            from the zero-shot point, stream ordering, and a per-task compute budget; absent: not used.
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
    precision: str = "fp32"
    num_workers: int = 0
    pin_memory: bool | None = None
    fomo: FomoConfig | None = None

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
            if not 0 <= s < 2**32:  # numpy's and Avalanche's seeding take 32-bit seeds
                raise ValueError(f"seeds must be in [0, 2**32), got {s}")
        check_device(self.device)
        check_precision(self.precision, self.device)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
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
    protocol: str = "shared"
    prototypes: bool = False
    precision: str = "fp32"
    num_workers: int = 0
    pin_memory: bool | None = None
    fomo: FomoConfig | None = None

    def describe(self) -> dict:
        """The JSON-ready config of this run (what its hash covers; ``analysis`` only when present, the head
        protocol only when it is ``masked``, ``per_task`` or ``frozen``, so that runs stored before protocols
        existed keep their identity: they were ``shared``, or ``prototype`` / ``routed`` methods that own their
        classifier; likewise ``precision`` only when it is not ``fp32``; the device and the DataLoader settings
        never, as they do not change what is computed)."""
        out = {
            "benchmark": self.benchmark, "benchmark_options": dataclasses.asdict(self.benchmark_options),
            "method": self.method, "label": self.label, "method_options": dataclasses.asdict(self.method_options),
            "model": self.model, "model_options": dataclasses.asdict(self.model_options),
            "train": dataclasses.asdict(self.train), "seed": self.seed, "eval_pretrained": self.eval_pretrained,
            "format": RESULT_FORMAT,
        }
        if self.analysis is not None:
            out["analysis"] = describe_analysis(self.analysis)
        if self.protocol in ("masked", "per_task", "frozen"):  # shared, prototype, routed: nothing was chosen
            out["protocol"] = self.protocol
            out["prototypes"] = self.prototypes
        if self.precision != "fp32":
            out["precision"] = self.precision
        if self.fomo is not None:  # absent by default: runs stored before the protocol keep their identity
            out["fomo"] = describe_fomo(self.fomo)
        return out

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def run_id(self) -> str:
        return f"{self.benchmark}__{self.label}__seed{self.seed}__{self.config_hash}"


def check_device(device: str) -> None:
    """Refuse a device string torch does not parse, or a CUDA / MPS device this machine does not have (``"auto"``
    is resolved first: CUDA when available, else CPU)."""
    import torch

    device = resolve_device(device)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")


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


def load_experiment(source: str | Path | dict, variables: dict[str, str] | None = None) -> ExperimentConfig:
    """Parse an experiment config from a JSON file path or a dict (strict keys and types).

    ``${NAME}`` in string values is replaced from ``variables``, then the environment (see
    :func:`~avalanche_merge.config.substitute_variables`); an unset one is a ``ConfigError``.
    """
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    return from_dict(ExperimentConfig, _normalise(substitute_variables(raw, variables)))


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
    labels = [m.label or (m.name if m.protocol is None else f"{m.name}-{m.protocol}") for m in config.methods]
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not _LABEL.match(label) or "__" in label:
            raise ConfigError(f"methods[{i}].label: {label!r} must be 1-80 characters of letters, digits and "
                              f"'_', '-', '+', '.', start with a letter or digit and hold no '__' (it names "
                              f"the run's folder)")
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
        n_exp = planned_experiences(boptions)
        if config.analysis is not None and config.analysis.held_out_domains:
            _check_held_out(bentry.name, bspec, boptions, config.analysis.held_out_domains, i)
        if config.fomo is not None:
            _check_held_out(bentry.name, bspec, boptions, config.fomo.held_out_domains, i, key="fomo")
        for j, (spec, moptions, label) in enumerate(methods):
            entry = config.methods[j]
            try:
                spec.check_compatible(bentry.name, scenario)
                protocol = spec.resolve_protocol(entry.protocol, scenario, bentry.name,
                                                 classes_repeat=bspec.scenario == "domain_incremental")
                run_model_options = head_for_protocol(protocol, config.model.name, model_options, bspec)
                check_schedule(spec.name, moptions, n_exp, bentry.name)
                check_text_tower(spec.name, moptions, config.model.name, model_spec)
                if callable(getattr(moptions, "check_protocol", None)):  # options that need a given protocol
                    moptions.check_protocol(protocol)
                if callable(getattr(moptions, "check_epochs", None)):  # schedules that need enough epochs
                    moptions.check_epochs(train.epochs)
                if callable(getattr(moptions, "check_model", None)):  # methods that need a given backbone
                    moptions.check_model(config.model.name, model_options)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"methods[{j}] ({label}) on benchmarks[{i}] ({bentry.name}): {exc}") from None
            prototypes = spec.prototypes if entry.prototypes is None else bool(entry.prototypes)
            if prototypes and protocol != "per_task":
                if entry.prototypes:
                    raise ConfigError(f"methods[{j}].prototypes: needs protocol 'per_task', got {protocol!r}")
                prototypes = False
            for seed in config.seeds:
                runs.append(RunPlan(bentry.name, boptions, spec.name, label, moptions, config.model.name,
                                    run_model_options, train, seed, tuple(config.loggers),
                                    resolve_device(config.device), config.eval_pretrained, config.analysis,
                                    protocol, prototypes, config.precision, config.num_workers,
                                    config.pin_memory, config.fomo))
    return runs


def planned_experiences(options: Any) -> int | None:
    """The number of experiences a benchmark config will have, when its options tell (else None)."""
    n = getattr(options, "n_experiences", None)
    if isinstance(n, int):
        return n
    domains = getattr(options, "domains", None)
    return len(domains) if isinstance(domains, (list, tuple)) else None


def check_schedule(method: str, options: Any, n_experiences: int | None, benchmark: str) -> None:
    """Refuse a method schedule (``total_tasks``) shorter than the stream."""
    total = getattr(options, "total_tasks", None)
    if isinstance(total, int) and n_experiences is not None and total < n_experiences:
        raise ValueError(f"total_tasks={total} is smaller than the {n_experiences} experiences of {benchmark!r}: "
                         f"the threshold schedule of {method!r} would end before the stream does (omit it to "
                         f"take it from the stream)")


def check_text_tower(method: str, options: Any, model: str, model_spec: Any) -> None:
    """Refuse a method that encodes class names (options with ``needs_text_tower``) on a backbone without a text
    tower (``BackboneSpec.text_tower``)."""
    if getattr(options, "needs_text_tower", False) and not getattr(model_spec, "text_tower", False):
        raise ValueError(f"method {method!r} builds its head from a text tower, but backbone {model!r} has none; use "
                         f"model 'open_clip' (or, on a backbone with a head pretrained on the label space, the "
                         f"method 'pretrained_head')")


def head_for_protocol(protocol: str, model: str, options: Any, bspec: Any) -> Any:
    """Model options for a run under ``protocol``: ``frozen`` needs the pretrained head.

    A ``tiny_vit`` with ``head: "auto"`` keeps its pretrained digit head under ``frozen`` (the analogue of a CLIP
    zero-shot head); an explicit ``"reset"`` head, or no pretrained weights, cannot be frozen meaningfully.
    """
    if protocol != "frozen" or model != "tiny_vit":
        return options
    if not (options.pretrained or options.checkpoint):
        raise ValueError("protocol 'frozen' keeps the pretrained head, but model.options.pretrained is false")
    if options.head == "reset":
        raise ValueError("protocol 'frozen' keeps the pretrained head, but model.options.head is 'reset' (a random "
                         "head would never be trained); use head 'auto' or 'pretrained'")
    return dataclasses.replace(options, head="pretrained") if options.head == "auto" else options


def _check_held_out(name: str, spec: Any, options: Any, domains: list[str], i: int, key: str = "analysis") -> None:
    if spec.held_out is None:
        raise ConfigError(f"benchmarks[{i}]: {name!r} cannot build held-out domains ({key}.held_out_domains); "
                          f"offline MNIST/digits benchmarks can")
    trained = set(getattr(options, "domains", None) or [])
    overlap = sorted(trained & set(domains))
    if overlap:
        raise ConfigError(f"{key}.held_out_domains: {overlap[0]!r} is trained on in benchmarks[{i}] ({name}); "
                          f"held-out tasks must never be trained on")
