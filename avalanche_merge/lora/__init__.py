"""Projection-based continual LoRA on peft: the learners (pure torch + peft; no Avalanche import).

- :class:`ContinualLoRA` (``"lora"``): plain sequential LoRA, the baseline; the base class of the others.
- :class:`OLoRA` (``"olora"``): per-task adapters kept orthogonal by a penalty (Wang et al. 2023).

``make_learner(name, model, **options)`` builds any of them; ``list_learners()`` lists the names.
"""

from .adapters import (
    activate,
    adapter_deltas,
    adapter_names,
    adapter_parameters,
    adapter_state,
    add_adapter,
    delta_weight,
    linear_names,
    lora_layers,
    resolve_targets,
)
from .config import LoRAConfig
from .learner import ContinualLoRA, run_model
from .olora import OLoRA, OLoRAConfig, orthogonality_penalty
from .registry import LEARNERS, list_learners, make_config, make_learner, register_learner

register_learner(ContinualLoRA)

__all__ = ["LEARNERS", "ContinualLoRA", "LoRAConfig", "OLoRA", "OLoRAConfig", "activate", "adapter_deltas",
           "adapter_names", "adapter_parameters", "adapter_state", "add_adapter", "delta_weight", "linear_names",
           "list_learners", "lora_layers", "make_config", "make_learner", "orthogonality_penalty",
           "register_learner", "resolve_targets", "run_model"]
