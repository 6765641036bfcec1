"""Sparse fine-tuning for continual learning (pure torch; no Avalanche import).

- :mod:`.masks`: importance scores (gradient, Fisher, weight change, random) and top-k mask selection;
- :mod:`.guard`: :class:`MaskedUpdate`, masked weights bit-identical through any optimizer step;
- :mod:`.learner` / :mod:`.masked`: the sparse-learner protocol and :class:`MaskedFineTuner` (a mask per task).

``make_sparse_learner(name, model, **options)`` builds any registered learner; ``list_sparse_learners()``.
"""

from . import masked  # noqa: F401 - registers the learner
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
from .registry import (
    SPARSE_LEARNERS,
    list_sparse_learners,
    make_sparse_config,
    make_sparse_learner,
    register_sparse_learner,
)

__all__ = ["SPARSE_LEARNERS", "MaskedConfig", "MaskedFineTuner", "MaskedUpdate", "SparseConfig", "SparseLearner",
           "change_scores", "density_of", "fisher_scores", "gradient_scores", "list_sparse_learners", "mask_overlap",
           "make_sparse_config", "make_sparse_learner", "random_scores", "register_sparse_learner", "select_masks"]
