"""``PerTaskHead``: the ``per_task`` head protocol (pure torch; no Avalanche import).

A linear head per task over that task's classes (InfLoRA's ``classifier_pool``, Liang & Li, CVPR 2024): task
``t``'s head is trained on task ``t`` alone and frozen when task ``t + 1`` is added; predictions concatenate
the heads of every task so far, each head filling its own classes' columns of a logit vector over all
classes. With ``prototypes=True`` the heads are only proxies for training: after a task, the mean feature of
each of its classes is stored and evaluation scores class ``c`` by ``cos(f(x), mu_c)`` (CL-LoRA, He et al.,
CVPR 2025, after EASE, Zhou et al., CVPR 2024). The official CL-LoRA proxy is a cosine layer with a
learnable scale; ours is linear (the proxy is discarded at evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .core import class_list, fill_value


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """Mean of ``features`` ``[n, d]`` over the rows of each class in ``classes`` (``[len(classes), d]``).

    Raises:
        ValueError: a class has no sample.
    """
    rows = []
    for c in class_list(classes):
        chosen = features[labels == c]
        if chosen.shape[0] == 0:
            raise ValueError(f"class {c} has no sample to compute its prototype from")
        rows.append(chosen.mean(0))
    return torch.stack(rows)


class PerTaskHead(nn.Module):
    """One linear head per task; logits over every class seen so far.

    Args:
        in_features: feature width.
        out_features: minimum output width (the replaced head's); grows to the largest class id + 1.
        initial: the head it replaces, used (frozen) only before the first task is added, so that a pretrained
            evaluation still measures the original model.
        prototypes: evaluate by cosine similarity to class-mean prototypes instead of the linear heads.
        bias: whether the per-task heads have a bias.
    """

    def __init__(self, in_features: int, out_features: int, *, initial: nn.Module | None = None,
                 prototypes: bool = False, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = in_features
        self.min_out = out_features
        self.heads = nn.ModuleList()
        self.task_classes: list[list[int]] = []
        self.initial = initial
        if initial is not None:
            initial.requires_grad_(False)
        self.use_prototypes = bool(prototypes)
        self.bias = bias
        self.register_buffer("prototypes", torch.zeros(0, in_features))
        self.prototype_classes: list[int] = []
        self._recorded: list[torch.Tensor] | None = None

    # -- tasks ---------------------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        top = max((c for cs in self.task_classes for c in cs), default=-1)
        return max(self.min_out, top + 1)

    def add_task(self, classes: Iterable[int] | torch.Tensor) -> nn.Linear:
        """Add (and return) the head of a new task over ``classes``; earlier heads are frozen.

        Raises:
            ValueError: ``classes`` is empty or shares a class with an earlier task (per-task heads need
                disjoint classes: a domain-incremental stream needs task labels).
        """
        classes = class_list(classes)
        if not classes:
            raise ValueError("a task needs at least one class")
        for t, old in enumerate(self.task_classes):
            shared = sorted(set(old) & set(classes))
            if shared:
                raise ValueError(f"the per_task protocol needs disjoint classes per experience; class {shared[0]} "
                                 f"is in task {t} and in the new task {len(self.task_classes)} (domain-incremental "
                                 f"streams repeat classes: use 'masked', 'shared' or 'frozen')")
        ref = next(self.parameters(), self.prototypes)
        head = nn.Linear(self.in_features, len(classes), bias=self.bias).to(device=ref.device, dtype=ref.dtype)
        for old in self.heads:
            old.requires_grad_(False)
        self.heads.append(head)
        self.task_classes.append(classes)
        return head

    def freeze_finished(self) -> None:
        """Keep only the newest task's head trainable (the replaced head and finished tasks' heads are frozen);
        for callers that made the whole module trainable with ``requires_grad_(True)``."""
        if self.initial is not None:
            self.initial.requires_grad_(False)
        for head in list(self.heads)[:-1]:
            head.requires_grad_(False)

    # -- prototypes ----------------------------------------------------------------------------------------
    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Collect the head's inputs (detached) of every forward inside the block, in order."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    @property
    def is_recording(self) -> bool:
        return self._recorded is not None

    @torch.no_grad()
    def set_prototypes(self, classes: Iterable[int], means: torch.Tensor) -> None:
        """Store (or replace) the prototypes of ``classes`` (rows of ``means``, in sorted class order)."""
        classes = class_list(classes)
        if means.shape != (len(classes), self.in_features):
            raise ValueError(f"means must be [{len(classes)}, {self.in_features}], got {list(means.shape)}")
        keep = [i for i, c in enumerate(self.prototype_classes) if c not in classes]
        old = self.prototypes[keep]
        self.prototypes = torch.cat([old, means.to(old)])
        self.prototype_classes = [self.prototype_classes[i] for i in keep] + classes

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._recorded is not None:
            self._recorded.append(x.detach())
        if not self.heads:
            if self.initial is not None:
                return self.initial(x)
            return x.new_full((*x.shape[:-1], self.out_features), fill_value(x.dtype))
        out = x.new_full((*x.shape[:-1], self.out_features), fill_value(x.dtype))
        with_proto = set(self.prototype_classes) if (self.use_prototypes and not self.training) else set()
        for classes, head in zip(self.task_classes, self.heads, strict=True):
            if not set(classes) <= with_proto:
                out[..., classes] = head(x).to(out.dtype)
        if with_proto:
            cos = F.normalize(x, dim=-1) @ F.normalize(self.prototypes.to(x.dtype), dim=-1).T
            out[..., self.prototype_classes] = cos
        return out

    # -- state ---------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"task_classes": [list(c) for c in self.task_classes], "prototype_classes": list(self.prototype_classes)}

    def set_extra_state(self, state: dict) -> None:
        """Recreate the saved tasks' heads (their weights are loaded next by ``load_state_dict``)."""
        if not isinstance(state, dict) or "task_classes" not in state:
            raise ValueError("PerTaskHead state must hold 'task_classes'")
        while len(self.heads) < len(state["task_classes"]):
            self.add_task(state["task_classes"][len(self.heads)])
        if [list(c) for c in self.task_classes] != [list(c) for c in state["task_classes"]]:
            raise ValueError(f"PerTaskHead holds tasks {self.task_classes}, the state {state['task_classes']}")
        self.prototype_classes = list(state.get("prototype_classes", []))
        if len(self.prototype_classes) != self.prototypes.shape[0]:
            raise ValueError(f"PerTaskHead state names {len(self.prototype_classes)} prototype classes for "
                             f"{self.prototypes.shape[0]} prototypes")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "prototypes")
        if isinstance(saved, torch.Tensor) and saved.shape != self.prototypes.shape:
            self.prototypes = self.prototypes.new_zeros(saved.shape)  # the buffer's size depends on the tasks
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, tasks={len(self.heads)}, out_features={self.out_features}, "
                f"prototypes={self.use_prototypes}")
