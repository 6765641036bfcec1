"""Method registry, Avalanche baselines and avalanche-merge strategies.

Importing this package registers every built-in method, then the methods of installed third-party packages
that declare an ``avalanche_merge.methods`` entry point.
"""

from importlib import import_module
from importlib.metadata import entry_points

from . import (
    baselines,  # noqa: F401 - registers Avalanche's baselines
    cclip,  # noqa: F401 - registers C-CLIP (open_clip only)
    lora,  # noqa: F401 - registers the continual LoRA learners
    merging,  # noqa: F401 - registers the merging methods
    packnet,  # noqa: F401 - registers Avalanche's PackNet (task-incremental only)
    prompts,  # noqa: F401 - registers L2P, DualPrompt and CODA-Prompt
    prototypes,  # noqa: F401 - registers NCM and RanPAC
    routed,  # noqa: F401 - registers CoLoR and Proteus
    sparse,  # noqa: F401 - registers the sparse fine-tuning methods
    sparse_memory,  # noqa: F401 - registers sparse memory fine-tuning
    tta,  # noqa: F401 - registers zeroshot, pretrained_head, TENT and TTACIL
)
from .lora import LoRAStrategy
from .merging import ContinualMerging
from .registry import (
    METHODS,
    BuildContext,
    MethodSpec,
    TrainConfig,
    get_method,
    list_methods,
    register_method,
    register_plugin_method,
)

for _ep in entry_points(group="avalanche_merge.methods"):
    import_module(_ep.value)

__all__ = ["METHODS", "BuildContext", "ContinualMerging", "LoRAStrategy", "MethodSpec", "TrainConfig", "get_method",
           "list_methods", "register_method", "register_plugin_method"]
