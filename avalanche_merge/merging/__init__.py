"""Task-vector merging, pure torch (no Avalanche import): usable on any pair of checkpoints.

Continual mergers (OPCM, ...), TSV-M, Iso-C and the Avalanche merge plugin are not implemented yet.
"""

from .offline import average, breadcrumbs, dare, magmax, task_arithmetic, ties
from .task_vector import TaskVector, check_task_vectors, cosine_similarity_matrix

__all__ = ["TaskVector", "average", "breadcrumbs", "check_task_vectors", "cosine_similarity_matrix", "dare",
           "magmax", "task_arithmetic", "ties"]
