"""``MaskedUpdate``: weights outside a mask stay bit-identical through any optimizer step.

Zeroing masked gradients is not enough with adaptive optimizers: Adam's moments from earlier steps (or earlier
tasks) keep moving an entry whose gradient is now zero, and decoupled weight decay (AdamW) shrinks every entry
whatever its gradient. So the guard (1) zeroes masked gradients after ``backward()`` (the moments never see them),
(2) keeps the frozen values before the step and (3) writes them back after it. Pure torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def check_masks(params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every mask is a bool tensor shaped like its parameter."""
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask for unknown parameter {name!r}; parameters: {sorted(params)[:6]}...")
        if mask.dtype != torch.bool or mask.shape != params[name].shape:
            raise ValueError(f"mask of {name!r} must be a bool tensor of shape {tuple(params[name].shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")


class MaskedUpdate:
    """Restrict the updates of ``params`` to the ``True`` entries of ``masks`` (missing names: fully trainable).

    Call :meth:`mask_gradients` after ``backward()``, :meth:`before_step` before ``optimizer.step()`` and
    :meth:`after_step` after it.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
        check_masks(params, masks)
        self.params = {n: params[n] for n in masks}
        self.masks = {n: m.to(params[n].device) for n, m in masks.items()}
        self._saved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def mask_gradients(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[name])

    @torch.no_grad()
    def before_step(self) -> None:
        self._saved = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def after_step(self) -> None:
        for name, p in self.params.items():
            saved = self._saved.get(name)
            if saved is not None:
                p.copy_(torch.where(self.masks[name], p, saved))
        self._saved = {}
