"""Representation drift during a training stream, as an Avalanche plugin metric (any strategy).

Fixed probe sets (by default a seeded sample of each test experience) are run through the model before the first
experience and after every training experience; the pooled outputs of the probed layers are compared with linear
CKA (Kornblith et al., ICML 2019; optionally SVCCA, Raghu et al., NeurIPS 2017), see
:mod:`avalanche_merge.analysis.cka`. Two references:

- *pretrained*: ``CKA(f_0(P_j), f_i(P_j))``, features of probe ``j`` before any training versus after experience
  ``i``: how far the representation has moved from the pretrained one;
- *learned*: ``CKA(f_j(P_j), f_i(P_j))`` for ``j < i``: the features of an earlier task's data right after that
  task was learned versus now: the drift that can make an earlier task's head (or prototype) stale.

Emitted after every training experience (train phase): ``CKA_Pretrained/train_phase/train_stream`` (mean over
probes, last probed layer), and from the second experience ``CKA_Learned/train_phase/train_stream`` (mean over
earlier probes, last probed layer). :meth:`report` has every value per layer and probe. The metric uses its own
forward passes (eval mode, no gradients, no global RNG draws), so it does not change the run it measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import default_metric_name_template, generic_get_metric_name

from ..analysis.cka import POOLS, find_blocks, layer_features, linear_cka, svcca
from .probes import probe_tensors


def _name(metric: str) -> str:
    return generic_get_metric_name(default_metric_name_template,
                                   {"metric_name": metric, "phase_name": "train", "stream_name": "train",
                                    "experience_id": None, "task_label": None})


def _forward(model: torch.nn.Module, x: torch.Tensor, *rest: Any) -> Any:
    from avalanche.models.utils import avalanche_forward

    return avalanche_forward(model, x, rest[-1] if rest else None)


class RepresentationDriftPluginMetric(PluginMetric[dict]):
    """CKA (and optionally SVCCA) between pretrained, just-learned and current features of fixed probe sets.

    Args:
        probes: datasets or experiences (anything with ``.dataset``), e.g. ``benchmark.test_stream``; probe ``j``
            is taken to be the data of training experience ``j``.
        layers: module names to probe; default the blocks of the model's longest ``nn.ModuleList``
            (:func:`~avalanche_merge.analysis.cka.find_blocks`).
        probe_samples: inputs per probe set (fixed seeded sample), >= 4.
        seed: seed of the samples (probe ``j`` uses ``seed + j``).
        pool: how token outputs become one vector (``mean``, ``cls``, ``flatten``).
        with_svcca: also compute SVCCA (slower; needs more probe inputs than kept directions).
        batch_size: inputs per forward pass.
    """

    def __init__(self, probes: Sequence[Any], *, layers: Sequence[str] | None = None, probe_samples: int = 128,
                 seed: int = 0, pool: str = "mean", with_svcca: bool = False, batch_size: int = 256) -> None:
        super().__init__()
        self.probe_sets = [getattr(p, "dataset", p) for p in probes]
        if not self.probe_sets:
            raise ValueError("probes must hold at least one dataset")
        if isinstance(probe_samples, bool) or not isinstance(probe_samples, int) or probe_samples < 4:
            raise ValueError(f"probe_samples must be an int >= 4, got {probe_samples!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.layers = list(layers) if layers is not None else None
        self.probe_samples, self.seed, self.pool = probe_samples, seed, pool
        self.with_svcca, self.batch_size = with_svcca, batch_size
        self._inputs: list[tuple[torch.Tensor, ...]] | None = None
        self.reset()

    def reset(self) -> None:
        self._pretrained: list[dict[str, torch.Tensor]] | None = None
        self._learned: dict[int, dict[str, torch.Tensor]] = {}
        self.experiences: list[int] = []
        self.cka_pretrained: list[np.ndarray] = []  # per step: layers x probes
        self.cka_learned: list[np.ndarray] = []  # per step: layers x probes (nan where j >= i)
        self.svcca_pretrained: list[np.ndarray] = []

    def result(self) -> dict:
        return self.report()

    def _features(self, model: torch.nn.Module, device: Any) -> list[dict[str, torch.Tensor]]:
        assert self._inputs is not None
        out = []
        for x, *rest in self._inputs:
            t = rest[-1] if len(rest) >= 2 else None  # (x, y, t): pass the task labels on
            batches = [(xb, tb) for xb, tb in zip(torch.split(x, self.batch_size),
                                                  torch.split(t, self.batch_size), strict=True)] if t is not None \
                else list(torch.split(x, self.batch_size))
            out.append(layer_features(model, batches, self.layers, pool=self.pool, device=device, forward=_forward))
        return out

    def before_training_exp(self, strategy: Any) -> MetricResult:
        if self._pretrained is not None:
            return None
        if self.layers is None:
            self.layers = find_blocks(strategy.model)
        if self._inputs is None:
            self._inputs = [probe_tensors(d, self.probe_samples, self.seed + j) for j, d in enumerate(self.probe_sets)]
        self._pretrained = self._features(strategy.model, strategy.device)
        return None

    def after_training_exp(self, strategy: Any) -> MetricResult:
        if self._pretrained is None:
            return None
        i = strategy.experience.current_experience
        self.experiences.append(i)
        feats = self._features(strategy.model, strategy.device)
        if i < len(feats):
            self._learned[i] = feats[i]
        n_layers, n_probes = len(self.layers), len(feats)
        pre = np.full((n_layers, n_probes), np.nan)
        learned = np.full((n_layers, n_probes), np.nan)
        sv = np.full((n_layers, n_probes), np.nan)
        for a, layer in enumerate(self.layers):
            for j in range(n_probes):
                pre[a, j] = linear_cka(self._pretrained[j][layer], feats[j][layer])
                if j in self._learned and j != i:
                    learned[a, j] = linear_cka(self._learned[j][layer], feats[j][layer])
                if self.with_svcca:
                    sv[a, j] = svcca(self._pretrained[j][layer], feats[j][layer])
        self.cka_pretrained.append(pre)
        self.cka_learned.append(learned)
        if self.with_svcca:
            self.svcca_pretrained.append(sv)
        x = strategy.clock.train_iterations
        out = [MetricValue(self, _name("CKA_Pretrained"), float(np.nanmean(pre[-1])), x)]
        if np.isfinite(learned[-1]).any():
            out.append(MetricValue(self, _name("CKA_Learned"), float(np.nanmean(learned[-1])), x))
        return out

    def report(self) -> dict:
        """Per training step: ``cka_pretrained`` / ``cka_learned`` (and ``svcca_pretrained``) as ``layers x probes``
        lists (``None`` where undefined), with ``layers``, ``experiences`` and ``probe_samples``."""

        def rows(ms: list[np.ndarray]) -> list:
            return [[[None if not math.isfinite(v) else float(v) for v in r] for r in m] for m in ms]

        out = {"layers": self.layers, "experiences": list(self.experiences), "probe_samples": self.probe_samples,
               "pool": self.pool, "cka_pretrained": rows(self.cka_pretrained), "cka_learned": rows(self.cka_learned)}
        if self.with_svcca:
            out["svcca_pretrained"] = rows(self.svcca_pretrained)
        return out

    def __str__(self) -> str:
        return "RepresentationDrift"


def drift_metrics(probes: Sequence[Any], **kwargs: Any) -> list[PluginMetric]:
    """``[RepresentationDriftPluginMetric(probes, **kwargs)]`` for an ``EvaluationPlugin``."""
    return [RepresentationDriftPluginMetric(probes, **kwargs)]


__all__ = ["RepresentationDriftPluginMetric", "drift_metrics"]
