"""Thin Avalanche plugins, one file per method family; each only calls a pure core."""

from .merge import MergePlugin

__all__ = ["MergePlugin"]
