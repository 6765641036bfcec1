"""Held-out probe tasks for the offline benchmarks: test images under domain transformations never trained on.

Used by the retention metric (Roth et al., NeurIPS 2024 D&B): the accuracy on tasks that are never trained on
measures how much of the pretrained model's ability survives adaptation. For the offline benchmarks such tasks
are the benchmark's own test pool under other registered domain transformations (``identity``: the clean digits
the backbone was pretrained on).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import tensor_classification_dataset
from .transforms import apply_domain


def domain_held_out(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, domains: Sequence[str], per_domain: int,
                    seed: int) -> dict:
    """``{domain: dataset}``: a class-balanced sample of ``per_domain`` images of ``pool`` under each domain.

    The sample is drawn with a private generator (``seed``), the same images for every domain, task label 0.

    Raises:
        ValueError: ``per_domain`` is not a positive multiple of 10, or the pool has too few images of a class.
    """
    if per_domain < 10 or per_domain % 10:
        raise ValueError(f"per_domain must be a positive multiple of 10 (class-balanced), got {per_domain}")
    g = torch.Generator().manual_seed(seed + 7919)  # independent of the benchmark's own draws
    per = per_domain // 10
    picks = []
    for c in range(10):
        cls = pool[y[pool] == c]
        if cls.numel() < per:
            raise ValueError(f"held-out sampling needs {per} test images of class {c}, the pool has {cls.numel()}")
        picks.append(cls[torch.randperm(cls.numel(), generator=g)[:per]])
    sel = torch.cat(picks).sort().values
    return {d: tensor_classification_dataset(apply_domain(d, x[sel]), y[sel], 0) for d in domains}
