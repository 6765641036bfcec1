"""Name registries of merges: offline merges (a list of task vectors in, one out) and continual mergers.

``make_merger(name, **options)`` builds a :class:`~avalanche_merge.merging.continual.ContinualMerger` from either
kind: a continual merger class directly, an offline merge wrapped in an
:class:`~avalanche_merge.merging.continual.OfflineMerger` that re-merges all task vectors seen so far.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..registry import Registry
from .continual import (
    ContinualAverage,
    ContinualEMA,
    ContinualMerger,
    ContinualTaskArithmetic,
    ContinualTIES,
    MagMax,
    OfflineMerger,
)
from .offline import average, breadcrumbs, dare, magmax, task_arithmetic, ties
from .opcm import OPCM
from .spectral import iso_c, iso_cts, tsv
from .task_vector import TaskVector

OFFLINE_MERGES: Registry[Callable[..., TaskVector]] = Registry("offline merge")
for _fn in (task_arithmetic, average, ties, dare, breadcrumbs, magmax, tsv, iso_c, iso_cts):
    OFFLINE_MERGES.add(_fn.__name__, _fn)

CONTINUAL_MERGERS: Registry[type[ContinualMerger]] = Registry("continual merger")
for _name, _cls in (("continual_task_arithmetic", ContinualTaskArithmetic), ("continual_average", ContinualAverage),
                    ("continual_ties", ContinualTIES), ("magmax_running", MagMax), ("opcm", OPCM),
                    ("continual_ema", ContinualEMA)):
    CONTINUAL_MERGERS.add(_name, _cls)


#: The CLI's merging method names (``avalanche-merge bench --methods``) as merger names, with the same meaning:
#: each is exactly the named merger at its defaults (``magmax``: the running max-magnitude merge, scaling 0.5, which
#: equals the offline ``magmax`` merge of all task vectors so far scaled by 0.5). ``MergePlugin`` also takes each
#: method's starting point from :data:`DEFAULT_STARTS` (MagMax fine-tunes sequentially).
ALIASES = {"continual_ta": "continual_task_arithmetic", "continual_avg": "continual_average",
           "magmax": "magmax_running", "tsv_merge": "tsv", "iso_cts_merge": "iso_cts"}
DEFAULT_STARTS = {"magmax_running": "previous"}


class UnknownOptionError(ValueError, TypeError):
    """An option a merger does not take (a ``ValueError`` that is also a ``TypeError``, as an unexpected keyword)."""


def _check_continual_options(name: str, cls: type, options: dict) -> None:
    params = inspect.signature(cls).parameters
    valid = sorted(k for k, p in params.items() if p.kind == p.KEYWORD_ONLY)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise UnknownOptionError(f"continual merger {name!r} got an unexpected option {unknown[0]!r}; valid "
                                 f"options: {valid}")


def resolve_merger_name(name: str) -> str:
    """The registry name behind ``name`` (a CLI method alias such as ``continual_ta`` becomes its merger)."""
    return ALIASES.get(name, name)


def _check_offline_options(name: str, merge: Callable[..., TaskVector], options: dict) -> None:
    """Fail at construction, not after a whole experience of training: unknown option names raise TypeError,
    bad values raise the merge's own error (checked by merging two tiny task vectors)."""
    params = inspect.signature(merge).parameters
    unknown = sorted(k for k in options if k not in params or k == "task_vectors")
    if unknown:
        valid = sorted(k for k in params if k != "task_vectors")
        raise UnknownOptionError(f"offline merge {name!r} got an unexpected option {unknown[0]!r}; valid options: "
                                 f"{[*valid, 'scaling']}")
    probe = TaskVector({"w": torch.ones(2, 2)})
    merge([probe, probe * -0.5], **options)


def list_mergers() -> list[str]:
    """Every name ``make_merger`` accepts: continual mergers, then offline merges, then the CLI method aliases."""
    return CONTINUAL_MERGERS.names() + OFFLINE_MERGES.names() + sorted(set(ALIASES) - set(OFFLINE_MERGES.names()))


def make_merger(name: str, **options) -> ContinualMerger:
    """Build a continual merger by name.

    Args:
        name: a continual merger (``opcm``, ``continual_task_arithmetic``, ...), an offline merge (``ties``,
            ``tsv``, ...; re-run over every task vector so far) or a CLI merging method name (:data:`ALIASES`:
            ``continual_ta``, ``magmax``, ...: the same merger as the CLI method).
        options: the merger's keyword options; offline merges also take ``scaling`` (default 1).

    Raises:
        ValueError: unknown name (lists the valid ones) or invalid options; an option the merger does not take
            raises :class:`UnknownOptionError` (also a ``TypeError``) listing the valid options.
    """
    name = resolve_merger_name(name)
    if name in CONTINUAL_MERGERS:
        cls = CONTINUAL_MERGERS.get(name)
        _check_continual_options(name, cls, options)
        return cls(**options)
    if name in OFFLINE_MERGES:
        opts = dict(options)
        scaling = opts.pop("scaling", 1.0)
        merge = OFFLINE_MERGES.get(name)
        _check_offline_options(name, merge, opts)
        return OfflineMerger(merge=merge, options=opts, scaling=scaling)
    raise ValueError(f"unknown merger {name!r}; valid mergers: {', '.join(list_mergers())}")
