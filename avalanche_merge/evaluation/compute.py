"""Compute cost of one training step and a per-task compute budget in memory-adjusted FLOPs (pure torch).

FoMo-in-Flux (Roth et al., "A Practitioner's Guide to Continual Multimodal Pretraining", 2024) compares continual
pretraining methods at equal compute: every method gets the same per-task budget in *memory-adjusted FLOPs*
(FLOPs of a training step weighted by the step's peak memory relative to a reference), turned into a
method-specific number of update steps. This module measures one step and does that arithmetic:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the step (forward, every auxiliary forward such as a
  teacher's, and backward; matmuls and convolutions, 2 FLOPs per multiply-add; element-wise work and the optimizer
  update are not counted, as in the usual model-FLOPs convention).
- Memory (bytes, deterministic, device-independent): parameters and buffers of the trained model + gradients +
  optimizer state + every tensor autograd saves for backward during the step (``saved_tensors_hooks``; tensors
  that share storage with a parameter are not counted twice). Frozen copies a method keeps outside the model
  (a teacher) are not counted: their forward FLOPs are.
- Memory-adjusted FLOPs of a step: ``MAF = FLOPs x memory / memory_reference`` (reference: full fine-tuning of
  the same model with the same batch, whose MAF therefore equals its FLOPs).
- Steps a method gets for a budget ``B`` (MAF per task): ``floor(B / MAF)``; a budget given as ``k`` reference
  steps is ``B = k x FLOPs_reference``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StepCost:
    """The measured cost of one training step.

    Attributes:
        flops: forward + backward FLOPs of the step (``FlopCounterMode``).
        memory_bytes: parameters + buffers + gradients + optimizer state + saved activations.
        activation_bytes: the saved-activation part of ``memory_bytes``.
        batch_size: inputs in the measured step.
    """

    flops: int
    memory_bytes: int
    activation_bytes: int
    batch_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the model's parameters and buffers, their gradients and the optimizer's state tensors."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)
            if isinstance(t, nn.Parameter) and t.grad is not None:
                total += _nbytes(t.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


class StepMeter:
    """Measure one training step: ``start(model)`` before its forward, ``stop(model, optimizer, batch_size)``
    after its optimizer update (both from the same thread). Returns a :class:`StepCost`.

    ``start``/``stop`` rather than a context manager so that an Avalanche plugin can open it in
    ``before_training_iteration`` and close it in ``after_update``.
    """

    def __init__(self) -> None:
        self._counter = None
        self._hooks = None
        self._activation = 0
        self._param_ptrs: set[int] = set()

    @property
    def running(self) -> bool:
        return self._counter is not None

    def start(self, model: nn.Module) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        if self.running:
            raise RuntimeError("StepMeter.start called twice without stop")
        self._activation = 0
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: set[tuple[int, int]] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key[0] not in self._param_ptrs and key not in seen:
                seen.add(key)
                self._activation += key[1]
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()

    def stop(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, batch_size: int) -> StepCost:
        if not self.running:
            raise RuntimeError("StepMeter.stop called before start")
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        self._hooks.__exit__(None, None, None)
        self._hooks = None
        flops = int(counter.get_total_flops())
        memory = state_bytes(model, optimizer) + self._activation
        return StepCost(flops=flops, memory_bytes=memory, activation_bytes=self._activation,
                        batch_size=int(batch_size))


def memory_adjusted_flops(cost: StepCost, reference: StepCost) -> float:
    """``cost.flops * cost.memory_bytes / reference.memory_bytes`` (FoMo-in-Flux's memory adjustment).

    Raises:
        ValueError: the reference has no memory, or a FLOP count is not positive.
    """
    if reference.memory_bytes <= 0:
        raise ValueError(f"reference memory must be > 0 bytes, got {reference.memory_bytes}")
    if cost.flops <= 0:
        raise ValueError(f"a measured step must have > 0 FLOPs, got {cost.flops} (did the step run a forward?)")
    return cost.flops * (cost.memory_bytes / reference.memory_bytes)


def budget_steps(budget: float, cost: StepCost, reference: StepCost, *, method: str = "the method") -> int:
    """The number of update steps ``floor(budget / MAF(cost))`` a method gets per task.

    Args:
        budget: memory-adjusted FLOPs per task, > 0.
        cost: the method's measured step.
        reference: the reference (full fine-tuning) step.
        method: a name for messages.

    Raises:
        ValueError: ``budget`` is not positive, or is smaller than one step of the method.
    """
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive number of memory-adjusted FLOPs, got {budget!r}")
    maf = memory_adjusted_flops(cost, reference)
    steps = math.floor(budget / maf * (1 + 1e-12))  # k reference steps of the reference itself give exactly k
    if steps < 1:
        raise ValueError(f"the compute budget of {budget:.4g} memory-adjusted FLOPs per task is smaller than one "
                         f"training step of {method} ({maf:.4g} = {cost.flops:.4g} FLOPs x memory ratio "
                         f"{cost.memory_bytes / reference.memory_bytes:.3f}); raise the budget")
    return steps


__all__ = ["StepCost", "StepMeter", "budget_steps", "memory_adjusted_flops", "state_bytes"]
