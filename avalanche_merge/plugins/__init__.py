"""Thin Avalanche plugins over the cores: merging (:class:`MergePlugin`), continual LoRA (:class:`LoRAPlugin`),
head protocols (:class:`HeadProtocolPlugin`)."""

from .lora import LoRAPlugin
from .merge import MergePlugin
from .protocol import HeadProtocolPlugin

__all__ = ["HeadProtocolPlugin", "LoRAPlugin", "MergePlugin"]
