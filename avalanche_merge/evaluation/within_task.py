"""Within-task accuracy: the accuracy when the prediction is restricted to the classes of the sample's own
experience (the task-incremental accuracy of a class-incremental model).

Class-incremental accuracy mixes two errors: confusing classes of the same task and confusing tasks. The gap
between within-task accuracy and ordinary accuracy is the second one (van de Ven, Tuytelaars & Tolias, Nature
Machine Intelligence 2022, "Three types of incremental learning"); it is what separates the head protocols
(:mod:`avalanche_merge.protocol`), whose per-task heads are never trained against each other.

- :func:`within_task_accuracy`: the pure function;
- :class:`WithinTaskAccuracyPluginMetric`: the Avalanche plugin metric, per evaluated experience
  (``WithinTaskAcc_Exp/eval_phase/<stream>/Exp<k>``) and per stream (``WithinTaskAcc_Stream/...``), from the
  strategy's own ``mb_output`` (no extra forward pass).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from avalanche.evaluation import PluginMetric

from ..protocol import class_list
from .retrieval import CountingPluginMetric


def within_task_accuracy(logits: torch.Tensor, targets: torch.Tensor, classes: Iterable[int]) -> tuple[int, int]:
    """``(correct, total)`` when ``argmax`` is taken over ``classes`` only (ids beyond the logits are ignored).

    Raises:
        ValueError: a target is not one of ``classes``.
    """
    cols = [c for c in class_list(classes) if c < logits.shape[-1]]
    targets = targets.flatten()
    if not targets.numel():
        return 0, 0
    if not set(targets.tolist()) <= set(cols):
        raise ValueError(f"targets {sorted(set(targets.tolist()) - set(cols))[:4]} are not among the task's classes")
    index = torch.tensor(cols, device=logits.device)
    pred = index[logits.index_select(-1, index).argmax(-1)]
    return int((pred == targets).sum()), int(targets.numel())


class WithinTaskAccuracyPluginMetric(CountingPluginMetric):
    """Within-task accuracy of the strategy's outputs, per evaluated experience and per stream."""

    metric_name = "WithinTaskAcc"

    def count(self, strategy: Any) -> tuple[int, int] | None:
        output = strategy.mb_output
        classes = getattr(strategy.experience, "classes_in_this_experience", None)
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or classes is None:
            return None
        return within_task_accuracy(output.detach(), strategy.mb_y, classes)


def within_task_metrics() -> list[PluginMetric]:
    """``[WithinTaskAccuracyPluginMetric]`` for an ``EvaluationPlugin``."""
    return [WithinTaskAccuracyPluginMetric()]
