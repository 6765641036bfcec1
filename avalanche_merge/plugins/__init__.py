"""Thin Avalanche plugins over the cores: merging (:class:`MergePlugin`), continual LoRA (:class:`LoRAPlugin`)."""

from .lora import LoRAPlugin
from .merge import MergePlugin

__all__ = ["LoRAPlugin", "MergePlugin"]
