"""Reference implementations of the offline merge kernels: the straightforward composed tensor ops.

The fast kernels in :mod:`avalanche_merge.merging.offline` (chunked TIES with a radix-select trim threshold, running
MagMax) must give the same values as these (signed zeros aside); the tests check that on tie-heavy inputs and
``experiments/merge_speed.py`` times both in one run. Not part of the public API.
"""

from __future__ import annotations

import torch

from .steps import agreement, disjoint_mean, elect_sign


def kth_largest_magnitude_reference(t: torch.Tensor, k: int) -> torch.Tensor:
    """``k``-th largest ``|t|`` by ``torch.kthvalue`` on the whole flattened tensor (``1 <= k <= numel``)."""
    flat = t.reshape(-1).abs()
    return torch.kthvalue(flat, flat.numel() - k + 1).values


def ties_tensor_reference(tensors: list[torch.Tensor], thresholds: list[float | None], weights: list[float],
                          sign_method: str = "total", merge_func: str = "mean") -> torch.Tensor:
    """TIES on one parameter: trim ``|v| >= threshold`` (None keeps all), stack, elect sign, disjoint mean/sum."""
    stacked = torch.stack([v if thr is None else v * (v.abs() >= thr) for v, thr in zip(tensors, thresholds)])
    agree = agreement(stacked, elect_sign(stacked, sign_method))
    if any(x != 1.0 for x in weights):
        stacked = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    return disjoint_mean(stacked, agree) if merge_func == "mean" else (stacked * agree).sum(dim=0)


def magmax_tensor_reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per entry, the value of largest magnitude: the stack's max or min, whichever is larger in magnitude (an
    exact tie between ``+a`` and ``-a`` resolves to ``+a``)."""
    stacked = torch.stack(tensors)
    high, low = stacked.amax(dim=0), stacked.amin(dim=0)
    return torch.where(high + low >= 0, high, low)
