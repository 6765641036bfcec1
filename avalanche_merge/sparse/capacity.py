"""Ownership capacity: how much of its requested update budget each task actually gets (pure torch).

With ownership (PackNet's idea, Mallya & Lazebnik, CVPR 2018), a task may only take weights that no earlier task
took. The budget is finite: at density ``d`` about ``1 / d`` tasks get their full share of the selectable weights,
the next one gets what is left and every later one gets nothing. Per layer it runs out sooner where the allocation
asks for a larger fraction: ERK gives small layers a density far above ``d``, so they are used up first, and the
later tasks' budget moves to the large layers.

Policy for long streams (documented in ``docs/fidelity.md``): nothing is rescaled behind the user's back. Each
task's allocation is recorded (:func:`task_capacity`, a :class:`TaskCapacity` per task) and checked
(:func:`check_capacity`): a task that gets less than ``min_fraction`` of its request triggers a
:class:`CapacityWarning` (``on_exhausted="warn"``, the default), a :class:`CapacityExhaustedError`
(``"error"``) or nothing (``"ignore"``). When the stream's length is known before the first task,
:func:`ownership_forecast` warns up front. For a stream of ``T`` tasks, choose ``density <= 1 / T`` or turn
ownership off (tasks then share weights and earlier tasks are no longer protected).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..config import check_choice, check_range

EXHAUSTED_POLICIES = ("warn", "error", "ignore")


class CapacityWarning(UserWarning):
    """A task got less than ``min_fraction`` of its requested update budget (or is forecast to)."""


class CapacityExhaustedError(RuntimeError):
    """``on_exhausted="error"``: a task got less than ``min_fraction`` of its requested update budget."""


def check_capacity_options(on_exhausted: str, min_fraction: float) -> None:
    """Raise ``ValueError`` unless ``on_exhausted`` is a known policy and ``min_fraction`` is in [0, 1]."""
    check_choice("on_exhausted", on_exhausted, EXHAUSTED_POLICIES)
    check_range("min_fraction", min_fraction, 0.0, 1.0)


def _ratio(granted: int, requested: int) -> float:
    return granted / requested if requested else 1.0


@dataclass(frozen=True)
class LayerCapacity:
    """One tensor's share of a task: ``numel`` entries, ``free`` of them not owned before the task,
    ``requested`` by the allocation on a model where nothing is owned (``None`` when the allocation is global,
    not per tensor) and ``granted`` (in the task's mask)."""

    numel: int
    free: int
    requested: int | None
    granted: int

    @property
    def fraction(self) -> float | None:
        """``granted / requested`` (1 when nothing was requested; ``None`` without a per-tensor request)."""
        return None if self.requested is None else _ratio(self.granted, self.requested)


@dataclass(frozen=True)
class TaskCapacity:
    """What task ``task`` asked for and got, in total and per tensor (see :func:`task_capacity`)."""

    task: int
    density: float
    numel: int
    free: int
    requested: int
    granted: int
    layers: dict[str, LayerCapacity]

    @property
    def fraction(self) -> float:
        """``granted / requested``: the fraction of its requested budget the task got (1 if it requested 0)."""
        return _ratio(self.granted, self.requested)

    @property
    def granted_density(self) -> float:
        """``granted / numel``: the fraction of the selectable weights the task may update."""
        return self.granted / self.numel if self.numel else 0.0

    def short_layers(self, min_fraction: float) -> list[str]:
        """Tensors that got less than ``min_fraction`` of their own request, in order."""
        return [n for n, layer in self.layers.items() if layer.fraction is not None and layer.fraction < min_fraction]

    def as_dict(self) -> dict:
        """JSON-ready record (with ``fraction`` and ``granted_density``; per layer with ``fraction``)."""
        out = asdict(self)
        out["fraction"] = self.fraction
        out["granted_density"] = self.granted_density
        for name, layer in self.layers.items():
            out["layers"][name]["fraction"] = layer.fraction
        return out


def task_capacity(
    task: int,
    density: float,
    masks: Mapping[str, torch.Tensor],
    owned: Mapping[str, torch.Tensor] | None = None,
    requested: Mapping[str, int] | None = None,
) -> TaskCapacity:
    """The capacity record of one task.

    Args:
        task: the task's index.
        density: the requested density, in (0, 1].
        masks: the task's bool masks ``{name: mask}`` (the weights it may update).
        owned: bool masks of the weights owned *before* the task (``None``: nothing owned; names missing from it
            own nothing).
        requested: entries requested per tensor by the allocation when nothing is owned (e.g.
            ``round(density * numel)`` per tensor, or ERK's counts); ``None`` for a global allocation, whose total
            request is ``round(density * N)`` over all ``N`` entries.

    Returns:
        A :class:`TaskCapacity`: totals are the sums over tensors (the requested total is ``sum(requested)`` or
        ``round(density * N)``).

    Raises:
        ValueError: a mask that is not bool, an ``owned`` or ``requested`` entry for an unknown tensor, shapes
            that differ, or a negative request.
    """
    check_range("density", density, 0.0, 1.0, low_open=True)
    owned = owned or {}
    for label, names in (("owned", owned), ("requested", requested or {})):
        unknown = sorted(set(names) - set(masks))
        if unknown:
            raise ValueError(f"{label} names tensors without a mask: {unknown[:4]}")
    layers = {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ValueError(f"mask of {name!r} must be bool, got {mask.dtype}")
        taken = 0
        if name in owned:
            if owned[name].shape != mask.shape:
                raise ValueError(
                    f"owned mask of {name!r} has shape {tuple(owned[name].shape)}, mask {tuple(mask.shape)}"
                )
            taken = int(owned[name].sum())
        want = None
        if requested is not None:
            want = int(requested.get(name, 0))
            if want < 0:
                raise ValueError(f"requested count of {name!r} must be >= 0, got {want}")
        layers[name] = LayerCapacity(
            numel=mask.numel(), free=mask.numel() - taken, requested=want, granted=int(mask.sum())
        )
    numel = sum(layer.numel for layer in layers.values())
    total = sum(layer.requested for layer in layers.values()) if requested is not None else round(density * numel)
    return TaskCapacity(
        task=task,
        density=float(density),
        numel=numel,
        free=sum(layer.free for layer in layers.values()),
        requested=total,
        granted=sum(layer.granted for layer in layers.values()),
        layers=layers,
    )


def capacity_message(record: TaskCapacity, min_fraction: float, *, max_layers: int = 4) -> str:
    """A one-paragraph description of a task's shortfall (used by :func:`check_capacity`)."""
    short = record.short_layers(min_fraction)
    listed = ", ".join(f"{n} ({record.layers[n].granted}/{record.layers[n].requested})" for n in short[:max_layers])
    more = f" and {len(short) - max_layers} more" if len(short) > max_layers else ""
    layers = f"; tensors below it: {listed}{more}" if short else ""
    return (
        f"task {record.task} got {record.fraction:.1%} of its requested update budget ({record.granted} of "
        f"{record.requested} weights, {record.granted_density:.2%} of the selectable weights at density "
        f"{record.density}), below min_fraction={min_fraction}{layers}. Under ownership earlier tasks own the "
        f"rest ({record.free} of {record.numel} weights were free); for a stream of T tasks use density <= 1/T, "
        f"ownership=False, or on_exhausted='ignore'"
    )


def check_capacity(record: TaskCapacity, *, min_fraction: float, on_exhausted: str = "warn") -> bool:
    """Apply the ``on_exhausted`` policy to ``record``; returns whether the task got less than ``min_fraction``.

    Raises:
        CapacityExhaustedError: ``on_exhausted="error"`` and ``record.fraction < min_fraction``.
        ValueError: a bad policy or threshold.
    """
    check_capacity_options(on_exhausted, min_fraction)
    short = record.fraction < min_fraction
    if short and on_exhausted == "error":
        raise CapacityExhaustedError(capacity_message(record, min_fraction))
    if short and on_exhausted == "warn":
        warnings.warn(capacity_message(record, min_fraction), CapacityWarning, stacklevel=3)
    return short


def ownership_forecast(density: float, n_tasks: int) -> list[float]:
    """Fraction of its request each of ``n_tasks`` tasks gets when every task asks for ``density`` of one shared
    pool and owns what it takes: ``clip((1 - t * density) / density, 0, 1)`` for task ``t`` (0-based).

    Exact for a single global pool up to rounding; per-tensor allocations round per tensor and ERK caps small
    tensors, so the real fractions (:func:`task_capacity`) can differ slightly.
    """
    check_range("density", density, 0.0, 1.0, low_open=True)
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
    return [min(1.0, max(0.0, (1.0 - t * density) / density)) for t in range(n_tasks)]


def full_tasks(density: float) -> int:
    """How many tasks get their full request from one pool under ownership: ``floor(1 / density)``
    (up to float rounding, e.g. 10 at density 0.1)."""
    check_range("density", density, 0.0, 1.0, low_open=True)
    return math.floor(1.0 / density + 1e-9)
