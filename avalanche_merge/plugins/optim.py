"""Optimizer plumbing shared by the plugins whose methods train only part of the model.

:func:`restrict_optimizer` points the strategy's optimizer at a method's trainable parameters while keeping what
the user set up: with one parameter group (the usual ``SGD(model.parameters(), lr=...)``) that group holds exactly
the trainable parameters (at the method's ``lr`` if it sets one); with several groups (e.g. a lower backbone rate)
every group keeps its hyper-parameters, a parameter already in a group stays there, a new parameter (an adapter
injected by peft, a routed task's head) joins the group of its nearest named relative (its sibling parameters, as
Avalanche's ``update_optimizer`` places new parameters), and parameters no longer trained leave. The optimizer
state (momentum, Adam moments) of parameters that stay is kept, as Avalanche's own ``make_optimizer`` keeps it,
unless ``reset_state``; the state of parameters that leave is dropped.

Avalanche's ``make_optimizer``, which runs before every plugin's ``before_training_exp``, puts every model
parameter in the optimizer, frozen ones included; this function takes them out again.
"""

from __future__ import annotations

from typing import Any

import torch

#: key marking the parameter group a plugin added for parameters with no named relative in the user's groups
ADDED_GROUP = "avalanche_merge_added"


def _nearest_group(name: str, group_of_name: dict[str, int]) -> int | None:
    """The group of the parameter whose module path shares the longest prefix with ``name`` (None: no overlap)."""
    parts = name.split(".")[:-1]
    while parts:
        prefix = ".".join(parts) + "."
        groups = [g for n, g in group_of_name.items() if n.startswith(prefix)]
        if groups:
            return max(set(groups), key=groups.count)  # most relatives; ties: the first group
        parts.pop()
    return None


def restrict_optimizer(strategy: Any, params: list[torch.nn.Parameter], lr: float | None = None, *,
                       reset_state: bool = False) -> None:
    """Point the strategy's optimizer at ``params`` only, keeping the user's parameter groups.

    Args:
        strategy: an Avalanche strategy (its ``optimizer``, ``model`` and ``optimized_param_id`` are updated).
        params: the parameters to train from now on.
        lr: the method's learning rate; with one group it becomes that group's rate; with several groups the
            groups keep their own rates, so ``lr`` must be ``None``.
        reset_state: clear the optimizer state of every parameter (a fresh optimizer per experience); by default
            only parameters that leave the optimizer lose their state.

    Raises:
        ValueError: ``lr`` given for an optimizer with several parameter groups.
    """
    optimizer = strategy.optimizer
    groups = optimizer.param_groups
    params = list(dict.fromkeys(params))  # de-duplicated, order kept
    keep = {id(p) for p in params}
    if len(groups) == 1:
        groups[0]["params"] = params
        if lr is not None:
            groups[0]["lr"] = lr
    else:
        if lr is not None:
            raise ValueError(f"the method's lr={lr} sets the learning rate of a single-group optimizer; this optimizer "
                             f"has {len(groups)} parameter groups whose own rates are kept: leave lr unset (None)")
        name_of = {id(p): n for n, p in strategy.model.named_parameters()}
        group_of_id = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
        group_of_name = {name_of[i]: g for i, g in group_of_id.items() if i in name_of}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) in keep]
        for p in params:
            if id(p) in group_of_id:
                continue
            g = _nearest_group(name_of.get(id(p), ""), group_of_name)
            if g is None:
                g = next((i for i, group in enumerate(groups) if group.get(ADDED_GROUP)), None)
            if g is None:  # no relative anywhere: a group like the first one (its hyper-parameters)
                template = {k: v for k, v in groups[0].items() if k != "params"}
                optimizer.add_param_group({**template, "params": [p], ADDED_GROUP: True})
                group_of_id[id(p)] = len(groups) - 1
                continue
            groups[g]["params"].append(p)
            group_of_id[id(p)] = g
    if reset_state:
        optimizer.state.clear()
    else:
        for p in [p for p in optimizer.state if id(p) not in keep]:
            del optimizer.state[p]
    strategy.optimized_param_id = {n: p for n, p in strategy.model.named_parameters() if id(p) in keep}
