"""Projection-based continual LoRA on peft: the learners (pure torch + peft; no Avalanche import).

=============  ====================================================================  ==========================
learner        what protects earlier tasks                                           reference
=============  ====================================================================  ==========================
``lora``       nothing: one adapter trained on every task in turn (baseline)         Hu et al., ICLR 2022
``olora``      a frozen adapter per task; penalty on ``|A_old A_new^T|``              Wang et al., EMNLP-F 2023
``inflora``    per-task ``A`` fixed to input directions outside old tasks' space      Liang & Li, CVPR 2024
``sdlora``     frozen unit-norm directions, learnable magnitudes                      Wu et al., ICLR 2025
``cllora``     shared early adapter (KD, gradient reassignment) + per-task late ones  He et al., CVPR 2025
``gpm_lora``   per-task ``A`` with gradients projected off old input bases            Saha et al., ICLR 2021
``gpm``        full fine-tuning of the targets with GPM gradient projection           Saha et al., ICLR 2021
=============  ====================================================================  ==========================

``make_learner(name, model, **options)`` builds any of them; ``list_learners()`` lists the names. Targets resolve per
architecture (:mod:`avalanche_merge.models.targets`); ``export_peft_adapter`` writes an adapter in peft's format.
"""

from . import cllora, gpm, inflora, olora, sdlora  # noqa: F401 - each module registers its learner
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
from .cllora import CLLoRA, CLLoRAConfig
from .config import LoRAConfig
from .export import export_peft_adapter
from .gpm import GPMConfig, GPMFineTune, GPMLoRA
from .inflora import InfLoRA, InfLoRAConfig
from .learner import ContinualLoRA, SequentialLoRA, SequentialLoRAConfig, run_model
from .olora import OLoRA, OLoRAConfig, orthogonality_penalty
from .registry import LEARNERS, list_learners, make_config, make_learner, register_learner
from .sdlora import SDLoRA, SDLoRAConfig

if "lora" not in LEARNERS.names():
    register_learner(SequentialLoRA)

__all__ = ["LEARNERS", "CLLoRA", "CLLoRAConfig", "ContinualLoRA", "GPMConfig", "GPMFineTune", "GPMLoRA", "InfLoRA",
           "InfLoRAConfig", "LoRAConfig", "OLoRA", "OLoRAConfig", "SDLoRA", "SDLoRAConfig", "SequentialLoRA",
           "SequentialLoRAConfig", "activate", "adapter_deltas", "adapter_names", "adapter_parameters",
           "adapter_state", "add_adapter", "delta_weight", "export_peft_adapter", "linear_names", "list_learners",
           "lora_layers", "make_config", "make_learner", "orthogonality_penalty", "register_learner", "resolve_targets",
           "run_model"]
