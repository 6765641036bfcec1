"""Device resolution and mixed precision (autocast, grad scaling) for the runner's Avalanche strategies.

Avalanche 0.6.0 has no mixed-precision support of its own (its templates call ``self.forward()``,
``self.backward()`` and ``self.optimizer_step()`` in plain precision), so :func:`enable_mixed_precision` wraps
those three methods of one strategy *instance*, whatever its class:

- ``forward`` runs under ``torch.autocast`` (training and evaluation alike) and returns float32 logits, so the
  criterion, Avalanche's metrics and the methods' plugins (stored DER logits, prototype statistics, distillation
  targets) see the dtype they see in fp32 runs;
- with ``fp16``, ``backward`` scales the loss with a ``torch.amp.GradScaler`` and unscales the gradients right
  away, so every ``after_backward`` / ``before_update`` plugin (gradient projections, masks) sees true gradients,
  and ``optimizer_step`` goes through ``scaler.step`` (skipped when a gradient overflowed) and ``scaler.update``.

Parameters, optimizer states and everything computed outside ``forward`` stay float32: task vectors and merges
(:class:`~avalanche_merge.merging.task_vector.TaskVector` holds fp32), input covariances (float64 hooks),
subspace projections and prototype statistics. Wrapping methods (rather than entering the autocast context in a
plugin's ``before_forward`` and leaving it in ``after_forward``) keeps the context exception-safe: a failing run
never leaves autocast switched on for the next one.

Micikevicius et al., "Mixed Precision Training", ICLR 2018 (loss scaling); PyTorch AMP (``torch.amp``).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a CUDA device is available, else ``"cpu"``; any other string unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_precision(precision: str, device: str) -> None:
    """Refuse a precision the (resolved) device cannot run, before any work.

    Raises:
        ValueError: an unknown precision, ``fp16`` off CUDA (no grad scaling or fast fp16 kernels there), or
            ``bf16`` on a CUDA device without bf16 support.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    kind = torch.device(resolve_device(device)).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (autocast with a grad scaler), but device is "
                         f"{device!r}; use 'bf16' (CPU autocast) or 'fp32'")
    if precision == "bf16" and kind not in ("cpu", "cuda"):
        raise ValueError(f"precision 'bf16' runs on 'cpu' or 'cuda' devices, got {device!r}")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16': the CUDA device of {device!r} does not support bfloat16; use 'fp16'")


def autocast(precision: str, device: str | torch.device):
    """``torch.autocast`` for ``precision`` on ``device``'s type (a no-op context for ``fp32``)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def _as_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float32:
        return out.float()
    return out


def enable_mixed_precision(strategy: Any, precision: str) -> torch.amp.GradScaler | None:
    """Run ``strategy``'s forward passes under autocast (and, for ``fp16``, scale its losses); see the module doc.

    Args:
        strategy: an Avalanche ``BaseSGDTemplate`` (its ``device`` chooses the autocast device type).
        precision: ``"fp32"`` (nothing changes), ``"bf16"`` or ``"fp16"``.

    Returns:
        The grad scaler for ``fp16``, else None.

    Raises:
        ValueError: a precision the strategy's device cannot run (:func:`check_precision`).
    """
    device = torch.device(strategy.device)
    check_precision(precision, str(device))
    if precision == "fp32":
        return None
    forward = strategy.forward

    @functools.wraps(forward)
    def forward_autocast(*args, **kwargs):
        with autocast(precision, device):
            out = forward(*args, **kwargs)
        return _as_float32(out)

    strategy.forward = forward_autocast
    if precision != "fp16":
        return None
    scaler = torch.amp.GradScaler(device.type)
    optimizer_step = strategy.optimizer_step

    def backward_scaled() -> None:
        scaler.scale(strategy.loss).backward(retain_graph=strategy.retain_graph)
        scaler.unscale_(strategy.optimizer)  # plugins after the backward see true gradients

    def step_scaled() -> None:
        if getattr(strategy, "optimizer", None) is None:
            optimizer_step()
            return
        scaler.step(strategy.optimizer)
        scaler.update()

    strategy.backward = backward_scaled
    strategy.optimizer_step = step_scaled
    return scaler


def peak_gpu_memory(device: str) -> float | None:
    """Peak allocated CUDA memory (MiB) since the last reset on ``device``, or None off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / 2**20


def reset_peak_gpu_memory(device: str) -> None:
    """Start a new peak-memory window on a CUDA ``device`` (nothing elsewhere)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
