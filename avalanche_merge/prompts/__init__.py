"""Prompt-based continual learning on frozen ViTs: L2P, DualPrompt and CODA-Prompt (pure torch cores).

- :mod:`.pool`: prompt pools, key-query selection (top-N, batch-wise, task-indexed), the key pull term;
- :mod:`.coda`: CODA-Prompt's components, attention weights and Gram-Schmidt expansion;
- :mod:`.attention`: prefix attention recomputed from TinyViT, timm and open_clip attention modules;
- :mod:`.backbone`: hooks inserting prompt tokens / prefixes into a supported ViT;
- :mod:`.model`: the three prompted classifiers; :mod:`.config`: their validated hyper-parameters.

The Avalanche strategies are in :mod:`avalanche_merge.strategies.prompts`.
"""

from .attention import AttentionPatch, attention_form, prefix_forward
from .backbone import PromptState, ViTAdapter, check_layers
from .coda import CodaLayer, CodaPrompt, gram_schmidt_new
from .config import CodaPromptConfig, DualPromptConfig, L2PConfig
from .model import CodaPromptModel, DualPromptModel, L2PModel, PromptedViT
from .pool import PromptPool, key_scores, l2_normalize, pull_term, select_prompts

__all__ = ["AttentionPatch", "CodaLayer", "CodaPrompt", "CodaPromptConfig", "CodaPromptModel", "DualPromptConfig",
           "DualPromptModel", "L2PConfig", "L2PModel", "PromptPool", "PromptState", "PromptedViT", "ViTAdapter",
           "attention_form", "check_layers", "gram_schmidt_new", "key_scores", "l2_normalize", "prefix_forward",
           "pull_term", "select_prompts"]
