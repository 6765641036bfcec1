"""Sparse fine-tuning for continual learning (pure torch; no Avalanche import).

- :mod:`.masks`: importance scores (gradient, Fisher, weight change, random) and top-k mask selection;
- :mod:`.capacity`: per-task accounting of the update budget under ownership and the ``on_exhausted`` policy;
- :mod:`.guard`: :class:`MaskedUpdate`, masked weights bit-identical through any optimizer step;
- :mod:`.learner` / :mod:`.masked`: the sparse-learner protocol and :class:`MaskedFineTuner` (a mask per task);
- :mod:`.dst`: dynamic sparse training, SET and RigL (Yildirim et al., CPAL 2024);
- :mod:`.sparcl` / :mod:`.ddr`: SparCL as published (Wang et al., NeurIPS 2022): task-aware dynamic weight masks,
  dynamic gradient masks, dynamic data removal by per-stage forgetting counts;
- :mod:`.sparcl_update`: SparCL-style dynamic weight and gradient masks on the task update, with ownership;
- :mod:`.memory` / :mod:`.tfidf`: a product-key memory layer and sparse memory fine-tuning by TF-IDF slot ranking
  (Lin et al. 2025).

``make_sparse_learner(name, model, **options)`` builds any registered learner; ``list_sparse_learners()``.
"""

from . import dst, masked, sparcl, sparcl_update  # noqa: F401 - each module registers its learners
from .capacity import CapacityExhaustedError, CapacityWarning, TaskCapacity, task_capacity
from .guard import MaskedUpdate
from .learner import SparseConfig, SparseLearner
from .masked import MaskedConfig, MaskedFineTuner
from .masks import (
    change_scores,
    density_of,
    fisher_scores,
    gradient_scores,
    mask_overlap,
    random_scores,
    select_masks,
)
from .memory import MemoryConfig, ProductKeyMemory, SparseMemoryFinetuner, insert_memory
from .registry import (
    SPARSE_LEARNERS,
    list_sparse_learners,
    make_sparse_config,
    make_sparse_learner,
    register_sparse_learner,
)

__all__ = ["SPARSE_LEARNERS", "CapacityExhaustedError", "CapacityWarning", "TaskCapacity", "task_capacity",
           "MaskedConfig", "MaskedFineTuner", "MaskedUpdate", "MemoryConfig", "ProductKeyMemory",
           "SparseMemoryFinetuner", "insert_memory", "SparseConfig", "SparseLearner",
           "change_scores", "density_of", "fisher_scores", "gradient_scores", "list_sparse_learners", "mask_overlap",
           "make_sparse_config", "make_sparse_learner", "random_scores", "register_sparse_learner", "select_masks"]
