"""Plan-time checks that need the benchmark's shapes and the model's architecture (``--dry-run`` runs them too).

:func:`plan_experiment` validates names, types and ranges. :func:`preflight` goes one step further, cheaply and
before any pretraining or training: it builds each benchmark once (offline data: a second; local datasets: their
files are found and read), builds each backbone's architecture on the ``meta`` device (no weights loaded,
nothing pretrained) after checking every path the real build will read (checkpoints, cache folder, open_clip
weights), and resolves on it what the runs will look up by name or kind: LoRA ``target_modules`` (per
architecture, see :mod:`avalanche_merge.models.targets`), the weights sparse masks select and the analysis
``layers``. Combinations that cannot run (representation drift of a routed model) are refused here too.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..config import ConfigError
from .plan import RunPlan


def _key(options: Any) -> str:
    return json.dumps(dataclasses.asdict(options), sort_keys=True, default=str)


def _shapes(plans: list[RunPlan], tasks: dict | None = None) -> dict[tuple[str, str], tuple[tuple[int, int, int], int]]:
    """``(input_shape, num_classes)`` of each distinct benchmark config (built once, with the first seed); the
    number of experiences goes to ``tasks`` if given."""
    from ..benchmarks import BENCHMARKS

    out: dict[tuple[str, str], tuple[tuple[int, int, int], int]] = {}
    for plan in plans:
        key = (plan.benchmark, _key(plan.benchmark_options))
        if key in out:
            continue
        try:
            bench = BENCHMARKS.get(plan.benchmark).build(plan.benchmark_options, plan.seed)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"benchmark {plan.benchmark!r}: {exc}") from None
        out[key] = (tuple(bench.input_shape), int(bench.num_classes))
        if tasks is not None:
            tasks[key] = int(bench.n_experiences)
    return out


def _skeletons(plans: list[RunPlan], shapes: dict) -> dict[tuple, Any]:
    """The meta-device architecture of each distinct (backbone config, benchmark shapes)."""
    from ..models import BACKBONES

    out: dict[tuple, Any] = {}
    for plan in plans:
        shape = shapes[(plan.benchmark, _key(plan.benchmark_options))]
        key = (plan.model, _key(plan.model_options), shape)
        if key in out:
            continue
        spec = BACKBONES.get(plan.model)
        if spec.skeleton is None:
            out[key] = None
            continue
        try:
            out[key] = spec.skeleton(plan.model_options, *shape)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"model.options ({plan.model} on {plan.benchmark}, input {shape[0]}, "
                              f"{shape[1]} classes): {exc}") from None
    return out


def _check_targets(plan: RunPlan, model: Any) -> None:
    """What a method looks up in the model by name or kind resolves on its skeleton: LoRA ``target_modules`` (any
    method option of that name; roles and ``"auto"`` translated per architecture, fused attention split as the
    learner will; convolutions refused for learners on nn.Linear inputs) and the weights sparse masks select."""
    from ..lora.adapters import resolve_targets
    from ..lora.registry import LEARNERS
    from ..merging.heads import find_head

    options = plan.method_options
    head = getattr(options, "head", "auto")
    targets = getattr(options, "target_modules", None)
    parameters = getattr(options, "parameters", None)
    if targets:
        allow_conv = getattr(LEARNERS.get(plan.method), "conv_targets", True) if plan.method in LEARNERS else True
        try:
            exclude = [find_head(model, head if isinstance(head, str) else "auto")]
            resolve_targets(model, targets, exclude=exclude, allow_conv=allow_conv)
        except ValueError as exc:
            raise ConfigError(f"methods ({plan.label}).options.target_modules on {plan.benchmark}: {exc}") from None
    if isinstance(parameters, str):
        from ..sparse.learner import selectable_parameters

        try:
            exclude = find_head(model, head) if getattr(options, "train_head", False) else None
            selectable_parameters(model, parameters, exclude)
        except ValueError as exc:
            raise ConfigError(f"methods ({plan.label}).options.parameters on {plan.benchmark}: {exc}") from None


def _check_prompts(plan: RunPlan, model: Any, num_classes: int, n_tasks: int) -> None:
    """Prompt methods: the prompted layers exist, the attention form is supported, the pools and CODA's components
    fit (the prompted model is built on the meta-device skeleton, then its hooks are removed)."""
    from ..strategies import METHODS

    if METHODS.get(plan.method).family != "prompt":
        return
    from ..strategies.prompts import check_prompt_model

    try:
        check_prompt_model(plan.method, plan.method_options, model, num_classes, n_tasks)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"methods ({plan.label}).options on {plan.model} / {plan.benchmark}: {exc}") from None


def _check_analysis(plan: RunPlan, model: Any) -> None:
    """Analysis layers must be modules of the model; drift cannot probe a routed model (tasks run apart)."""
    from ..strategies import METHODS

    analysis = plan.analysis
    if analysis is None:
        return
    if analysis.geometry and analysis.geometry_include and model is not None:
        import re

        pattern = re.compile(analysis.geometry_include)
        if not any(pattern.search(n) for n in model.state_dict()):
            raise ConfigError(f"analysis.geometry_include: {analysis.geometry_include!r} matches no weight of "
                              f"{plan.model} (e.g. {list(model.state_dict())[:4]})")
    if not analysis.drift:
        return
    if METHODS.get(plan.method).protocol == "routed":
        raise ConfigError(f"analysis.drift: {plan.label!r} routes each input to its task's adapter, so a layer "
                          f"never sees a whole probe batch and drift cannot be measured; set "
                          f"\"drift\": false for this experiment or run the routed method in another one")
    if not analysis.layers and model is not None:  # the default blocks must exist (a CNN has no ModuleList)
        from ..models.targets import analysis_layers

        try:
            analysis_layers(model)
        except ValueError as exc:
            raise ConfigError(f"analysis.layers: {exc}") from None
    if analysis.layers and model is not None:
        names = {n for n, _ in model.named_modules() if n}
        missing = [n for n in analysis.layers if n not in names]
        if missing:
            blocks = sorted({n.split(".")[0] + "." + n.split(".")[1] for n in names if n.count(".") >= 1})[:8]
            raise ConfigError(f"analysis.layers: {missing[0]!r} is not a module of {plan.model}; e.g. {blocks}")


def preflight(plans: list[RunPlan]) -> None:
    """Check ``plans`` against the benchmarks' shapes and the models' architectures (see the module doc).

    Raises:
        ConfigError: the first problem found, naming the config field.
    """
    if not plans:
        return
    tasks: dict = {}
    shapes = _shapes(plans, tasks)
    skeletons = _skeletons(plans, shapes)
    for plan in plans:
        shape = shapes[(plan.benchmark, _key(plan.benchmark_options))]
        model = skeletons[(plan.model, _key(plan.model_options), shape)]
        if model is not None:
            _check_targets(plan, model)
            _check_prompts(plan, model, shape[1], tasks[(plan.benchmark, _key(plan.benchmark_options))])
        _check_analysis(plan, model)
