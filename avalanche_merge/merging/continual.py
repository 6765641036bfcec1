"""Continual mergers: task vectors arrive one at a time; each merger keeps as little state as its method allows.

Every merger has ``update(task_vector) -> merged`` and ``merged`` (a :class:`TaskVector` that already includes the
method's scaling, so the merged model is ``pretrained + merged``). ``stored_task_vectors`` says how many
model-sized tensors sets the merger holds (1 for all online mergers; T for :class:`OfflineMerger`).

- :class:`ContinualTaskArithmetic`: ``scaling * sum_t tau_t`` (running sum).
- :class:`ContinualAverage`: ``mean_t tau_t`` (running mean: the weight average of the fine-tuned models).
- :class:`ContinualTIES`: the continual TIES baseline of Tang et al. (2025): TIES of (current merge, new task
  vector), added to the merge with a scaling factor.
- :class:`MagMax`: running maximum-magnitude selection (Marczak et al., "MagMax: Leveraging Model Merging for
  Seamless Continual Learning", ECCV 2024).
- :class:`ContinualEMA`: ``m_t = (1 - w) m_{t-1} + w tau_t``, the exponential moving average of the weights that
  FoMo-in-Flux (Roth et al., "A Practitioner's Guide to Continual Multimodal Pretraining", 2024) finds the best
  accumulation/retention trade-off when each task trains from the merged weights (``start="merged"``).
- :class:`OfflineMerger`: keeps every task vector and re-runs an offline merge (TIES, DARE, TSV-M, Iso-C, ...).
- :class:`~avalanche_merge.merging.opcm.OPCM` (in ``opcm.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config import check_range
from .offline import _ties_merge, _trimmer, magmax_update_
from .steps import check_density
from .task_vector import TaskVector, _check_same_keys


@dataclass(kw_only=True)
class ContinualMerger(ABC):
    """Base class: validates each incoming task vector against the first one and counts tasks."""

    num_tasks: int = field(default=0, init=False)
    _shapes: dict[str, tuple[int, ...]] | None = field(default=None, init=False, repr=False)

    @property
    def stored_task_vectors(self) -> int:
        return 1

    @property
    @abstractmethod
    def merged(self) -> TaskVector:
        """The current merged task vector (scaling included)."""

    @abstractmethod
    def _add(self, task_vector: TaskVector) -> None: ...

    def update(self, task_vector: TaskVector) -> TaskVector:
        """Add one task vector and return the new merged task vector.

        Raises:
            TypeError: not a TaskVector.
            ValueError: its keys or shapes differ from the first task vector's.
        """
        if not isinstance(task_vector, TaskVector):
            raise TypeError(f"expected a TaskVector, got {type(task_vector).__name__}")
        shapes = {k: tuple(v.shape) for k, v in task_vector.items()}
        if self._shapes is None:
            self._shapes = shapes  # only the signature: holding the first task vector would double the state
        else:
            _check_same_keys(self._shapes, shapes, "first", "new")
            for name, shape in self._shapes.items():
                if shapes[name] != shape:
                    raise ValueError(f"parameter {name!r} has shape {shape} in the first task vector and "
                                     f"{shapes[name]} in the new one")
        self._add(task_vector)
        self.num_tasks += 1
        return self.merged

    def _require_tasks(self) -> None:
        if self.num_tasks == 0:
            raise RuntimeError(f"{type(self).__name__} has no task vector yet; call update() first")


@dataclass(kw_only=True)
class ContinualTaskArithmetic(ContinualMerger):
    """``scaling * sum_t tau_t`` (Ilharco et al., ICLR 2023), kept as one running sum.

    Args:
        scaling: lambda in (0, 10]; 0.3 is the value of Tang et al.'s continual baseline.
    """

    scaling: float = 0.3
    _sum: TaskVector | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range("scaling", self.scaling, 0.0, 10.0, low_open=True)

    def _add(self, task_vector: TaskVector) -> None:
        self._sum = task_vector * 1.0 if self._sum is None else self._sum + task_vector

    @property
    def merged(self) -> TaskVector:
        self._require_tasks()
        return self._sum * self.scaling


@dataclass(kw_only=True)
class ContinualAverage(ContinualMerger):
    """Running mean of the task vectors: the weight average of the fine-tuned models (model soup)."""

    _mean: TaskVector | None = field(default=None, init=False, repr=False)

    def _add(self, task_vector: TaskVector) -> None:
        n = self.num_tasks
        if self._mean is None:
            self._mean = task_vector * 1.0
        else:
            self._mean = self._mean + (task_vector - self._mean) * (1.0 / (n + 1))

    @property
    def merged(self) -> TaskVector:
        self._require_tasks()
        return self._mean


@dataclass(kw_only=True)
class ContinualTIES(ContinualMerger):
    """Continual TIES as in Tang et al. (2025, arXiv 2501.09522, FusionBench's baseline):
    ``m_1 = s tau_1``; ``m_t = m_{t-1} + s * TIES([m_{t-1}, tau_t])`` with model-wide trimming and a disjoint sum.

    Args:
        density: fraction kept by the trim, in (0, 1] (0.2 = the paper's top-20%).
        scaling: s in (0, 10] (0.5 in the paper's baseline).
        sign_method: ``"total"`` or ``"frequency"``.
        trim_scope: ``"model"`` (the baseline's) or ``"tensor"``.
        merge_func: ``"sum"`` (the baseline's) or ``"mean"``.
    """

    density: float = 0.2
    scaling: float = 0.5
    sign_method: str = "total"
    trim_scope: str = "model"
    merge_func: str = "sum"
    _merged: TaskVector | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_density(self.density)
        check_range("scaling", self.scaling, 0.0, 10.0, low_open=True)
        for name, value, valid in (("sign_method", self.sign_method, ("total", "frequency")),
                                   ("trim_scope", self.trim_scope, ("tensor", "model")),
                                   ("merge_func", self.merge_func, ("mean", "sum"))):
            if value not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")

    def _add(self, task_vector: TaskVector) -> None:
        if self._merged is None:
            self._merged = task_vector * self.scaling
            return
        pair = [self._merged, task_vector]
        step = _ties_merge(pair, [1.0, 1.0], self.sign_method, self.merge_func,
                           _trimmer(pair, self.density, self.trim_scope))
        self._merged = self._merged + step * self.scaling

    @property
    def merged(self) -> TaskVector:
        self._require_tasks()
        return self._merged


@dataclass(kw_only=True)
class MagMax(ContinualMerger):
    """Running MagMax: per entry, the task-vector value of largest magnitude seen so far, times ``scaling``.

    With task vectors from sequential fine-tuning (each experience starts from the previous fine-tuned weights)
    this is the MagMax method of Marczak et al. (ECCV 2024); with independent fine-tuning it is the offline
    :func:`~avalanche_merge.merging.magmax` computed online.

    Args:
        scaling: lambda in (0, 10] (the paper uses 0.5).
    """

    scaling: float = 0.5
    _max: TaskVector | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range("scaling", self.scaling, 0.0, 10.0, low_open=True)

    def _add(self, task_vector: TaskVector) -> None:
        if self._max is None:
            self._max = task_vector * 1.0
        else:
            for k, v in self._max.items():
                magmax_update_(v, task_vector[k])

    @property
    def merged(self) -> TaskVector:
        self._require_tasks()
        return self._max * self.scaling


@dataclass(kw_only=True)
class ContinualEMA(ContinualMerger):
    """Exponential moving average of the weights, in task-vector form: ``m_t = (1 - w) m_{t-1} + w tau_t``,
    ``m_0 = 0`` (the pretrained model), so ``m_1 = w tau_1``.

    With each task fine-tuned from ``theta_0 + m_{t-1}`` (``MergePlugin(start="merged")``) this is the continual
    EMA merge of FoMo-in-Flux (Roth et al. 2024): the new weights are interpolated with the running merge, whose
    old tasks decay geometrically by ``(1 - w)`` per task.

    Args:
        weight: w in (0, 1], the weight of the newly fine-tuned model (0.5: plain interpolation).
    """

    weight: float = 0.5
    _ema: TaskVector | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range("weight", self.weight, 0.0, 1.0, low_open=True)

    def _add(self, task_vector: TaskVector) -> None:
        step = task_vector * self.weight
        self._ema = step if self._ema is None else self._ema * (1.0 - self.weight) + step

    @property
    def merged(self) -> TaskVector:
        self._require_tasks()
        return self._ema


@dataclass(kw_only=True)
class OfflineMerger(ContinualMerger):
    """Keeps every task vector and re-runs an offline merge over all of them after each update.

    Args:
        merge: an offline merge, ``merge(task_vectors, **options) -> TaskVector`` (e.g. ``ties``, ``tsv``).
        options: keyword options of ``merge``.
        scaling: multiplies the merged task vector, in (0, 10].
    """

    merge: Callable[..., TaskVector]
    options: dict = field(default_factory=dict)
    scaling: float = 1.0
    _all: list[TaskVector] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.merge):
            raise TypeError(f"merge must be callable, got {type(self.merge).__name__}")
        check_range("scaling", self.scaling, 0.0, 10.0, low_open=True)

    @property
    def stored_task_vectors(self) -> int:
        return len(self._all)

    def _add(self, task_vector: TaskVector) -> None:
        self._all.append(task_vector)

    @property
    def merged(self) -> TaskVector:
        self._require_tasks()
        return self.merge(self._all, **self.options) * self.scaling


def merge_sequentially(merger: ContinualMerger, task_vectors: Sequence[TaskVector]) -> list[TaskVector]:
    """Feed task vectors to ``merger`` in order; returns the merged task vector after every step."""
    return [merger.update(tv) for tv in task_vectors]
