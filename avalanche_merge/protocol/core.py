"""Head protocols of class-incremental learning (pure torch; no Avalanche import).

A *head protocol* says which classifier a method trains and which logits enter its loss and its predictions.
The papers this package implements do not share one, and the choice moves results more than the learner does
(issue 13: 5 two-digit tasks, 0.14-0.19 final accuracy with one shared head against 0.60-0.67 with the papers'
protocols). Every registered method declares its paper's protocol; a config may override it for ablations.

=============  ===============================================================================================
protocol       what it does
=============  ===============================================================================================
``shared``     one head over all classes, trained with the strategy's loss on every logit (Avalanche's default).
``masked``     one head; the training loss sees only the logits of the current experience's classes (plus the
               classes of any replayed sample in the mini-batch); predictions are restricted to the classes seen
               so far. L2P / DualPrompt / CODA-Prompt (``logits[:, mask]``), SD-LoRA (``logits[:, known:]``).
``per_task``   a new linear head per experience over that experience's classes, trained on them alone and
               frozen afterwards; predictions concatenate the heads of the tasks seen so far (InfLoRA's
               ``classifier_pool``), or, with ``prototypes``, score each class by the cosine between the features
               and the class mean (CL-LoRA, EASE: the trained head is only a proxy). Needs task boundaries.
``frozen``     the pretrained (zero-shot) head is never trained (OPCM and MagMax merge CLIP image towers under
               frozen text heads); needs a head that was pretrained on the label space.
``prototype``  the method has no trained head (NCM, SLDA, RanPAC: class statistics of frozen features).
``routed``     a head per task chosen by task retrieval (CoLoR, Proteus); the method owns its heads.
=============  ===============================================================================================

Only the first four can be chosen for a method that trains a head; the last two are declared by methods whose
classifier is their own.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
from torch import nn

CHOOSABLE = ("shared", "masked", "per_task", "frozen")
PROTOCOLS = (*CHOOSABLE, "prototype", "routed")


def check_protocol(protocol: object, allowed: Iterable[str] = PROTOCOLS) -> str:
    """Return ``protocol`` if it is one of ``allowed``; raise ``TypeError``/``ValueError`` naming the choices."""
    allowed = tuple(allowed)
    if not isinstance(protocol, str):
        raise TypeError(f"protocol must be a str, one of {list(allowed)}, got {type(protocol).__name__}")
    if protocol not in allowed:
        raise ValueError(f"unknown head protocol {protocol!r}; valid protocols: {list(allowed)}")
    return protocol


def class_list(classes: Iterable[int] | torch.Tensor | int) -> list[int]:
    """The sorted distinct class ids of ``classes`` (a set, list, range, tensor or one int).

    Avalanche gives ``classes_in_this_experience`` as a list or a set depending on the benchmark; a set must
    work like a list (Avalanche 0.6's L2P masks every logit when it gets a set).
    """
    if isinstance(classes, torch.Tensor):
        values = classes.flatten().tolist()
    elif isinstance(classes, int) and not isinstance(classes, bool):
        values = [classes]
    else:
        values = list(classes)
    out = []
    for c in values:
        if isinstance(c, bool) or not hasattr(c, "__index__"):
            raise TypeError(f"class ids must be ints, got {c!r}")
        c = operator.index(c)
        if c < 0:
            raise ValueError(f"class ids must be >= 0, got {c}")
        out.append(c)
    return sorted(set(out))


def fill_value(dtype: torch.dtype) -> float:
    """The logit given to excluded classes: the dtype's lowest finite value (finite, so no NaN in a softmax)."""
    return float(torch.finfo(dtype).min)


def restrict_logits(logits: torch.Tensor, classes: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """``logits`` with every column outside ``classes`` set to :func:`fill_value` (argmax never picks them).

    Class ids beyond the logits' width are ignored (a growing head may not have their unit yet). An empty
    ``classes`` leaves the logits unchanged.
    """
    keep = [c for c in class_list(classes) if c < logits.shape[-1]]
    if not keep:
        return logits
    mask = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[keep] = False
    return logits.masked_fill(mask, fill_value(logits.dtype))


def masked_loss(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
                targets: torch.Tensor, classes: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """``criterion`` on the columns of ``classes`` (and of the targets present), with targets re-indexed.

    The loss of the ``masked`` and ``per_task`` protocols: for a cross-entropy it equals SD-LoRA's
    ``CE(logits[:, known:], targets - known)`` and gives exactly zero gradient to every other column. Targets
    outside ``classes`` (replayed samples of earlier experiences) add their own class to the columns rather
    than produce an infinite loss.

    Args:
        criterion: ``criterion(logits, targets) -> loss`` (e.g. ``nn.CrossEntropyLoss()``).
        logits: ``[batch, n_classes]``.
        targets: ``[batch]`` class ids.
        classes: the classes of the current experience.

    Raises:
        ValueError: a target or class id is outside the logits' width.
    """
    width = logits.shape[-1]
    present = targets.detach().flatten().unique().tolist()
    columns = class_list([*class_list(classes), *present])
    if columns and columns[-1] >= width:
        raise ValueError(f"class {columns[-1]} has no logit: the head has {width} outputs (is the head too small "
                         f"for the benchmark's classes?)")
    index = torch.tensor(columns, dtype=torch.long, device=logits.device)
    remap = torch.full((width,), -1, dtype=torch.long, device=logits.device)
    remap[index] = torch.arange(len(columns), device=logits.device)
    return criterion(logits.index_select(-1, index), remap[targets])


def find_linear(head: nn.Module) -> nn.Linear:
    """The output ``nn.Linear`` of a head: the module itself or its ``classifier`` (Avalanche's
    ``IncrementalClassifier``); ``TypeError`` for anything else."""
    if isinstance(head, nn.Linear):
        return head
    inner = getattr(head, "classifier", None)
    if isinstance(inner, nn.Linear):
        return inner
    raise TypeError(f"the head must be an nn.Linear or have an nn.Linear 'classifier' (IncrementalClassifier), "
                    f"got {type(head).__name__}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``model``'s submodule ``name`` (dotted) and return the module it replaced."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old
