"""Sparse fine-tuning metrics: updated fraction, mask overlap between tasks, estimated training FLOPs saved.

Layers, as in Avalanche's metrics: pure functions, a plugin metric (:class:`SparsityPluginMetric`) and a helper
returning the plugin list (:func:`sparsity_metrics`).

**Updated fraction.** Two sources:

- from a sparse learner's masks (:func:`mask_densities`): per finished task, the fraction of the selectable
  weights its mask let it update (``SparseLearner.history``);
- model-agnostic, from weight snapshots (:func:`weight_snapshot` before an experience, :func:`updated_fraction`
  after it): the fraction of parameter entries whose value changed (exact comparison) during the experience.
  It works for any method (dense fine-tuning gives ~1, frozen parameters 0). Under a masked learner the changed
  entries are a subset of the mask (entries outside it are restored bit for bit), so the snapshot fraction over
  the selectable weights is at most the mask density.

**Mask overlap** (:func:`jaccard_matrix`): ``J[i, j] = |M_i & M_j| / |M_i | M_j|`` over the tasks' masks (all
selectable tensors pooled); 1 on the diagonal for non-empty masks, 0 off it under ownership.

**Estimated training FLOPs saved** (:func:`flops_saving`). For an ``nn.Linear`` layer ``l`` with weight
``W (out x in)`` applied to ``N_l`` rows per training step (batch size x tokens), one dense training step costs

    forward  Y  = X W^T    2 N in out
    input    dX = dY W     2 N in out
    weight   dW = dY^T X   2 N in out        total ~ 6 N in out  (multiply-adds counted as 2 FLOPs)

With a weight mask of density ``d_l`` only ``d_l * in * out`` entries of ``dW`` are needed; a kernel computing
only those could skip ``saved_l = (1 - d_l) * 2 * N_l * in_l * out_l`` FLOPs. The reported fraction is

    fraction = sum_l saved_l / sum_l 6 N_l in_l out_l          (at most 1/3)

over the model's linear layers. Layers without a mask (e.g. the head, trained densely) count with ``d = 1``.
Not counted: biases, norms, attention score/value matmuls, convolutions, the optimizer step; the input gradient
is kept in full (it is needed by earlier layers). ``N_l`` is measured by forward hooks on a real training
mini-batch (the head of a ViT sees one row per sample, the blocks one per token); without it every layer gets
``N = 1``. This is the saving sparsity *permits*: the learners here compute dense gradients and mask them, so no
wall-clock time is saved (``experiments/sparse_speed.py`` measures the actual overhead).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import default_metric_name_template, generic_get_metric_name
from torch import nn

from ..sparse.masks import density_of, mask_overlap


# -- updated fraction ---------------------------------------------------------------------------------------------
def weight_snapshot(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``model``'s floating-point parameters (only ``names`` if given)."""
    keep = None if names is None else set(names)
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if p.is_floating_point() and (keep is None or n in keep)}


def changed_masks(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                  names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks of the entries whose value differs between two snapshots (or a snapshot and a model's
    ``named_parameters()`` dict), over the names in both (restricted to ``names`` if given)."""
    common = set(before) & set(after)
    if names is not None:
        common &= set(names)
    out = {}
    for n in sorted(common):
        a, b = before[n].detach(), after[n].detach()
        if a.shape != b.shape:
            raise ValueError(f"{n}: shape changed from {tuple(a.shape)} to {tuple(b.shape)}")
        out[n] = a.cpu() != b.cpu()
    return out


def updated_fraction(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                     names: Iterable[str] | None = None) -> float:
    """Fraction of parameter entries that changed between ``before`` and ``after`` (0 if nothing is compared)."""
    return density_of(changed_masks(before, after, names))


def mask_densities(history: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """Per task, the fraction of selectable weights its mask let it update (``SparseLearner.history``)."""
    return [density_of(m) for m in history]


def jaccard_matrix(history: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """``T x T`` Jaccard overlap ``|M_i & M_j| / |M_i | M_j|`` of the tasks' masks (0 where both are empty)."""
    return np.array([[mask_overlap(a, b) for b in history] for a in history], dtype=float).reshape(
        len(history), len(history))


# -- FLOPs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearShape:
    """A linear layer's weight-parameter shape and the rows it processes per training step."""

    rows: int
    in_features: int
    out_features: int

    @property
    def dense_flops(self) -> int:
        """FLOPs of one dense training step of the layer: forward, input gradient, weight gradient."""
        return 6 * self.rows * self.in_features * self.out_features


def linear_layers(model: nn.Module, rows: Mapping[str, int] | None = None) -> dict[str, LinearShape]:
    """The ``nn.Linear`` layers of ``model``, keyed by the name of their weight parameter (as the learners' masks).

    Args:
        rows: rows per step of each layer (from :func:`record_linear_rows`), keyed like the result; layers
            missing from it never ran a forward pass and are left out. ``None``: every layer gets 1 row.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = f"{name}.weight" if name else "weight"
            if rows is None:
                out[key] = LinearShape(1, module.in_features, module.out_features)
            elif key in rows:
                out[key] = LinearShape(int(rows[key]), module.in_features, module.out_features)
    return out


@contextmanager
def record_linear_rows(model: nn.Module):
    """Record, per ``nn.Linear`` layer (weight-parameter name), the rows of its first forward call in the block.

    Yields the dict being filled; the hooks are removed on exit.
    """
    rows: dict[str, int] = {}
    handles = []

    def hook_for(key: str, in_features: int):
        def hook(module, args):
            if key not in rows and args and torch.is_tensor(args[0]):
                rows[key] = args[0].numel() // in_features
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook_for(f"{name}.weight" if name else "weight",
                                                                     module.in_features)))
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def flops_saving(layers: Mapping[str, LinearShape], densities: Mapping[str, float]) -> dict[str, float]:
    """Estimated training FLOPs a weight-gradient-sparse kernel could skip (see the module docstring).

    Args:
        layers: the linear layers (:func:`linear_layers`).
        densities: weight-mask density per layer (same keys); layers missing from it are dense (``d = 1``).

    Returns:
        ``saved_flops`` and ``dense_flops`` per training step and their ratio ``fraction`` (0 without layers).
    """
    saved = dense = 0
    for key, shape in layers.items():
        d = float(densities.get(key, 1.0))
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density of {key} must be in [0, 1], got {d}")
        saved += (1.0 - d) * 2 * shape.rows * shape.in_features * shape.out_features
        dense += shape.dense_flops
    return {"saved_flops": float(saved), "dense_flops": float(dense), "fraction": saved / dense if dense else 0.0}


def learner_flops_saving(learner: Any, layers: Mapping[str, LinearShape],
                         masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """:func:`flops_saving` with densities from a sparse learner's masks (default: its current task's)."""
    masks = learner.masks if masks is None else masks
    return flops_saving(layers, {k: density_of({k: m}) for k, m in masks.items() if k in layers})


# -- plugin metric -----------------------------------------------------------------------------------------------
def find_sparse_learner(strategy: Any):
    """The learner of the strategy's ``SparsePlugin`` (None without one, or before it is built)."""
    from ..plugins.sparse import SparsePlugin

    for plugin in getattr(strategy, "plugins", []):
        if isinstance(plugin, SparsePlugin):
            return plugin.learner
    return None


def _name(metric: str, experience: int | None = None) -> str:
    return generic_get_metric_name(default_metric_name_template,
                                   {"metric_name": metric, "phase_name": "train", "stream_name": "train",
                                    "experience_id": experience, "task_label": None})


class SparsityPluginMetric(PluginMetric[dict[int, dict[str, float]]]):
    """After each training experience: how much of the model it changed and, under a ``SparsePlugin``, the mask
    statistics and the estimated FLOPs saving.

    Emits, for experience ``e`` (``/train_phase/train_stream/Exp{e:03}``):

    - ``Sparsity_UpdatedFraction``: fraction of all floating-point parameter entries that changed during the
      experience (weight snapshot taken when it starts; costs one CPU copy of the parameters);

    and, when the strategy has a ``SparsePlugin``:

    - ``Sparsity_UpdatedFraction_Selectable``: the same over the learner's selectable weights (<= the density);
    - ``Sparsity_MaskDensity``: the experience's mask density over the selectable weights;
    - ``Sparsity_FLOPsSaved``: estimated fraction of the training step's linear-layer FLOPs a
      weight-gradient-sparse kernel could skip (module docstring), rows per layer measured on the experience's
      first training mini-batch;
    - ``Sparsity_MaskOverlap`` (no ``Exp``): the Jaccard matrix of the masks so far, as a tensor.

    :meth:`result` returns every experience's values by experience id.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[int, dict[str, float]] = {}
        self.overlap: np.ndarray | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._rows_ctx = None
        self._rows: dict[str, int] | None = None

    def reset(self) -> None:
        self._stop_rows()
        self.records, self.overlap, self._snapshot = {}, None, None

    def result(self) -> dict[int, dict[str, float]]:
        return {e: dict(r) for e, r in self.records.items()}

    def before_training_exp(self, strategy: Any) -> MetricResult:
        self._snapshot = weight_snapshot(strategy.model)
        self._stop_rows()
        self._rows_ctx = record_linear_rows(strategy.model)
        self._rows = self._rows_ctx.__enter__()
        return None

    def _stop_rows(self) -> None:
        if self._rows_ctx is not None:
            self._rows_ctx.__exit__(None, None, None)
            self._rows_ctx = None

    def after_training_exp(self, strategy: Any) -> MetricResult:
        self._stop_rows()
        if self._snapshot is None:
            return None
        exp = strategy.experience.current_experience
        params = dict(strategy.model.named_parameters())
        record = {"updated_fraction": updated_fraction(self._snapshot, params)}
        learner = find_sparse_learner(strategy)
        if learner is not None and learner.task >= 0:
            masks = learner.history[-1] if len(learner.history) == learner.task + 1 else learner.masks
            record["selectable_updated_fraction"] = updated_fraction(self._snapshot, params, learner.params)
            record["mask_density"] = density_of(masks)
            layers = linear_layers(strategy.model, self._rows or None)
            record["flops_saved_fraction"] = learner_flops_saving(learner, layers, masks)["fraction"]
            history = list(learner.history)
            if len(history) < learner.task + 1:
                history.append({k: m.detach().cpu() for k, m in masks.items()})
            self.overlap = jaccard_matrix(history)
        self._snapshot = None
        self.records[exp] = record
        return self._package_result(strategy, exp, record)

    _NAMES = {"updated_fraction": "Sparsity_UpdatedFraction",
              "selectable_updated_fraction": "Sparsity_UpdatedFraction_Selectable",
              "mask_density": "Sparsity_MaskDensity", "flops_saved_fraction": "Sparsity_FLOPsSaved"}

    def _package_result(self, strategy: Any, exp: int, record: dict[str, float]) -> MetricResult:
        x = strategy.clock.train_iterations
        out = [MetricValue(self, _name(self._NAMES[k], exp), v, x) for k, v in record.items()]
        if "mask_density" in record and self.overlap is not None:
            out.append(MetricValue(self, _name("Sparsity_MaskOverlap"), torch.as_tensor(self.overlap), x))
        return out

    def __str__(self) -> str:
        return "Sparsity"


def sparsity_metrics() -> list[PluginMetric]:
    """Plugin metrics recording updated fraction, mask overlap and FLOPs saving (:class:`SparsityPluginMetric`)."""
    return [SparsityPluginMetric()]


__all__ = ["LinearShape", "SparsityPluginMetric", "changed_masks", "find_sparse_learner", "flops_saving",
           "jaccard_matrix", "learner_flops_saving", "linear_layers", "mask_densities", "record_linear_rows",
           "sparsity_metrics", "updated_fraction", "weight_snapshot"]
