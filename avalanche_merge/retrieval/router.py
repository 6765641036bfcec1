"""The router interface: what a retrieval-routed method exposes so that retrieval accuracy can be measured.

A method that picks a task (module, adapter, head) per input exposes an object with ``route(x) -> LongTensor``
(the chosen task index per sample) and, optionally, ``last_routed``: the indices of the latest forward pass, so
that a metric need not route twice. :func:`find_router` finds it on an Avalanche strategy (``strategy.router``,
or a plugin's ``router`` attribute). Pure Python; no Avalanche import.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Router(Protocol):
    """Chooses a task index for each input."""

    def route(self, x: Any) -> torch.Tensor:
        """Task index (``LongTensor`` of shape ``[batch]``) per input."""
        ...


def find_router(strategy: Any) -> Router | None:
    """The router of ``strategy``: ``strategy.router``, else the ``router`` of the first plugin that has one."""
    router = getattr(strategy, "router", None)
    if isinstance(router, Router):
        return router
    for plugin in getattr(strategy, "plugins", []) or []:
        router = getattr(plugin, "router", None)
        if isinstance(router, Router):
            return router
    return None
