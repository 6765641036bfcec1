"""Optimizer plumbing shared by the plugins whose methods train only part of the model."""

from __future__ import annotations

from typing import Any

import torch


def restrict_optimizer(strategy: Any, params: list[torch.nn.Parameter], lr: float | None = None) -> None:
    """Point the strategy's single-group optimizer at ``params`` only (at rate ``lr`` if given); clear its state."""
    optimizer = strategy.optimizer
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"this plugin needs an optimizer with one parameter group, got "
                         f"{len(optimizer.param_groups)}; build the optimizer over model.parameters()")
    optimizer.param_groups[0]["params"] = list(params)
    if lr is not None:
        optimizer.param_groups[0]["lr"] = lr
    optimizer.state.clear()
    ids = {id(p) for p in params}
    strategy.optimized_param_id = {n: p for n, p in strategy.model.named_parameters() if id(p) in ids}
