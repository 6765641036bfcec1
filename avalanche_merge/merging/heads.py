"""Classification heads in continual merging: which parameters they are and how their rows are kept.

Merging a class-incremental classifier like any other weight averages each class's output row with rows that
never saw the class, so merging methods treat the head apart (Marczak et al., MagMax, ECCV 2024, keep the head
of the last fine-tuned model; Tang et al., 2025, use frozen zero-shot heads). Pure torch; no Avalanche import.

- :func:`find_head`: the state-dict prefix of a model's classification head (``head``, ``classifier``, or the
  last ``nn.Linear``; Avalanche's ``IncrementalClassifier`` / ``MultiHeadClassifier`` are found by name).
- :class:`ClassRows`: per class, the output row (weight row and bias) from the experience that trained the class;
  heads that grow (``IncrementalClassifier``) keep their stored rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def find_head(model: nn.Module, prefix: str = "auto") -> str:
    """The module name of ``model``'s classification head.

    Args:
        model: the model.
        prefix: a module name to check, or ``"auto"``: a top-level ``head`` or ``classifier`` module, else the
            last ``nn.Linear``.

    Raises:
        ValueError: ``prefix`` names no module, or ``"auto"`` finds no head.
    """
    modules = dict(model.named_modules())
    if prefix != "auto":
        if prefix not in modules or prefix == "":
            raise ValueError(f"head {prefix!r} is not a module of the model; modules with parameters: "
                             f"{[n for n, m in modules.items() if n and any(True for _ in m.parameters(False))][:8]}")
        return prefix
    for name in ("head", "classifier"):
        if name in modules:
            return name
    if callable(getattr(model, "encode_text", None)) and isinstance(getattr(model, "visual", None), nn.Module):
        raise ValueError(f"{type(model).__name__} is a whole CLIP model (image and text towers) without a "
                         f"classification head: its last nn.Linear is a text-tower layer; wrap the image tower "
                         f"with avalanche_merge.models.clip.ZeroShotClassifier, or pass head=<module name>")
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and ".lora_" not in n]
    if not linears:
        raise ValueError("found no classification head (no 'head'/'classifier' module and no nn.Linear); "
                         "pass head=<module name>")
    return linears[-1]


def head_keys(state: Iterable[str], prefix: str) -> list[str]:
    """State-dict names that belong to the head module ``prefix``."""
    return [k for k in state if k == prefix or k.startswith(prefix + ".")]


def _row_params(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the head's output layer: the module itself or its ``classifier`` attribute."""
    layer = head if isinstance(head, nn.Linear) else getattr(head, "classifier", None)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"head_mode='class_rows' needs an nn.Linear head (or a module with a .classifier Linear), "
                         f"got {type(head).__name__}")
    return layer.weight, layer.bias


class ClassRows:
    """Stores, for each class, the head row from the experience that trained it, and writes them back."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def store(self, head: nn.Module, classes: Iterable[int]) -> None:
        """Remember the current rows of ``classes`` (call right after training on them)."""
        weight, bias = _row_params(head)
        for c in classes:
            c = int(c)
            if not 0 <= c < weight.shape[0]:
                raise ValueError(f"class {c} is outside the head's {weight.shape[0]} outputs")
            self.rows[c] = (weight[c].clone(), None if bias is None else bias[c].clone())

    @torch.no_grad()
    def restore(self, head: nn.Module) -> None:
        """Write every stored row into ``head`` in place (rows of other classes are left as they are)."""
        weight, bias = _row_params(head)
        for c, (w, b) in self.rows.items():
            if c < weight.shape[0]:
                weight[c].copy_(w)
                if bias is not None and b is not None:
                    bias[c].copy_(b)
