"""Clustering-based task retrieval and retrieval-routed methods (pure torch / scikit-learn; no Avalanche import).

- :mod:`.router`: the :class:`Router` interface that retrieval-routed methods expose.
"""

from .router import Router, find_router

__all__ = ["Router", "find_router"]
