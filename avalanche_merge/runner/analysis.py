"""The optional ``analysis`` section of an experiment: geometry, drift and held-out metrics recorded per run.

With ``"analysis": {...}`` in a config, every run's evaluator also gets
:class:`~avalanche_merge.evaluation.parameter_geometry.ParameterGeometryPluginMetric`,
:class:`~avalanche_merge.evaluation.drift.RepresentationDriftPluginMetric` (probes: the test experiences) and
:class:`~avalanche_merge.evaluation.continual.ContinualMetricsPluginMetric` (with held-out domains when asked),
and the run's ``result.json`` gets an ``analysis`` record that ``avalanche-merge report`` plots. The metrics do not
change what the run trains (tested); the section enters the run's config hash only when present, so runs without
it keep their identity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..analysis.cka import POOLS
from ..config import check_choice, check_range


@dataclass
class AnalysisConfig:
    """What to record for ``avalanche-merge report``.

    Args:
        geometry: record task-vector geometry (weights snapshotted before the stream and after each experience).
        drift: record CKA drift of the probed layers on a fixed sample of every test experience.
        layers: module names to probe; empty: the blocks of the model's longest ``nn.ModuleList``.
        probe_samples: inputs per test experience for drift, >= 4.
        pool: how token outputs become one vector: ``mean``, ``cls`` or ``flatten``.
        svcca: also record SVCCA (needs more probe inputs than kept directions).
        held_out_domains: domain transformations (see ``avalanche_merge.benchmarks.transforms``) of the
            benchmark's test images used as held-out probe tasks that are never trained on (offline MNIST/digits
            benchmarks); empty: no retention metric.
        held_out_samples: images per held-out domain, a positive multiple of 10.
        density: fraction of each task-vector tensor kept before counting sign conflicts (TIES' trim), in (0, 1].
        energy: fraction of an update's ``sum sigma^2`` that defines its subspace for principal angles, in (0, 1].
        geometry_include: regular expression restricting the weights geometry compares (e.g. ``"blocks\\.1[01]"``
            for the last two blocks of a ViT-B); None: every floating-point weight.
        geometry_storage: where the per-experience step vectors live, ``"memory"`` or ``"disk"`` (a temporary
            folder, removed after the run; RAM then holds one fp32 copy of the compared weights).
        geometry_dtype: ``"float32"`` (exact) or ``"float16"`` (per-tensor scaled, half the bytes).
    """

    geometry: bool = True
    drift: bool = True
    layers: list[str] = field(default_factory=list)
    probe_samples: int = 128
    pool: str = "mean"
    svcca: bool = False
    held_out_domains: list[str] = field(default_factory=list)
    held_out_samples: int = 200
    density: float = 0.2
    energy: float = 0.9
    geometry_include: str | None = None
    geometry_storage: str = "memory"
    geometry_dtype: str = "float32"

    def __post_init__(self) -> None:
        from ..analysis.step_store import DTYPES, STORAGES

        check_choice("geometry_storage", self.geometry_storage, STORAGES)
        check_choice("geometry_dtype", self.geometry_dtype, DTYPES)
        if self.geometry_include is not None:
            import re

            try:
                re.compile(self.geometry_include)
            except re.error as exc:
                raise ValueError(f"geometry_include must be a regular expression, got {self.geometry_include!r} "
                                 f"({exc})") from None
        if self.probe_samples < 4:
            raise ValueError(f"probe_samples must be >= 4, got {self.probe_samples}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.held_out_samples < 10 or self.held_out_samples % 10:
            raise ValueError(f"held_out_samples must be a positive multiple of 10, got {self.held_out_samples}")
        check_range("density", self.density, 0.0, 1.0, low_open=True)
        check_range("energy", self.energy, 0.0, 1.0, low_open=True)
        if len(set(self.held_out_domains)) != len(self.held_out_domains):
            raise ValueError(f"held_out_domains must be distinct, got {self.held_out_domains}")
        if self.held_out_domains:
            from ..benchmarks.transforms import DOMAINS

            for d in self.held_out_domains:
                DOMAINS.get(d)


def analysis_plugins(config: AnalysisConfig, benchmark: Any, held_out: dict | None, seed: int) -> list:
    """The plugin metrics for one run (geometry, drift, continual metrics with held-out tasks)."""
    from ..evaluation.continual import ContinualMetricsPluginMetric
    from ..evaluation.drift import RepresentationDriftPluginMetric
    from ..evaluation.parameter_geometry import ParameterGeometryPluginMetric

    plugins: list = [ContinualMetricsPluginMetric(held_out=held_out or None, held_out_samples=config.held_out_samples,
                                                  seed=seed)]
    if config.geometry:
        plugins.append(ParameterGeometryPluginMetric(density=config.density, energy=config.energy,
                                                     include=config.geometry_include,
                                                     storage=config.geometry_storage, dtype=config.geometry_dtype))
    if config.drift:
        plugins.append(RepresentationDriftPluginMetric(list(benchmark.test_stream), layers=config.layers or None,
                                                       probe_samples=config.probe_samples, seed=seed,
                                                       pool=config.pool, with_svcca=config.svcca))
    return plugins


def analysis_record(plugins: list) -> dict:
    """The JSON-ready ``analysis`` record of a finished run from its analysis plugin metrics."""
    from ..evaluation.continual import ContinualMetricsPluginMetric
    from ..evaluation.drift import RepresentationDriftPluginMetric
    from ..evaluation.parameter_geometry import ParameterGeometryPluginMetric

    out: dict = {}
    for p in plugins:
        if isinstance(p, ContinualMetricsPluginMetric):
            out["continual"] = p.result()
        elif isinstance(p, ParameterGeometryPluginMetric) and len(p.store):
            out["geometry"] = p.report()
            p.reset()  # frees the snapshot and removes a disk store
        elif isinstance(p, RepresentationDriftPluginMetric) and p.experiences:
            out["drift"] = p.report()
    return out


_STORAGE_DEFAULTS = {"geometry_include": None, "geometry_storage": "memory", "geometry_dtype": "float32"}


def describe_analysis(config: AnalysisConfig | None) -> dict | None:
    """The part of a run's config hash the analysis section contributes (None when absent). The geometry storage
    fields enter only when they differ from their defaults, so runs stored before they existed keep their
    identity (``float16`` and ``include`` change the numbers; ``disk`` does not, but is kept for simplicity)."""
    if config is None:
        return None
    out = dataclasses.asdict(config)
    for key, default in _STORAGE_DEFAULTS.items():
        if out[key] == default:
            del out[key]
    return out
