"""Retrieval accuracy: how often a retrieval-routed method sends a test input to the task it came from.

- :func:`retrieval_accuracy`: the pure function (routed vs. true task indices);
- :class:`RetrievalAccuracy`: a standalone running metric;
- :class:`RetrievalAccuracyPluginMetric`: the Avalanche plugin metric, per evaluated experience
  (``RetrievalAcc_Exp/eval_phase/<stream>/Exp<k>``) and per stream (``RetrievalAcc_Stream/...``). It works with any
  strategy whose router :func:`~avalanche_merge.retrieval.router.find_router` finds; the true task of a sample is
  the index of the experience being evaluated (the experience that introduced it), or ``true_task(strategy)``;
- :func:`retrieval_metrics`: the plugin list for an ``EvaluationPlugin``.

Routing is read from the router's ``last_routed`` after the strategy's own forward pass when it matches the
mini-batch, so the metric does not route twice; otherwise the metric calls ``router.route(mb_x)``. A strategy
without a router gets no value (no error: the metric can sit in a shared evaluator).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from avalanche.evaluation import Metric, PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import default_metric_name_template, generic_get_metric_name

from ..retrieval.router import find_router


def retrieval_accuracy(routed: torch.Tensor, true: torch.Tensor | int) -> float:
    """Fraction of entries of ``routed`` equal to ``true`` (a tensor of the same length or one task index)."""
    routed = torch.as_tensor(routed).flatten()
    true = torch.as_tensor(true).flatten()
    if true.numel() == 1:
        true = true.expand_as(routed)
    if true.shape != routed.shape:
        raise ValueError(f"routed has {routed.numel()} entries, true {true.numel()}")
    return float((routed == true).float().mean()) if routed.numel() else float("nan")


class RetrievalAccuracy(Metric[float]):
    """Running retrieval accuracy over the batches given to :meth:`update`."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, routed: torch.Tensor, true: torch.Tensor | int) -> None:
        routed = torch.as_tensor(routed).flatten()
        if routed.numel():
            self.correct += round(retrieval_accuracy(routed, true) * routed.numel())
            self.total += routed.numel()

    def result(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def reset(self) -> None:
        self.correct = self.total = 0


def _name(metric: str, strategy: Any, experience: int | None) -> str:
    stream = getattr(getattr(strategy, "experience", None), "origin_stream", None)
    return generic_get_metric_name(default_metric_name_template,
                                   {"metric_name": metric, "phase_name": "eval",
                                    "stream_name": getattr(stream, "name", "test"),
                                    "experience_id": experience, "task_label": None})


class CountingPluginMetric(PluginMetric[float]):
    """A fraction of evaluated samples, per evaluated experience (``<name>_Exp``) and per stream
    (``<name>_Stream``); subclasses say, per mini-batch, how many samples count and how many were seen."""

    metric_name = "Counting"

    def __init__(self) -> None:
        super().__init__()
        self._exp = RetrievalAccuracy()  # a running correct / total counter
        self._stream = RetrievalAccuracy()

    def count(self, strategy: Any) -> tuple[int, int] | None:
        """``(correct, total)`` of the current mini-batch, or None when the strategy has nothing to measure."""
        raise NotImplementedError

    def reset(self) -> None:
        self._exp.reset()
        self._stream.reset()

    def result(self) -> float:
        return self._stream.result()

    def before_eval(self, strategy: Any) -> MetricResult:
        self._stream.reset()
        return None

    def before_eval_exp(self, strategy: Any) -> MetricResult:
        self._exp.reset()
        return None

    def after_eval_iteration(self, strategy: Any) -> MetricResult:
        counted = self.count(strategy)
        if counted is not None:
            for counter in (self._exp, self._stream):
                counter.correct += counted[0]
                counter.total += counted[1]
        return None

    def after_eval_exp(self, strategy: Any) -> MetricResult:
        if not self._exp.total:
            return None
        name = _name(f"{self.metric_name}_Exp", strategy, strategy.experience.current_experience)
        return [MetricValue(self, name, self._exp.result(), strategy.clock.train_iterations)]

    def after_eval(self, strategy: Any) -> MetricResult:
        if not self._stream.total:
            return None
        return [MetricValue(self, _name(f"{self.metric_name}_Stream", strategy, None), self._stream.result(),
                            strategy.clock.train_iterations)]

    def __str__(self) -> str:
        return self.metric_name


class RetrievalAccuracyPluginMetric(CountingPluginMetric):
    """Retrieval accuracy of the strategy's router per evaluated experience and per stream.

    Args:
        true_task: ``true_task(strategy) -> int``, the task of the experience being evaluated (default: its
            ``current_experience`` index).
    """

    metric_name = "RetrievalAcc"

    def __init__(self, *, true_task: Callable[[Any], int] | None = None) -> None:
        super().__init__()
        self.true_task = true_task or (lambda strategy: strategy.experience.current_experience)

    def count(self, strategy: Any) -> tuple[int, int] | None:
        router = find_router(strategy)
        if router is None:
            return None
        routed = getattr(router, "last_routed", None)
        if routed is None or len(routed) != len(strategy.mb_x):
            with torch.no_grad():
                routed = router.route(strategy.mb_x)
        routed = torch.as_tensor(routed).detach().cpu().flatten()
        if not routed.numel():
            return None
        return round(retrieval_accuracy(routed, self.true_task(strategy)) * routed.numel()), routed.numel()


def retrieval_metrics(*, true_task: Callable[[Any], int] | None = None) -> list[PluginMetric]:
    """``[RetrievalAccuracyPluginMetric]`` for an ``EvaluationPlugin``."""
    return [RetrievalAccuracyPluginMetric(true_task=true_task)]
