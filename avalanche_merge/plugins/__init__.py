"""Every family of the package as an Avalanche plugin, for any ``SupervisedTemplate`` strategy and any model.

- :class:`MergePlugin`: continual model merging (OPCM, continual TA/TIES/average, MagMax, TSV-M, Iso-CTS, ...);
- :class:`LoRAPlugin`: continual LoRA learners (O-LoRA, InfLoRA, SD-LoRA, CL-LoRA, GPM, plain LoRA);
- :class:`SparsePlugin`: sparse fine-tuning and dynamic sparse training learners;
- :class:`SparCLPlugin`: SparCL (task-aware dynamic masks, gradient masks, data removal) on a rehearsal strategy;
- :class:`SparseMemoryPlugin`: sparse memory fine-tuning (a product-key memory, TF-IDF-selected rows);
- :class:`RoutedPlugin`: retrieval-routed per-task LoRA (CoLoR, Proteus), wrapping the user's model;
- :class:`PromptPlugin`: prompt-based learners (L2P, DualPrompt, CODA-Prompt) on a
  :class:`~avalanche_merge.prompts.PromptedViT` built around the user's ViT;
- :class:`TentPlugin`: TENT test-time adaptation during evaluation; :class:`MemoLayerNormPlugin`: TTACIL's MEMO step;
- :class:`HeadProtocolPlugin`: head protocols (masked, per-task heads, frozen zero-shot heads);
- :func:`save_state` / :func:`load_state`: save and resume a strategy's continual state (safetensors + JSON).

Nearest class mean and RanPAC fit closed-form classifiers on frozen features with no optimizer and no backward,
so they are strategies, not plugins (:class:`~avalanche_merge.strategies.prototypes.FrozenFeatureClassifier`).
Names and options are the CLI's (``avalanche-merge list``); options are validated at construction.
"""

from .lora import LoRAPlugin
from .merge import MergePlugin
from .prompts import PromptPlugin
from .protocol import HeadProtocolPlugin
from .routed import RoutedPlugin
from .sparcl import SparCLPlugin
from .sparse import SparsePlugin
from .sparse_memory import SparseMemoryOptions, SparseMemoryPlugin
from .state import load_state, save_state
from .tta import MemoLayerNormPlugin, TentPlugin

__all__ = ["HeadProtocolPlugin", "LoRAPlugin", "MemoLayerNormPlugin", "MergePlugin", "PromptPlugin", "RoutedPlugin",
           "SparCLPlugin", "SparseMemoryOptions", "SparseMemoryPlugin", "SparsePlugin", "TentPlugin", "load_state",
           "save_state"]
