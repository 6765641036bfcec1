"""The continual-learning metrics papers report, as one Avalanche plugin metric over the accuracy matrix.

The metric builds the accuracy matrix ``R[i][j]`` itself from the predictions of full evaluations of a stream
(the strategy's own ``mb_output``, as Avalanche's accuracy metric, so no extra forward pass), and reports the pure
functions of :mod:`avalanche_merge.evaluation.matrix` over it. Its definitions, and where they differ from
Avalanche's ``forgetting_metrics`` / ``bwt_metrics`` / ``forward_transfer_metrics``, are in that module.

Rows: an evaluation of the whole stream before any training experience is the *pretrained* row (the reference of
forward transfer); the first whole-stream evaluation after each training experience is the next row of ``R``.
Partial evaluations (one experience, a periodic evaluation inside training) are ignored.

Held-out probe tasks (Roth et al., NeurIPS 2024 D&B): datasets that are never trained on, evaluated with the
strategy's own ``forward`` (so prototype classifiers and routed models predict as they do on the test stream)
right after each row is recorded, in eval mode and without gradients. Their mean accuracy is the *retention* of
held-out ability, the mean of ``R[i]`` the *accumulation*, reported with their geometric mean.

Emitted at the end of each recorded evaluation (eval phase, e.g. ``CL_BWT/eval_phase/test_stream``):
``CL_AverageAccuracy``, ``CL_AvgIncAccuracy``, ``CL_BWT``, ``CL_Forgetting`` (Chaudhry's max-based),
``CL_FWT_Pretrained`` (needs the pretrained row), and with held-out tasks ``CL_HeldOutAcc/.../<name>``,
``CL_Accumulation``, ``CL_Retention``, ``CL_AccRetGeoMean``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue

from .matrix import (
    accumulation_retention,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from .probes import fixed_indices, probe_tensors


class ContinualMetricsPluginMetric(PluginMetric[dict]):
    """Accuracy matrix, paper metrics and held-out retention for any strategy.

    Args:
        held_out: ``{name: dataset}`` of probe tasks never trained on (items ``(x, y, t)``), or None.
        held_out_samples: inputs per held-out task (fixed seeded sample), >= 1.
        seed: seed of the held-out samples.
        batch_size: inputs per forward pass on the held-out tasks.
    """

    def __init__(self, *, held_out: Mapping[str, Any] | None = None, held_out_samples: int = 1000, seed: int = 0,
                 batch_size: int = 256) -> None:
        super().__init__()
        if held_out is not None and not isinstance(held_out, Mapping):
            raise TypeError(f"held_out must be a mapping name -> dataset, got {type(held_out).__name__}")
        self.held_out = dict(held_out or {})
        self.held_out_samples, self.seed, self.batch_size = held_out_samples, seed, batch_size
        self._held_tensors: dict[str, tuple[torch.Tensor, ...]] | None = None
        if self.held_out:
            fixed_indices(1, held_out_samples, seed)  # validates held_out_samples
        self.reset()

    def reset(self) -> None:
        self.rows: list[list[float]] = []
        self.pretrained: list[float] | None = None
        self.held_out_rows: list[list[float]] = []
        self.held_out_pretrained: list[float] | None = None
        self._trained = 0
        self._correct: dict[int, int] = {}
        self._total: dict[int, int] = {}
        self._n_exps: int | None = None

    # -- accumulation ------------------------------------------------------------------------------------------
    def after_training_exp(self, strategy: Any) -> MetricResult:
        self._trained += 1
        return None

    def before_eval(self, strategy: Any) -> MetricResult:
        self._correct, self._total, self._n_exps = {}, {}, None
        return None

    def after_eval_iteration(self, strategy: Any) -> MetricResult:
        out, y = strategy.mb_output, strategy.mb_y
        pred = out.argmax(1) if out.ndim > 1 else out
        exp = strategy.experience.current_experience
        self._correct[exp] = self._correct.get(exp, 0) + int((pred == y).sum())
        self._total[exp] = self._total.get(exp, 0) + int(y.numel())
        if self._n_exps is None:
            stream = getattr(strategy.experience, "origin_stream", None)
            self._n_exps = len(stream) if stream is not None else None
        return None

    def after_eval(self, strategy: Any) -> MetricResult:
        n = self._n_exps
        if n is None or sorted(self._total) != list(range(n)):
            return None  # not a whole-stream evaluation
        row = [self._correct[j] / self._total[j] if self._total[j] else math.nan for j in range(n)]
        if self._trained == 0:
            if self.pretrained is not None:
                return None
            self.pretrained = row
            if self.held_out:
                self.held_out_pretrained = self._held_out_accuracy(strategy)
        elif self._trained > len(self.rows):
            self.rows.append(row)
            if self.held_out:
                self.held_out_rows.append(self._held_out_accuracy(strategy))
        else:
            return None
        return self._package_result(strategy)

    # -- held-out tasks ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _held_out_accuracy(self, strategy: Any) -> list[float]:
        if self._held_tensors is None:
            self._held_tensors = {name: probe_tensors(d, self.held_out_samples, self.seed + k)
                                  for k, (name, d) in enumerate(self.held_out.items())}
        saved = strategy.mbatch
        was_training = strategy.model.training
        strategy.model.eval()
        accs = []
        try:
            for tensors in self._held_tensors.values():
                correct = total = 0
                for chunk in zip(*(torch.split(t, self.batch_size) for t in tensors), strict=True):
                    strategy.mbatch = [t.to(strategy.device) for t in chunk]
                    out = strategy.forward()
                    out = out[0] if isinstance(out, tuple) else out
                    pred = out.argmax(1) if out.ndim > 1 else out
                    correct += int((pred == strategy.mb_y).sum())
                    total += int(chunk[1].numel())
                accs.append(correct / total)
        finally:
            strategy.mbatch = saved
            strategy.model.train(was_training)
        return accs

    # -- results -----------------------------------------------------------------------------------------------
    def result(self) -> dict:
        """Every metric over the rows recorded so far (``{}`` before the first training experience).

        During the stream (``k < T`` rows) the matrix metrics use the experiences trained so far, the leading
        ``k x k`` block of ``R``; after the last experience that is the whole matrix.
        """
        if not self.rows:
            return {}
        R = np.asarray(self.rows)
        k = min(R.shape)
        S = R[:k, :k]
        out = {"accuracy_matrix": self.rows, "pretrained_accuracy": self.pretrained,
               "average_accuracy": average_accuracy(S), "avg_inc_accuracy": average_incremental_accuracy(S),
               "bwt": backward_transfer(S), "forgetting": forgetting(S)}
        if self.pretrained is not None and not any(math.isnan(v) for v in self.pretrained):
            out["fwt_pretrained"] = forward_transfer(S, self.pretrained[:k])
        if self.held_out_rows:
            out["held_out_names"] = list(self.held_out)
            out["held_out_accuracy"] = self.held_out_rows
            out["held_out_pretrained"] = self.held_out_pretrained
            out.update(accumulation_retention(R, self.held_out_rows, pretrained=self.pretrained,
                                              held_out_pretrained=self.held_out_pretrained))
        return out

    def _package_result(self, strategy: Any) -> MetricResult:
        stream = getattr(getattr(strategy.experience, "origin_stream", None), "name", "test") + "_stream"
        x = strategy.clock.train_iterations
        res = self.result()
        names = {"average_accuracy": "CL_AverageAccuracy", "avg_inc_accuracy": "CL_AvgIncAccuracy", "bwt": "CL_BWT",
                 "forgetting": "CL_Forgetting", "fwt_pretrained": "CL_FWT_Pretrained",
                 "final_accumulation": "CL_Accumulation", "final_retention": "CL_Retention",
                 "final_geometric_mean": "CL_AccRetGeoMean"}
        out = [MetricValue(self, f"{names[k]}/eval_phase/{stream}", float(res[k]), x)
               for k in names if k in res and res[k] is not None and math.isfinite(res[k])]
        if self.held_out_rows:
            for name, acc in zip(self.held_out, self.held_out_rows[-1], strict=True):
                out.append(MetricValue(self, f"CL_HeldOutAcc/eval_phase/{stream}/{name}", acc, x))
        return out

    def __str__(self) -> str:
        return "ContinualMetrics"


def continual_metrics(**kwargs: Any) -> list[PluginMetric]:
    """``[ContinualMetricsPluginMetric(**kwargs)]`` for an ``EvaluationPlugin``."""
    return [ContinualMetricsPluginMetric(**kwargs)]


__all__ = ["ContinualMetricsPluginMetric", "continual_metrics"]
