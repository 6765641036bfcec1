"""Head protocols of class-incremental learning: which head trains, which logits enter the loss and the
prediction (pure torch; no Avalanche import). See :mod:`avalanche_merge.protocol.core` for the table."""

from .core import (
    CHOOSABLE,
    PROTOCOLS,
    check_protocol,
    class_list,
    fill_value,
    find_linear,
    masked_loss,
    replace_module,
    restrict_logits,
)
from .per_task import PerTaskHead, class_means

__all__ = ["CHOOSABLE", "PROTOCOLS", "PerTaskHead", "check_protocol", "class_list", "class_means", "fill_value",
           "find_linear", "masked_loss", "replace_module", "restrict_logits"]
