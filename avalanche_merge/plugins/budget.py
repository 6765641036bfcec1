"""Avalanche plugins of the compute-budget protocol (FoMo-in-Flux, Roth et al. 2024); the arithmetic lives in
:mod:`avalanche_merge.evaluation.compute`.

- :class:`StepProbePlugin` runs one update step per experience and measures the step of the experience it is told
  to (a throwaway strategy: the runner builds a fresh one for the real run).
- :class:`StepBudgetPlugin` stops training of every experience after a fixed number of update steps (epochs are
  extended as needed, never cut short before the budget is used).
"""

from __future__ import annotations

import math

from avalanche.core import SupervisedPlugin

from ..evaluation.compute import StepCost, StepMeter


class StepProbePlugin(SupervisedPlugin):
    """One update step per experience; the step of experience ``measure_at`` (0-based order of training) is
    measured with :class:`~avalanche_merge.evaluation.compute.StepMeter`, from ``before_training_iteration``
    to ``after_update``.

    Attributes:
        cost: the measured :class:`StepCost`, or None (no step happened).
        gradient_free: the measured step computed no gradient (a statistics pass such as RanPAC's): the budget
            does not apply to such a method, which keeps its own single pass.
    """

    def __init__(self, measure_at: int = 0) -> None:
        super().__init__()
        if measure_at < 0:
            raise ValueError(f"measure_at must be >= 0, got {measure_at}")
        self.measure_at = measure_at
        self.cost: StepCost | None = None
        self.gradient_free = True
        self._trained = 0
        self._meter = StepMeter()

    def before_training_exp(self, strategy, **kwargs) -> None:
        strategy.train_epochs = max(1, strategy.train_epochs)

    def before_training_iteration(self, strategy, **kwargs) -> None:
        if self._trained == self.measure_at and self.cost is None:
            self._meter.start(strategy.model)

    def after_update(self, strategy, **kwargs) -> None:
        if self._meter.running:
            self.cost = self._meter.stop(strategy.model, strategy.optimizer, int(strategy.mb_y.shape[0]))
            # a step without any gradient is a statistics pass (RanPAC, SLDA), not an update the budget limits
            self.gradient_free = not any(p.grad is not None for p in strategy.model.parameters())
        strategy.stop_training()

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self._meter.running:  # the method skipped its update (e.g. a gradient-free first session)
            self._meter.stop(strategy.model, None, 0)
        self._trained += 1


class StepBudgetPlugin(SupervisedPlugin):
    """Train every experience for exactly ``steps`` update steps (fewer only if the method itself ends early).

    Before each experience the strategy's ``train_epochs`` becomes ``ceil(steps / batches per epoch)``; after the
    ``steps``-th update the plugin stops training. ``steps_taken`` records the steps of each experience.
    """

    def __init__(self, steps: int) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.steps_taken: list[int] = []
        self._count = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        per_epoch = len(strategy.dataloader)
        if per_epoch < 1:
            raise ValueError("the experience has no training batch")
        strategy.train_epochs = math.ceil(self.steps / per_epoch)
        self._count = 0

    def after_update(self, strategy, **kwargs) -> None:
        self._count += 1
        if self._count >= self.steps:
            strategy.stop_training()

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.steps_taken.append(self._count)

    def method_info(self) -> dict:
        return {"steps_per_task": self.steps, "steps_taken": list(self.steps_taken)}


__all__ = ["StepBudgetPlugin", "StepProbePlugin"]
