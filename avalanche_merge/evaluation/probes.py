"""Fixed probe samples for metrics that run the model on their own inputs (drift, held-out accuracy).

Items are read one by one with the dataset's evaluation transforms (``dataset.eval()`` for Avalanche datasets)
and stacked, without a ``DataLoader``: creating a ``DataLoader`` iterator draws from the global torch RNG, which
would shift the training shuffles that follow and change the run being measured.
"""

from __future__ import annotations

from typing import Any

import torch


def fixed_indices(n: int, max_samples: int, seed: int) -> list[int]:
    """``min(n, max_samples)`` sorted indices of ``range(n)``, drawn with a private generator seeded by ``seed``."""
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
    if n <= max_samples:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values.tolist()


def probe_tensors(dataset: Any, max_samples: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A fixed sample of ``dataset`` as stacked tensors ``(x, y[, t, ...])`` (one per item field).

    Raises:
        ValueError: the dataset is empty or its items are not ``(x, y, ...)`` sequences of tensors/numbers.
    """
    ds = dataset.eval() if hasattr(dataset, "eval") and callable(dataset.eval) else dataset
    if len(ds) == 0:
        raise ValueError("cannot probe an empty dataset")
    items = [ds[i] for i in fixed_indices(len(ds), max_samples, seed)]
    if not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
        raise ValueError(f"probe items must be (x, y, ...) sequences, got {type(items[0]).__name__}")
    return tuple(torch.stack([torch.as_tensor(it[k]) for it in items]) for k in range(len(items[0])))
