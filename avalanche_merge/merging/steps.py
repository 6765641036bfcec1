"""The small steps that offline merges are composed of (trim, drop, elect sign, disjoint mean).

Each works on one tensor, or on a stack ``(T, ...)`` of the same parameter from ``T`` task vectors. Magnitude
trims keep every entry at least as large as the ``k``-th largest (found exactly by :func:`kth_largest_magnitude`, a
radix select, several times faster than ``torch.kthvalue`` and the ``torch.topk`` of ``peft.utils.merge_utils``);
results equal peft's unless several entries tie exactly at the threshold, where all of them are kept.
"""

from __future__ import annotations

import sys

import torch

_RADIX_MIN = 1 << 14  # below this many entries torch.kthvalue is as fast
_BUCKETS = 1 << 15  # the top 16 bits of a float32 with the sign cleared


def check_density(density: float, name: str = "density") -> float:
    """Validate a kept fraction in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(density).__name__}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {density}")
    return float(density)


def top_magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``int(density * numel)`` entries of largest magnitude (ties at the threshold kept)."""
    k = int(check_density(density) * t.numel())
    if k == 0:
        return torch.zeros_like(t, dtype=torch.bool)
    mag = t.abs()
    if k == t.numel():
        return torch.ones_like(t, dtype=torch.bool)
    return mag >= kth_largest_magnitude(t, k)


def kth_largest_magnitude(t: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of ``|t|`` (``1 <= k <= numel``), exactly, as a 0-d tensor of ``t``'s dtype.

    For float32 CPU tensors a radix select: the bit pattern of a non-negative float32 orders like the float, so a
    histogram of the top 16 bits (sign cleared) names the bucket holding the ``k``-th largest, and only that
    bucket's entries (a few thousandths of a Gaussian tensor) go through ``torch.kthvalue``. Same value as
    ``torch.kthvalue(|t|, numel - k + 1)`` (NaN, which task vectors never hold, counts as the largest in both).
    """
    flat = t.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if t.dtype != torch.float32 or t.device.type != "cpu" or sys.byteorder != "little" or n < _RADIX_MIN:
        return torch.kthvalue(flat.abs(), n - k + 1).values
    mag = flat.abs()
    key = mag.view(torch.int16)[1::2].contiguous()  # the high half of each little-endian float32 (>= 0)
    hist = torch.bincount(key, minlength=_BUCKETS)
    from_top = hist.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))  # first bucket (from the top) reaching k entries
    bucket = _BUCKETS - 1 - position
    above = int(from_top[position]) - int(hist[bucket])  # entries in strictly higher buckets
    candidates = _select_sparse(mag, key == bucket)
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values


def _select_sparse(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask]`` for a sparse mask (1-D, contiguous): ``nonzero`` scans the mask 8 bytes at a time (as
    int64 words), several times faster than on bools; the few words with a hit are then filtered exactly."""
    n = mask.numel() - mask.numel() % 8
    words = mask[:n].view(torch.int64).nonzero().squeeze(1)
    block_values, block_mask = values[:n].view(-1, 8)[words], mask[:n].view(-1, 8)[words]
    return torch.cat([block_values[block_mask], values[n:][mask[n:]]])


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude, zero the rest (TIES' trim step)."""
    return t * top_magnitude_mask(t, density)


def global_magnitude_threshold(tensors: list[torch.Tensor], density: float) -> float:
    """Magnitude of the ``int(density * N)``-th largest entry over several tensors (model-wide trimming)."""
    k = int(check_density(density) * sum(t.numel() for t in tensors))
    if k == 0:
        return float("inf")
    return float(kth_largest_magnitude(torch.cat([t.reshape(-1) for t in tensors]), k))


def drop_and_rescale(t: torch.Tensor, density: float, *, mask: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024): keep each entry with probability ``density`` and divide by ``density``.

    Args:
        t: the tensor.
        density: keep probability in (0, 1].
        mask: an explicit keep mask (same shape); drawn from ``generator`` when None.
        generator: torch generator of the Bernoulli draw (seeded for reproducibility).
    """
    density = check_density(density)
    if mask is None:
        mask = torch.rand(t.shape, generator=generator, device=t.device) < density
    elif mask.shape != t.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the tensor has {tuple(t.shape)}")
    return t * mask.to(t.dtype) / density


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' sign election over ``(T, ...)``: +1/-1 per entry by summed value ("total") or sign count
    ("frequency"); zero sums elect +1, as in peft."""
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority sign method must be 'total' or 'frequency', got {method!r}")
    return torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)


def agreement(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Boolean ``(T, ...)`` mask of the entries whose sign equals the elected one (zeros never agree)."""
    return stacked.sign() == sign


def disjoint_mean(values: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over the agreeing task vectors divided by their count (TIES' disjoint merge)."""
    return (values * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
