"""Task-vector geometry of a training stream as an Avalanche plugin metric (any strategy, ours or Avalanche's).

The metric snapshots the model's effective weights (:func:`~avalanche_merge.analysis.geometry.effective_state`:
LoRA adapters folded into their base weights) before the first experience (``theta_0``, the pretrained weights)
and after every training experience, and measures the task vectors with the pure functions of
:mod:`avalanche_merge.analysis.geometry`. Being an evaluator plugin, it runs after the strategy's own plugins, so
an experience's snapshot includes what they did at its end (a merge, a projection).

Emitted after every training experience ``i`` (train phase, x = training iterations):

- ``TaskVectorNorm_Step/train_phase/train_stream/Exp{i}``: ``||theta_i - theta_{i-1}||``;
- ``TaskVectorNorm_Cumulative/train_phase/train_stream/Exp{i}``: ``||theta_i - theta_0||``;
- ``TaskVectorCosine/train_phase/train_stream``: the ``(i+1) x (i+1)`` cosine matrix of the step vectors (a tensor,
  as Avalanche's own matrix metrics);
- ``SignConflict/train_phase/train_stream``: the sign-conflict rate of the step vectors (from the second
  experience; trimmed to ``density`` as TIES does).

:meth:`report` returns the full :func:`~avalanche_merge.analysis.geometry.geometry_report` (per-layer norms,
effective ranks, principal angles). Snapshots are fp32 CPU copies of the compared weights, one per experience:
restrict them with ``include`` on large models.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import default_metric_name_template, generic_get_metric_name

from ..analysis.geometry import cosine_matrix, effective_state, geometry_report, sign_conflict_rate, task_vectors
from ..merging.steps import check_density


def _name(metric: str, experience: int | None = None) -> str:
    return generic_get_metric_name(default_metric_name_template,
                                   {"metric_name": metric, "phase_name": "train", "stream_name": "train",
                                    "experience_id": experience, "task_label": None})


class ParameterGeometryPluginMetric(PluginMetric[dict]):
    """Norms, cosines and sign conflicts of per-experience task vectors; full geometry through :meth:`report`.

    Args:
        include: regular expression; only parameters whose name matches (``re.search``) are compared. Default:
            every floating-point parameter and buffer.
        density: fraction of each tensor kept before counting sign conflicts, in (0, 1]; None counts every
            non-zero entry.
        energy: fraction of ``sum sigma^2`` that defines an update's subspace for principal angles, in (0, 1].
    """

    def __init__(self, *, include: str | None = None, density: float | None = 0.2, energy: float = 0.9) -> None:
        super().__init__()
        if density is not None:
            check_density(density)
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        self.pattern = re.compile(include) if include is not None else None
        self.density, self.energy = density, energy
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.experiences: list[int] = []

    def reset(self) -> None:
        self.snapshots, self.experiences = [], []

    def result(self) -> dict:
        return self.report() if len(self.snapshots) >= 2 else {}

    def report(self) -> dict:
        """:func:`~avalanche_merge.analysis.geometry.geometry_report` of the snapshots so far, plus the experience
        ids (``experiences``). Raises ``ValueError`` before the first experience has been trained."""
        if len(self.snapshots) < 2:
            raise ValueError("no experience has been trained yet: nothing to report")
        out = geometry_report(self.snapshots, density=self.density, energy=self.energy)
        out["experiences"] = list(self.experiences)
        return out

    def _snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = effective_state(model)
        if self.pattern is not None:
            state = {k: v for k, v in state.items() if self.pattern.search(k)}
            if not state:
                raise ValueError(f"include={self.pattern.pattern!r} matches no parameter of the model")
        return state

    def before_training_exp(self, strategy: Any) -> MetricResult:
        if not self.snapshots:
            self.snapshots.append(self._snapshot(strategy.model))
        return None

    def after_training_exp(self, strategy: Any) -> MetricResult:
        if not self.snapshots:
            return None
        self.snapshots.append(self._snapshot(strategy.model))
        self.experiences.append(strategy.experience.current_experience)
        steps, cumulative = task_vectors(self.snapshots)
        x, i = strategy.clock.train_iterations, self.experiences[-1]
        out = [MetricValue(self, _name("TaskVectorNorm_Step", i), steps[-1].norm(), x),
               MetricValue(self, _name("TaskVectorNorm_Cumulative", i), cumulative[-1].norm(), x),
               MetricValue(self, _name("TaskVectorCosine"), torch.as_tensor(cosine_matrix(steps)), x)]
        if len(steps) > 1:
            out.append(MetricValue(self, _name("SignConflict"), sign_conflict_rate(steps, density=self.density), x))
        return out

    def __str__(self) -> str:
        return "ParameterGeometry"


def geometry_metrics(*, include: str | None = None, density: float | None = 0.2,
                     energy: float = 0.9) -> list[PluginMetric]:
    """``[ParameterGeometryPluginMetric]`` for an ``EvaluationPlugin``."""
    return [ParameterGeometryPluginMetric(include=include, density=density, energy=energy)]


__all__ = ["ParameterGeometryPluginMetric", "geometry_metrics"]
