"""Run-time part of the ``fomo`` protocol: the zero-shot point, the stream order and the compute budget of a run.

See :mod:`avalanche_merge.runner.fomo` for the protocol and :mod:`avalanche_merge.evaluation.compute` for the
budget formula. The measured steps run on throwaway copies (fresh model, fresh strategy) before the real run; the
caller re-seeds afterwards, so the real run trains exactly as it would without the measurement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..evaluation.compute import StepCost, budget_steps, memory_adjusted_flops
from .fomo import reorder_benchmark, stream_order, zero_shot_point

REFERENCE_METHOD = "naive"


def measure_step(plan: Any, benchmark: Any, method: str, options: Any,
                 protocol_plugins: list) -> tuple[StepCost | None, bool]:
    """One measured update step of ``method`` on a fresh model: one step on each experience up to the second,
    the second measured (costs that start at the second task, e.g. a teacher's forward, are counted).

    Returns:
        ``(cost, gradient_free)``: the step's cost (None when no step ran) and whether it computed no gradient.
    """
    from ..models import BACKBONES
    from ..plugins.budget import StepProbePlugin
    from ..strategies import METHODS
    from ..strategies.registry import BuildContext
    from .run import make_evaluator, seed_everything

    seed_everything(plan.seed)
    model = BACKBONES.get(plan.model).build(plan.model_options, benchmark, plan.seed)
    measure_at = min(1, benchmark.n_experiences - 1)
    probe = StepProbePlugin(measure_at=measure_at)
    ctx = BuildContext(model=model, benchmark=benchmark, train=plan.train, evaluator=make_evaluator([]),
                       plugins=[*protocol_plugins, probe], device=torch.device(plan.device), seed=plan.seed)
    strategy = METHODS.get(method).build(ctx, options)
    for exp in list(benchmark.train_stream)[: measure_at + 1]:
        strategy.train(exp)
    return probe.cost, probe.gradient_free


def prepare_fomo(plan: Any, benchmark: Any, model: torch.nn.Module, held_out: dict,
                 protocol_plugins: list) -> tuple[Any, dict, int | None]:
    """The zero-shot point, the reordered benchmark and the per-task steps of ``plan`` (None: no budget, or a
    gradient-free method).

    Returns:
        ``(benchmark, record, steps)``: the benchmark in training order, the run's ``fomo`` record so far
        (zero-shot point, order, costs), and the steps per task.

    Raises:
        ValueError: the budget is smaller than one step of the method (before any training).
    """
    from ..strategies import METHODS

    fomo = plan.fomo
    device = torch.device(plan.device)
    zero = zero_shot_point(model, benchmark, held_out, device)
    order = stream_order(fomo.ordering, zero["test_accuracy"], plan.seed)
    ordered = reorder_benchmark(benchmark, order)
    zero["test_accuracy"] = [zero["test_accuracy"][j] for j in order]
    record: dict = {"ordering": fomo.ordering, "order": order,
                    "experience_names": list(ordered.experience_names), "zero_shot": zero}
    if fomo.budget is None:
        return ordered, record, None
    cost, gradient_free = measure_step(plan, ordered, plan.method, plan.method_options, protocol_plugins)
    reference, _ = measure_step(plan, ordered, REFERENCE_METHOD, METHODS.get(REFERENCE_METHOD).config_cls(), [])
    if reference is None:
        raise RuntimeError("the reference (naive fine-tuning) took no update step")
    budget = (fomo.budget.flops if fomo.budget.flops is not None
              else fomo.budget.reference_steps * memory_adjusted_flops(reference, reference))
    record["budget"] = {"maf_per_task": budget, "reference": reference.as_dict(),
                        "cost": None if cost is None else cost.as_dict()}
    if cost is None or gradient_free:  # a statistics pass: the budget does not bind, the method keeps its pass
        record["budget"].update(gradient_free=True, steps_per_task=None)
        return ordered, record, None
    steps = budget_steps(budget, cost, reference, method=repr(plan.label))
    record["budget"].update(gradient_free=False, steps_per_task=steps,
                            memory_ratio=cost.memory_bytes / reference.memory_bytes,
                            maf_per_step=memory_adjusted_flops(cost, reference),
                            samples_per_task=steps * plan.train.batch_size)
    return ordered, record, steps


def with_budget(ctx: Any, steps: int | None) -> tuple[Any, Any]:
    """``ctx`` with a :class:`~avalanche_merge.plugins.budget.StepBudgetPlugin` appended (unchanged for None)."""
    if steps is None:
        return ctx, None
    from ..plugins.budget import StepBudgetPlugin

    plugin = StepBudgetPlugin(steps)
    return dataclasses.replace(ctx, plugins=[*ctx.plugins, plugin]), plugin


__all__ = ["REFERENCE_METHOD", "measure_step", "prepare_fomo", "with_budget"]
