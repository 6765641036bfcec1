"""Task-vector merging, pure torch (no Avalanche import): usable on any pair of checkpoints.

- :class:`TaskVector` and helpers (``task_vector.py``);
- offline merges (``offline.py``: task arithmetic, averaging, TIES, DARE, Breadcrumbs, MagMax; ``spectral.py``:
  TSV-M, Iso-C, Iso-CTS);
- continual mergers (``continual.py``; OPCM in ``opcm.py``);
- streaming merges of safetensors checkpoints (``streaming.py``);
- registries and ``make_merger`` (``registry.py``).
"""

from .continual import (
    ContinualAverage,
    ContinualEMA,
    ContinualMerger,
    ContinualTaskArithmetic,
    ContinualTIES,
    MagMax,
    OfflineMerger,
    merge_sequentially,
)
from .offline import average, breadcrumbs, dare, magmax, task_arithmetic, ties
from .opcm import OPCM, linear_weight_names, opcm_project, opcm_project_full_svd, split_rank
from .registry import CONTINUAL_MERGERS, OFFLINE_MERGES, list_mergers, make_merger
from .spectral import iso_c, iso_cts, tsv
from .streaming import merge_safetensors
from .task_vector import TaskVector, check_task_vectors, cosine_similarity_matrix

__all__ = [
    "CONTINUAL_MERGERS", "OFFLINE_MERGES", "OPCM", "ContinualAverage", "ContinualEMA", "ContinualMerger",
    "ContinualTIES", "ContinualTaskArithmetic", "MagMax", "OfflineMerger", "TaskVector", "average", "breadcrumbs",
    "check_task_vectors", "cosine_similarity_matrix", "dare", "iso_c", "iso_cts", "linear_weight_names",
    "list_mergers", "magmax", "make_merger", "merge_safetensors", "merge_sequentially", "opcm_project",
    "opcm_project_full_svd", "split_rank", "task_arithmetic", "ties", "tsv",
]
