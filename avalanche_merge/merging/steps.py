"""The small steps that offline merges are composed of (trim, drop, elect sign, disjoint mean).

Each works on one tensor, or on a stack ``(T, ...)`` of the same parameter from ``T`` task vectors. Magnitude
trims keep every entry at least as large as the ``k``-th largest (``torch.kthvalue``, about twice as fast as the
``torch.topk`` of ``peft.utils.merge_utils``); results equal peft's unless several entries tie exactly at the
threshold, where all of them are kept.
"""

from __future__ import annotations

import torch


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
    return mag >= _kth_largest(mag.reshape(-1), k)


def _kth_largest(flat_abs: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(flat_abs, flat_abs.numel() - k + 1).values


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude, zero the rest (TIES' trim step)."""
    return t * top_magnitude_mask(t, density)


def global_magnitude_threshold(tensors: list[torch.Tensor], density: float) -> float:
    """Magnitude of the ``int(density * N)``-th largest entry over several tensors (model-wide trimming)."""
    k = int(check_density(density) * sum(t.numel() for t in tensors))
    if k == 0:
        return float("inf")
    flat = torch.cat([t.abs().reshape(-1) for t in tensors])
    return float(_kth_largest(flat, k))


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
