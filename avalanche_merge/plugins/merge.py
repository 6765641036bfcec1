"""``MergePlugin``: continual model merging inside any Avalanche ``SupervisedTemplate`` strategy.

The plugin only moves weights between the model and a merger from :mod:`avalanche_merge.merging`; the merging
maths lives there.

Lifecycle:
1. before the first training experience it captures the pretrained weights ``theta_0``;
2. after each training experience it forms ``tau_e = theta_e - theta_0``, calls ``merger.update(tau_e)`` and
   writes ``theta_0 + merged`` into the model *in place* (the optimizer keeps pointing at the same tensors), so the
   strategy's evaluation sees the merged model;
3. before the next experience the model starts from ``start``: ``"pretrained"`` (independent fine-tuning, as
   OPCM and task arithmetic assume), ``"merged"`` (continue from the merge) or ``"previous"`` (the previous
   fine-tuned weights: sequential fine-tuning, as MagMax does).

Classification heads are kept out of the task vectors unless ``head_mode="merge"``:
- ``"class_rows"``: each class's output row comes from the experience that trained it (class-incremental;
  works with growing ``IncrementalClassifier`` heads);
- ``"last"``: the head stays as the last experience trained it (per-task ``MultiHeadClassifier`` heads: each
  task's head is only ever trained on its task);
- ``"merge"``: the head is merged like every other weight (domain-incremental: one shared label space);
- ``"auto"``: ``"last"`` for multi-head models, ``"class_rows"`` for a growing head (Avalanche's
  ``IncrementalClassifier``, even when the first experience fills its initial outputs) or when an experience covers
  fewer classes than the head has outputs, else ``"merge"``. The mode is fixed at the first experience; a merged
  parameter that changes shape later (a head that grows under ``"merge"``) raises a ``ValueError`` naming the
  parameter, the head and the mode before the experience trains.
Other plugins of the strategy that run after this one (e.g. EWC's, appended by ``EWC`` itself) see the merged
weights in ``after_training_exp``.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import DynamicModule

from ..merging import OPCM, ContinualMerger, TaskVector, linear_weight_names, make_merger
from ..merging.heads import ClassRows, find_head, head_keys
from ..merging.registry import DEFAULT_STARTS, resolve_merger_name

STARTS = ("pretrained", "merged", "previous")
HEAD_MODES = ("auto", "class_rows", "last", "merge")


class MergePlugin(SupervisedPlugin):
    """Merge each experience's task vector into a running merged model.

    Args:
        merger: a :class:`~avalanche_merge.merging.ContinualMerger` or a name for ``make_merger``: a CLI merging
            method (``opcm``, ``continual_ta``, ``continual_ties``, ``continual_avg``, ``magmax``, ``tsv_merge``,
            ``iso_cts_merge``: the same merger, defaults and start as ``avalanche-merge bench --methods``), a
            continual merger (``continual_task_arithmetic``, ``magmax_running``, ...) or an offline merge (``ties``,
            ``dare``, ...; ``avalanche_merge.merging.list_mergers()``).
        merger_options: options of a named merger (e.g. ``{"alpha": 0.5}``); an unknown one raises a
            ``ValueError`` listing the valid options.
        start: where the next experience starts: ``"pretrained"``, ``"merged"`` or ``"previous"``; default: the
            method's own (``"previous"`` for MagMax, else ``"pretrained"``).
        head: module name of the classification head, or ``"auto"`` (see ``merging.heads.find_head``).
        head_mode: ``"auto"``, ``"class_rows"``, ``"last"`` or ``"merge"`` (see module docstring).

    Raises:
        ValueError: unknown ``start``/``head_mode``/merger name, or invalid merger options.
        TypeError: ``merger`` is neither a name nor a ContinualMerger.
    """

    def __init__(self, *, merger: ContinualMerger | str = "opcm", merger_options: dict | None = None,
                 start: str | None = None, head: str = "auto", head_mode: str = "auto") -> None:
        super().__init__()
        if start is not None and start not in STARTS:
            raise ValueError(f"start must be one of {list(STARTS)}, got {start!r}")
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {list(HEAD_MODES)}, got {head_mode!r}")
        default_start = "pretrained"
        if isinstance(merger, str):
            default_start = DEFAULT_STARTS.get(resolve_merger_name(merger), "pretrained")
            merger = make_merger(merger, **(merger_options or {}))
        elif merger_options:
            raise ValueError("merger_options only applies when merger is given by name")
        if not isinstance(merger, ContinualMerger):
            raise TypeError(f"merger must be a ContinualMerger or a name, got {type(merger).__name__}")
        self.merger = merger
        self.start = start if start is not None else default_start
        self.head = head
        self.head_mode = head_mode
        self.pretrained: dict[str, torch.Tensor] | None = None
        self.previous: dict[str, torch.Tensor] | None = None
        self.class_rows = ClassRows()
        self._head_name: str | None = None
        self._mode: str | None = None

    # helpers -----------------------------------------------------------------------------------------------------
    def _resolve_mode(self, model: torch.nn.Module, classes: list[int]) -> str:
        """The head mode of this run, fixed at the first experience (a growing head is recognised there)."""
        head = model.get_submodule(self._head_name)
        grows = isinstance(head, DynamicModule) and not hasattr(head, "classifiers")
        if self.head_mode != "auto":
            if self.head_mode == "merge" and grows:
                raise ValueError(f"head_mode='merge' cannot merge the growing head {self._head_name!r} "
                                 f"({type(head).__name__}): its task vectors change shape when it grows; use "
                                 f"head_mode='class_rows' (or 'auto')")
            return self.head_mode
        if hasattr(head, "classifiers"):  # Avalanche MultiHeadClassifier
            return "last"
        if grows:  # Avalanche IncrementalClassifier: one output row per class seen, added as classes arrive
            return "class_rows"
        layer = head if isinstance(head, torch.nn.Linear) else getattr(head, "classifier", None)
        if isinstance(layer, torch.nn.Linear) and len(set(classes)) < layer.out_features:
            return "class_rows"
        return "merge"

    def _check_shapes(self, state: dict[str, torch.Tensor]) -> None:
        changed = [k for k in self.pretrained if tuple(state[k].shape) != tuple(self.pretrained[k].shape)]
        if changed:
            raise ValueError(f"MergePlugin (head {self._head_name!r}, head_mode resolved to {self._mode!r}): "
                             f"parameter {changed[0]!r} changed shape from {tuple(self.pretrained[changed[0]].shape)} "
                             f"to {tuple(state[changed[0]].shape)} since the first experience, so task vectors "
                             f"cannot be formed; a growing head needs head_mode='class_rows', per-task heads "
                             f"head_mode='last', or name the head with head=")

    def _merged_keys(self, state: dict[str, torch.Tensor]) -> list[str]:
        floats = [k for k, v in state.items() if v.is_floating_point()]
        if self._mode == "merge":
            return floats
        skip = set(head_keys(floats, self._head_name))
        return [k for k in floats if k not in skip]

    @staticmethod
    @torch.no_grad()
    def _write(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
        state = model.state_dict()
        for k, v in values.items():
            state[k].copy_(v)

    # hooks -------------------------------------------------------------------------------------------------------
    def before_training_exp(self, strategy: Any, *args, **kwargs) -> None:
        model = strategy.model
        if self.pretrained is None:
            self._head_name = find_head(model, self.head)
            self._mode = self._resolve_mode(model, list(strategy.experience.classes_in_this_experience))
            state = model.state_dict()
            self.pretrained = {k: state[k].detach().clone() for k in self._merged_keys(state)}
            if isinstance(self.merger, OPCM) and self.merger.linear is None:
                self.merger.linear = [k for k in linear_weight_names(model) if k in self.pretrained]
            return
        self._check_shapes(model.state_dict())
        if self.start == "pretrained":
            self._write(model, self.pretrained)
        elif self.start == "previous":
            self._write(model, self.previous)

    def after_training_exp(self, strategy: Any, *args, **kwargs) -> None:
        model = strategy.model
        state = model.state_dict()
        self._check_shapes(state)
        finetuned = {k: state[k] for k in self.pretrained}
        if self.start == "previous":
            self.previous = {k: v.detach().clone() for k, v in finetuned.items()}
        merged = self.merger.update(TaskVector.from_state_dicts(self.pretrained, finetuned))
        self._write(model, merged.apply_to(self.pretrained))
        if self._mode == "class_rows":
            head = model.get_submodule(self._head_name)
            self.class_rows.store(head, strategy.experience.classes_in_this_experience)
            self.class_rows.restore(head)

    # save / resume (plugins.state) ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plugin's continual state: pretrained and previous weights, class rows, head mode, merger state."""
        merger = {k: v for k, v in vars(self.merger).items() if not callable(v)}
        return {"pretrained": self.pretrained, "previous": self.previous, "rows": dict(self.class_rows.rows),
                "head_name": self._head_name, "mode": self._mode, "start": self.start,
                "merger_type": type(self.merger).__name__, "merger": merger}

    def load_state_dict(self, state: dict, strategy: Any = None) -> None:
        """Restore :meth:`state_dict` (into a plugin built with the same merger and options)."""
        if state["merger_type"] != type(self.merger).__name__ or state["start"] != self.start:
            raise ValueError(f"the saved MergePlugin used a {state['merger_type']} merger starting from "
                             f"{state['start']!r}; this one a {type(self.merger).__name__} from {self.start!r}")
        for k, v in state["merger"].items():
            setattr(self.merger, k, v)
        self.pretrained, self.previous = state["pretrained"], state["previous"]
        self.class_rows.rows = {int(c): tuple(r) for c, r in state["rows"].items()}
        self._head_name, self._mode = state["head_name"], state["mode"]
