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
effective ranks, principal angles).

Memory: the metric holds one fp32 CPU copy of the compared weights (after the last experience; a second one while
it takes a snapshot) plus the step vectors in a :class:`~avalanche_merge.analysis.step_store.StepStore`
(``storage="memory"`` or ``"disk"``, ``dtype="float32"`` or scaled ``"float16"``); metrics are computed one
tensor at a time from the store. Restrict the compared weights with ``include`` on large models. See
``experiments/geometry_memory.py`` for measured figures.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import default_metric_name_template, generic_get_metric_name

from ..analysis.geometry import cosine_matrix, effective_state, shared_names, sign_conflict_rate, steps_report
from ..analysis.step_store import StepStore
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
        storage: where step vectors are kept, ``"memory"`` or ``"disk"`` (a temporary folder under ``folder``).
        dtype: ``"float32"`` (exact) or ``"float16"`` (per-tensor scaled; half the bytes).
        folder: parent folder of the ``disk`` store (default: the system's temporary folder).
    """

    def __init__(self, *, include: str | None = None, density: float | None = 0.2, energy: float = 0.9,
                 storage: str = "memory", dtype: str = "float32", folder: str | None = None) -> None:
        super().__init__()
        if density is not None:
            check_density(density)
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if include is not None:
            try:
                re.compile(include)
            except re.error as exc:
                raise ValueError(f"include must be a regular expression, got {include!r} ({exc})") from None
        self.pattern = re.compile(include) if include is not None else None
        self.density, self.energy = density, energy
        self.store = StepStore(storage=storage, dtype=dtype, folder=folder)
        self.last: dict[str, torch.Tensor] | None = None  # theta after the last experience (theta_0 at first)
        self.names: list[str] = []  # compared in every step: same name and shape throughout
        self.experiences: list[int] = []

    def reset(self) -> None:
        self.store.close()
        self.last = None
        self.names, self.experiences = [], []

    def result(self) -> dict:
        return self.report() if len(self.store) >= 1 else {}

    def steps(self) -> list:
        """Lazy step task vectors so far (see :class:`~avalanche_merge.analysis.step_store.StepStore`)."""
        return self.store.steps(self.names)

    def report(self) -> dict:
        """:func:`~avalanche_merge.analysis.geometry.geometry_report` of the stream so far, plus the experience
        ids (``experiences``). Raises ``ValueError`` before the first experience has been trained."""
        if not len(self.store):
            raise ValueError("no experience has been trained yet: nothing to report")
        out = steps_report(self.store.steps(self.names), self.store.cumulative(self.names), density=self.density,
                           energy=self.energy)
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
        if self.last is None:
            self.last = self._snapshot(strategy.model)
            self.names = list(self.last)
        return None

    def after_training_exp(self, strategy: Any) -> MetricResult:
        if self.last is None:
            return None
        current = self._snapshot(strategy.model)
        # a head that grows, an adapter added later: only names of one shape throughout are compared
        self.names = shared_names([{n: self.last[n] for n in self.names}, current])
        if not self.names:
            raise ValueError("the model's weights share no floating-point parameter of equal shape with its "
                             "weights before the stream")
        self.store.append({n: current[n] - self.last[n] for n in self.names})
        self.last = current
        self.experiences.append(strategy.experience.current_experience)
        steps, cumulative = self.store.steps(self.names), self.store.cumulative(self.names)
        x, i = strategy.clock.train_iterations, self.experiences[-1]
        out = [MetricValue(self, _name("TaskVectorNorm_Step", i), steps[-1].norm(), x),
               MetricValue(self, _name("TaskVectorNorm_Cumulative", i), cumulative[-1].norm(), x),
               MetricValue(self, _name("TaskVectorCosine"), torch.as_tensor(cosine_matrix(steps)), x)]
        if len(steps) > 1:
            out.append(MetricValue(self, _name("SignConflict"), sign_conflict_rate(steps, density=self.density), x))
        return out

    def __str__(self) -> str:
        return "ParameterGeometry"


def geometry_metrics(*, include: str | None = None, density: float | None = 0.2, energy: float = 0.9,
                     storage: str = "memory", dtype: str = "float32") -> list[PluginMetric]:
    """``[ParameterGeometryPluginMetric]`` for an ``EvaluationPlugin``."""
    return [ParameterGeometryPluginMetric(include=include, density=density, energy=energy, storage=storage,
                                          dtype=dtype)]


__all__ = ["ParameterGeometryPluginMetric", "geometry_metrics"]
