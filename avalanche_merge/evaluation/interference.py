"""Interference between tasks, measured on the loss, and the subspace overlap of LoRA updates, as Avalanche metrics.

``L[i, j]`` is the mean loss on (a fixed sample of) task ``j``'s data after training task ``i``. The
interference of task ``i`` on an earlier task ``j`` is

    I[i, j] = L[i, j] - L[j, j]        (j < i; nan elsewhere)

Sign convention: **positive = the loss on the earlier task went up** (harmful interference, forgetting);
negative = it went down (positive backward transfer). The summary :func:`final_interference` is the mean of the
last row, ``mean_{j<T-1} I[T-1, j]``: the loss analogue of GEM's backward transfer (Lopez-Paz & Ranzato, NeurIPS
2017) with the opposite sign. Interference as a loss increase caused by another task's update is the quantity
that gradient-projection methods bound (OGD, Farajtabar et al., AISTATS 2020; GPM, Saha et al., ICLR 2021;
InfLoRA, Liang & Li, CVPR 2024).

Layers, as in Avalanche's metrics: pure functions (:func:`task_losses`, :func:`interference_matrix`), a
standalone metric (:class:`Interference`), plugin metrics (:class:`InterferencePluginMetric`,
:class:`LoRAOverlapPluginMetric`) and helpers returning plugin lists (:func:`interference_metrics`,
:func:`lora_overlap_metrics`).

Which data: the plugin keeps a fixed seeded sample of up to ``max_samples`` patterns of each experience's
*training* dataset (evaluation transforms), drawn when the experience starts training, and evaluates the loss on
all samples kept so far after each training experience. So it is self-contained (no dependence on when or on
which stream ``strategy.eval`` runs) and measures the loss increase on data the model actually fitted, the
quantity the interference arguments are about; it is not a generalisation measure (use the eval stream's
accuracy matrix for that). Cost: ``(i + 1) * max_samples`` forward passes after training experience ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from avalanche.evaluation import Metric, PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import default_metric_name_template, generic_get_metric_name
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..analysis.subspace import (
    _check_side,
    _check_truncation,
    lora_snapshot,
    lora_update_since,
    overlap_matrix_from_bases,
    update_subspace,
)


# -- pure functions ----------------------------------------------------------------------------------------------
def interference_matrix(loss_history: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """``I[i, j] = L[i, j] - L[j, j]`` for ``j < i``, ``nan`` on and above the diagonal (``T x T``).

    Args:
        loss_history: ``L`` (``T x T``), ``L[i, j]`` the loss on task ``j`` after training task ``i``; entries
            above the diagonal are not used (may be ``nan``).
    """
    L = np.asarray(loss_history, dtype=float)
    if L.ndim != 2 or L.shape[0] == 0 or L.shape[0] != L.shape[1]:
        raise ValueError(f"loss history must be a non-empty square (T x T) matrix, got shape {L.shape}")
    out = np.full_like(L, np.nan)
    rows, cols = np.tril_indices(L.shape[0], k=-1)
    out[rows, cols] = L[rows, cols] - np.diag(L)[cols]
    return out


def final_interference(loss_history: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Mean interference of the last task on the earlier ones, ``mean_{j<T-1} I[T-1, j]`` (nan if ``T = 1``)."""
    interference = interference_matrix(loss_history)
    t = interference.shape[0]
    return math.nan if t == 1 else float(interference[t - 1, : t - 1].mean())


def _is_dataset(data: Any) -> bool:
    if isinstance(data, Dataset):
        return True
    return (not isinstance(data, (list, tuple, DataLoader)) and hasattr(data, "__getitem__")
            and hasattr(data, "__len__"))


def _default_forward(model: nn.Module, x: Any, *rest: Any) -> Any:
    if isinstance(x, Mapping):
        return model(**x)
    return model(x)


def _batches(data: Any, batch_size: int) -> Iterable:
    if _is_dataset(data):
        # a private generator: a DataLoader iterator otherwise draws its base seed from the global RNG, which
        # would shift the training shuffles after the metric runs and change the run it measures
        return DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                          collate_fn=getattr(data, "collate_fn", None))
    return data


def _to(x: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def task_losses(model: nn.Module, data: Sequence[Any], criterion: Callable | None = None, *,
                device: torch.device | str | None = None, batch_size: int = 256,
                forward: Callable[..., Any] | None = None) -> np.ndarray:
    """Mean per-sample loss of ``model`` on each task's data (one entry of ``data`` per task).

    Args:
        model: evaluated in ``eval()`` mode (its training mode is restored afterwards).
        data: per task, a dataset (``(x, y, ...)`` items; loaded in ``batch_size`` batches) or an iterable of
            ``(x, y, ...)`` batches (a ``DataLoader``, a list). ``x`` may be a dict of model keyword inputs.
        criterion: ``criterion(output, y)``; default cross-entropy. Any reduction: batch values are averaged and
            weighted by the batch size, as Avalanche's ``LossMetric`` does.
        device: where inputs are moved (default: left where they are).
        forward: ``forward(model, x, *rest) -> output`` (default ``model(x)``, ``model(**x)`` for dicts);
            outputs with a ``.logits`` attribute (Hugging Face) are unwrapped.

    Returns:
        A float64 array with one mean loss per task.
    """
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    forward = _default_forward if forward is None else forward
    was_training = model.training
    model.eval()
    losses = []
    try:
        for task, item in enumerate(data):
            total, count = 0.0, 0
            for batch in _batches(item, batch_size):
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise ValueError(f"task {task}: batches must be (x, y, ...) sequences, got {type(batch).__name__}")
                x, y, *rest = (_to(b, device) for b in batch)
                out = forward(model, x, *rest)
                out = getattr(out, "logits", out)
                n = len(y)
                total += float(torch.as_tensor(criterion(out, y)).double().mean()) * n
                count += n
            if count == 0:
                raise ValueError(f"task {task} has no samples")
            losses.append(total / count)
    finally:
        model.train(was_training)
    return np.asarray(losses, dtype=float)


# -- standalone metric -------------------------------------------------------------------------------------------
class Interference(Metric[dict[int, float]]):
    """Standalone interference metric: collects the rows of the loss matrix ``L``.

    ``update(losses)`` after training task ``i`` with the losses on tasks ``0..i`` (``i + 1`` values);
    ``result()`` is ``{j: I[i, j]}`` for the latest ``i`` and every ``j < i`` (empty before the second task).
    """

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []

    def update(self, losses: Sequence[float]) -> None:
        row = np.asarray(losses, dtype=float).reshape(-1)
        if row.size != len(self._rows) + 1:
            raise ValueError(f"after training task {len(self._rows)} expected {len(self._rows) + 1} losses "
                             f"(tasks 0..{len(self._rows)}), got {row.size}")
        self._rows.append(row)

    def loss_matrix(self) -> np.ndarray:
        """``L`` so far (``t x t``; ``nan`` above the diagonal)."""
        t = len(self._rows)
        L = np.full((t, t), np.nan)
        for i, row in enumerate(self._rows):
            L[i, : i + 1] = row
        return L

    def matrix(self) -> np.ndarray:
        """:func:`interference_matrix` of :meth:`loss_matrix`."""
        return interference_matrix(self.loss_matrix()) if self._rows else np.zeros((0, 0))

    def result(self) -> dict[int, float]:
        if len(self._rows) < 2:
            return {}
        last = self.matrix()[-1]
        return {j: float(last[j]) for j in range(len(self._rows) - 1)}

    def reset(self) -> None:
        self._rows = []


# -- plugin metrics ----------------------------------------------------------------------------------------------
def _name(metric: str, experience: int | None = None) -> str:
    return generic_get_metric_name(default_metric_name_template,
                                   {"metric_name": metric, "phase_name": "train", "stream_name": "train",
                                    "experience_id": experience, "task_label": None})


def _heldout(dataset: Any, max_samples: int, seed: int) -> Any:
    """A fixed seeded subset of up to ``max_samples`` items of ``dataset`` (evaluation transforms)."""
    dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
    n = len(dataset)
    if n <= max_samples:
        return dataset
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values.tolist()
    return dataset.subset(idx) if hasattr(dataset, "subset") else Subset(dataset, idx)


class InterferencePluginMetric(PluginMetric[dict[int, float]]):
    """After each training experience ``i``: interference ``I[i, j]`` on every earlier experience ``j``.

    Emits ``Interference/train_phase/train_stream/Exp{j:03}`` (``Exp`` names the earlier experience whose loss is
    measured) and their mean ``Interference_Mean/train_phase/train_stream``, from the second experience on. Needs
    each experience trained once, in order. The loss matrix is kept: :meth:`loss_matrix`, :meth:`matrix`.

    Args:
        max_samples: patterns kept per experience (fixed seeded sample of its training dataset), >= 1.
        seed: seed of the samples (experience ``k`` uses ``seed + k``).
        criterion: loss; default the strategy's criterion (``strategy._criterion``).
    """

    def __init__(self, max_samples: int = 256, *, seed: int = 0, criterion: Callable | None = None) -> None:
        super().__init__()
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
        self.max_samples = max_samples
        self.seed = seed
        self.criterion = criterion
        self._metric = Interference()
        self.samples: list[Any] = []
        self.experiences: list[int] = []

    def reset(self) -> None:
        self._metric.reset()
        self.samples, self.experiences = [], []

    def result(self) -> dict[int, float]:
        return self._metric.result()

    def loss_matrix(self) -> np.ndarray:
        return self._metric.loss_matrix()

    def matrix(self) -> np.ndarray:
        return self._metric.matrix()

    def before_training_exp(self, strategy: Any) -> MetricResult:
        exp = strategy.experience.current_experience
        if exp in self.experiences:
            raise ValueError(f"{self}: experience {exp} is trained a second time; the metric needs each experience "
                             f"trained once (call reset() to start over)")
        self.experiences.append(exp)
        self.samples.append(_heldout(strategy.experience.dataset, self.max_samples, self.seed + exp))
        return None

    def after_training_exp(self, strategy: Any) -> MetricResult:
        from avalanche.models.utils import avalanche_forward

        criterion = self.criterion or getattr(strategy, "_criterion", None)
        losses = task_losses(strategy.model, self.samples, criterion, device=strategy.device,
                             batch_size=getattr(strategy, "eval_mb_size", None) or 256,
                             forward=lambda model, x, *rest: avalanche_forward(model, x, rest[0] if rest else None))
        self._metric.update(losses)
        return self._package_result(strategy)

    def _package_result(self, strategy: Any) -> MetricResult:
        values = self.result()
        if not values:
            return None
        x = strategy.clock.train_iterations
        out = [MetricValue(self, _name(str(self), self.experiences[j]), v, x) for j, v in values.items()]
        out.append(MetricValue(self, _name(f"{self}_Mean"), float(np.mean(list(values.values()))), x))
        return out

    def __str__(self) -> str:
        return "Interference"


class LoRAOverlapPluginMetric(PluginMetric[np.ndarray]):
    """After each training experience: subspace overlap between the experiences' LoRA updates.

    The update of experience ``i`` is the change, during that experience, of the summed ``delta W`` of the active
    peft adapters (:func:`~avalanche_merge.analysis.subspace.lora_update_since`): the new adapter's ``delta W``
    for one-adapter-per-task learners (O-LoRA), the change of the shared adapter for plain sequential LoRA.
    Emits the ``T x T`` overlap matrix (a tensor, as Avalanche's accuracy matrix) as
    ``LoRA_Overlap/train_phase/train_stream`` and, from the second experience on, the mean overlap of the newest
    update with the earlier ones as ``LoRA_Overlap_New/train_phase/train_stream``. Models without LoRA layers
    emit nothing. Only the orthonormal bases of the updates are kept (``dim x rank`` per layer).

    Args:
        side: ``"input"`` (row spaces, the side O-LoRA / InfLoRA constrain) or ``"output"`` (column spaces).
        rank, energy: truncation of the bases, see :func:`~avalanche_merge.analysis.subspace.update_subspace`.
    """

    def __init__(self, side: str = "input", *, rank: int | None = None, energy: float | None = None) -> None:
        super().__init__()
        _check_side(side)
        _check_truncation(rank, energy)
        self.side, self.rank, self.energy = side, rank, energy
        self.bases: list[dict[str, torch.Tensor]] = []
        self.history: list[np.ndarray] = []
        self._snapshot: dict | None = None

    def reset(self) -> None:
        self.bases, self.history, self._snapshot = [], [], None

    def result(self) -> np.ndarray | None:
        return self.history[-1] if self.history else None

    def before_training_exp(self, strategy: Any) -> MetricResult:
        self._snapshot = lora_snapshot(strategy.model)
        return None

    def after_training_exp(self, strategy: Any) -> MetricResult:
        if self._snapshot is None:
            return None
        update = lora_update_since(strategy.model, self._snapshot)
        self._snapshot = None
        if not update:
            return None  # no LoRA layers
        self.bases.append({name: update_subspace(d, self.rank, self.energy, side=self.side, rtol=self._rtol(d))
                           for name, d in update.items()})
        matrix, _ = overlap_matrix_from_bases(self.bases)
        self.history.append(matrix)
        return self._package_result(strategy)

    def _rtol(self, delta: torch.Tensor) -> float:
        # the update is computed in float64 from float32 (or lower) factors: rank tolerance at the factors' eps
        return max(delta.shape) * torch.finfo(torch.float32).eps

    def _package_result(self, strategy: Any) -> MetricResult:
        matrix = self.history[-1]
        x = strategy.clock.train_iterations
        out = [MetricValue(self, _name(str(self)), torch.as_tensor(matrix), x)]
        if matrix.shape[0] > 1:
            with np.errstate(all="ignore"):
                new = float(np.nanmean(matrix[-1, :-1])) if np.isfinite(matrix[-1, :-1]).any() else math.nan
            out.append(MetricValue(self, _name(f"{self}_New"), new, x))
        return out

    def __str__(self) -> str:
        return "LoRA_Overlap"


def interference_metrics(*, max_samples: int = 256, seed: int = 0,
                         criterion: Callable | None = None) -> list[PluginMetric]:
    """Plugin metrics measuring loss interference (:class:`InterferencePluginMetric`), for ``EvaluationPlugin``."""
    return [InterferencePluginMetric(max_samples, seed=seed, criterion=criterion)]


def lora_overlap_metrics(*, side: str = "input", rank: int | None = None,
                         energy: float | None = None) -> list[PluginMetric]:
    """Plugin metrics recording the LoRA update subspace overlap (:class:`LoRAOverlapPluginMetric`)."""
    return [LoRAOverlapPluginMetric(side, rank=rank, energy=energy)]


__all__ = ["Interference", "InterferencePluginMetric", "LoRAOverlapPluginMetric", "final_interference",
           "interference_matrix", "interference_metrics", "lora_overlap_metrics", "task_losses"]
