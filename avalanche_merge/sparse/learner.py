"""``SparseLearner``: the protocol of the sparse fine-tuning methods, and ``MaskedFineTuner`` (one mask per task).

A sparse learner is driven by six calls, from the Avalanche plugin (:mod:`avalanche_merge.plugins.sparse`) or
from your own loop; no Avalanche import here:

1. ``params = learner.begin_task(batches)``: choose the task's mask(s) from ``batches`` (``(x, y)`` mini-batches
   of the new task) and return the parameters to optimise;
2. ``learner.after_backward()``: mask the gradients;
3. ``learner.before_step()`` / ``learner.after_step()`` around ``optimizer.step()``: entries outside the mask are
   restored bit for bit (Adam moments and weight decay cannot leak into them), dynamic masks are refreshed;
4. ``learner.end_task()``: the task's mask becomes owned (frozen for later tasks) and its statistics are recorded.

Optional: ``learner.set_stream_length(n)`` before the first task (a forecast of the ownership capacity, see
:mod:`.capacity`) and ``learner.set_task_steps(n)`` before each task (the optimizer steps it will run; schedules
given as a fraction of the task need it). Every ``begin_task`` records a :class:`~.capacity.TaskCapacity` in
``learner.capacity`` (what the task asked for and got, per tensor) and applies the ``on_exhausted`` policy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import check_range
from ..merging.heads import find_head
from .capacity import (
    CapacityWarning,
    TaskCapacity,
    check_capacity,
    check_capacity_options,
    full_tasks,
    ownership_forecast,
    task_capacity,
)
from .guard import MaskedUpdate
from .masks import (
    SCOPES,
    check_density,
    density_of,
    mask_overlap,
)

PARAMETER_SETS = ("linear", "weights", "all")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")  # open_clip's q, k, v


@dataclass(kw_only=True)
class SparseConfig:
    """Options shared by the sparse learners.

    Args:
        density: fraction of the selectable weights a task may update, in (0, 1].
        scope: ``"tensor"`` (density per parameter tensor) or ``"global"`` (over all selectable weights).
        parameters: ``"linear"`` (weights of ``nn.Linear`` layers), ``"weights"`` (weights of ``nn.Linear`` and
            ``nn.Conv1d/2d/3d`` layers and the q/k/v projection weights of ``nn.MultiheadAttention``: CNNs,
            open_clip) or ``"all"`` (every floating parameter) of the backbone; the head is handled by
            ``train_head``.
        ownership: weights selected by earlier tasks are frozen for later ones.
        train_head: the classification head trains densely (needed when it is fresh, class-incremental).
        head: module name of the head, or ``"auto"``.
        max_samples: inputs per task used to choose masks, >= 1.
        seed: seed of random choices (random masks, SET regrowth).
        lr: learning rate of the learner's parameters when driven by the Avalanche plugin, > 0; ``None`` keeps
            the strategy optimizer's rate (a sparse update moves the function slowly: a larger rate than dense
            fine-tuning is usual).
        on_exhausted: what to do when a task gets less than ``min_fraction`` of its requested update budget
            (ownership has used up the weights): ``"warn"`` (a :class:`~.capacity.CapacityWarning`, default),
            ``"error"`` (a :class:`~.capacity.CapacityExhaustedError` when the task starts) or ``"ignore"``.
            Each task's allocation is recorded either way (``learner.capacity``).
        min_fraction: the smallest acceptable fraction of its requested budget a task may get, in [0, 1]
            (default 0.5; 0 never triggers ``on_exhausted``).
    """

    density: float = 0.1
    scope: str = "tensor"
    parameters: str = "linear"
    ownership: bool = True
    train_head: bool = True
    head: str = "auto"
    max_samples: int = 512
    seed: int = 0
    lr: float | None = None
    on_exhausted: str = "warn"
    min_fraction: float = 0.5

    def __post_init__(self) -> None:
        check_density(self.density)
        check_capacity_options(self.on_exhausted, self.min_fraction)
        if self.lr is not None:
            check_range("lr", self.lr, 0.0, None, low_open=True)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {list(SCOPES)}, got {self.scope!r}")
        if self.parameters not in PARAMETER_SETS:
            raise ValueError(f"parameters must be one of {list(PARAMETER_SETS)}, got {self.parameters!r}")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1:
            raise ValueError(f"max_samples must be an int >= 1, got {self.max_samples!r}")


def selectable_parameters(model: nn.Module, parameters: str, head: str | None) -> dict[str, nn.Parameter]:
    """The parameters a sparse learner may mask: ``parameters`` is ``"linear"``, ``"weights"`` or ``"all"`` (see
    :class:`SparseConfig`); the head module ``head`` is left out. Also run at plan time on the meta skeleton.

    Raises:
        ValueError: nothing is selectable (with a hint to use ``"weights"`` when the model has convolutions).
    """
    kinds = {"linear": nn.Linear, "weights": (nn.Linear, *_CONV)}.get(parameters)
    out = {}
    for mod_name, module in model.named_modules():
        if head and (mod_name == head or mod_name.startswith(head + ".")):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            mha = parameters == "weights" and isinstance(module, nn.MultiheadAttention) and p_name in _MHA_WEIGHTS
            if kinds is not None and not mha and not (isinstance(module, kinds) and p_name == "weight"):
                continue
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    if not out:
        convs = any(isinstance(m, _CONV) for m in model.modules())
        hint = ("; it has convolutions: use parameters='weights' (nn.Linear and nn.Conv weights) or 'all'"
                if convs and parameters == "linear" else "")
        raise ValueError(f"no selectable parameters (parameters={parameters!r}) in {type(model).__name__} outside "
                         f"its head {head!r}{hint}")
    return out


class SparseLearner:
    """Base of the sparse learners: selectable parameters, the update guard, ownership and statistics.

    Args:
        model: the model (its weights are updated in place).
        config: a :class:`SparseConfig` (or the subclass's ``config_cls``).
    """

    name: ClassVar[str] = "sparse"
    config_cls: ClassVar[type] = SparseConfig

    def __init__(self, model: nn.Module, *, config: SparseConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        config = self.config_cls() if config is None else config
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.model, self.config = model, config
        self.head_name = find_head(model, config.head) if config.train_head else None
        self.params = selectable_parameters(model, config.parameters, self.head_name)
        self.owned = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, torch.Tensor]] = []  # each finished task's mask (bool, CPU)
        self.guard: MaskedUpdate | None = None
        self.capacity: list[TaskCapacity] = []  # one record per started task
        self.stream_length: int | None = None
        self.task_steps: int | None = None
        self.task = -1

    # -- protocol ------------------------------------------------------------------------------------------
    def begin_task(self, batches: Iterable | None = None) -> list[nn.Parameter]:
        self.task += 1
        frozen = self.owned if self.config.ownership else None
        self.masks = self.choose_masks(list(batches or []), frozen)
        record = task_capacity(self.task, self.config.density, self.masks, frozen, self.requested_counts())
        self.capacity.append(record)
        check_capacity(record, min_fraction=self.config.min_fraction, on_exhausted=self.config.on_exhausted)
        self.guard = MaskedUpdate(self.params, self.masks)
        self.model.requires_grad_(False)
        for name, p in self.params.items():
            p.requires_grad_(bool(self.masks[name].any()))
        if self.head_name:
            self.model.get_submodule(self.head_name).requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def after_backward(self) -> None:
        self.guard.mask_gradients()

    def before_step(self) -> None:
        self.guard.before_step()

    def after_step(self) -> None:
        self.guard.after_step()

    def end_task(self) -> None:
        if self.task < 0:
            raise RuntimeError("end_task called before begin_task")
        final = {n: m.detach().cpu().clone() for n, m in self.masks.items()}
        self.history.append(final)
        for n, m in final.items():
            self.owned[n] |= m.to(self.owned[n].device)

    def set_stream_length(self, n_tasks: int) -> None:
        """Tell the learner the stream has ``n_tasks`` tasks (before the first one): under ownership, warn now
        (unless ``on_exhausted="ignore"``) if :func:`~.capacity.ownership_forecast` says that some tasks will get
        less than ``min_fraction`` of their budget."""
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
        self.stream_length = n_tasks
        cfg = self.config
        if not cfg.ownership or cfg.on_exhausted == "ignore":
            return
        short = [t for t, f in enumerate(ownership_forecast(cfg.density, n_tasks)) if f < cfg.min_fraction]
        if short:
            warnings.warn(f"ownership at density {cfg.density}: about {full_tasks(cfg.density)} tasks get their full "
                          f"update budget, so tasks {short[0]}..{short[-1]} of this {n_tasks}-task stream are "
                          f"expected to get less than min_fraction={cfg.min_fraction} of it; use density <= "
                          f"{1 / n_tasks:.4g} or ownership=False", CapacityWarning, stacklevel=2)

    def set_task_steps(self, n_steps: int | None) -> None:
        """The optimizer steps the next task will run (``None``: unknown); used by schedules given as a fraction
        of the task (:class:`~.dst.DSTConfig`'s ``end_fraction``)."""
        if n_steps is not None and (isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1):
            raise ValueError(f"n_steps must be an int >= 1 or None, got {n_steps!r}")
        self.task_steps = n_steps

    # -- to override ---------------------------------------------------------------------------------------
    def requested_counts(self) -> dict[str, int] | None:
        """Entries each tensor's mask asks for when nothing is owned: ``round(density * numel)`` per tensor with
        ``scope="tensor"``; ``None`` with ``scope="global"`` (one request of ``round(density * N)``)."""
        if self.config.scope != "tensor":
            return None
        return {n: round(self.config.density * p.numel()) for n, p in self.params.items()}

    def choose_masks(self, batches: list, frozen: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- statistics ----------------------------------------------------------------------------------------
    def updated_fraction(self) -> list[float]:
        """Per finished task, the fraction of selectable weights its mask let it update."""
        return [density_of(m) for m in self.history]

    def capacity_record(self) -> list[dict]:
        """JSON-ready :class:`~.capacity.TaskCapacity` of every started task (requested and granted budget)."""
        return [r.as_dict() for r in self.capacity]

    def overlap_matrix(self) -> list[list[float]]:
        """Jaccard overlap of the finished tasks' masks (0 everywhere off the diagonal under ownership)."""
        return [[mask_overlap(a, b) for b in self.history] for a in self.history]
