"""Normalisation layers as the only test-time-adapted parameters: selection, snapshot/restore, batch statistics.

TENT (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021; DequanWang/tent) adapts
only the affine scale and shift of the normalisation layers and normalises with the statistics of the test batch.
The reference collects ``nn.BatchNorm2d`` weights and biases (ResNets); a ViT has LayerNorms, which have no running
statistics, so their affine parameters are the whole adaptable state. TTACIL (Marouf et al., arXiv 2310.11482)
adapts the LayerNorms of a ViT the same way and restores them after every batch.

Pure torch (no Avalanche import).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: module types whose affine parameters are "normalisation parameters"
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every normalisation layer of ``model`` (LayerNorm, GroupNorm, BatchNorm*)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the affine ``weight``/``bias`` of every normalisation layer, in module order.

    Raises:
        ValueError: the model has no normalisation layer with affine parameters (TENT has nothing to adapt; the
            reference's ``check_model`` refuses such a model too).
    """
    out = []
    for name, module in norm_modules(model):
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if isinstance(p, nn.Parameter):
                out.append((f"{name}.{pname}" if name else pname, p))
    if not out:
        raise ValueError(f"{type(model).__name__} has no normalisation layer with affine parameters "
                         f"({', '.join(t.__name__ for t in NORM_TYPES)}): nothing to adapt at test time")
    return out


class NormSnapshot:
    """A copy of the normalisation state of a model: affine parameters and BatchNorm running statistics.

    ``restore()`` writes the copy back in place (the ``Parameter`` objects stay the same, so optimizers that hold
    them keep working). This is the state the TENT reference resets (``load_state_dict`` of the saved copy; only
    the normalisation parameters can have changed since everything else has ``requires_grad=False``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _, module in norm_modules(model):
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                self._tensors.append((tensor, tensor.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back into the live tensors."""
        for live, saved in self._tensors:
            live.copy_(saved)

    def __len__(self) -> int:
        return len(self._tensors)


@contextmanager
def adaptation_mode(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block: only ``params`` require gradients and BatchNorm layers normalise with batch statistics.

    As the reference's ``configure_model``: every other parameter has ``requires_grad=False`` and each BatchNorm is
    put in training mode with ``track_running_stats=False`` (batch statistics, running statistics never updated).
    Unlike the reference, which calls ``model.train()`` on the whole model and deletes the running statistics,
    other modules (dropout) keep their mode and everything is put back on exit: ``requires_grad`` flags, BatchNorm
    modes and flags.
    """
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    bns = [(m, m.training, m.track_running_stats) for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        for m, _, _ in bns:
            m.train()
            m.track_running_stats = False
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training, track in bns:
            m.train(training)
            m.track_running_stats = track
