"""Which weights a task may update: importance scores and top-k mask selection (pure torch).

Scores (one tensor per parameter, larger = more important for the new task):

- :func:`gradient_scores`: ``|sum of mini-batch gradients|`` at the start of the task (SIFT: Song et al.,
  "Sparse is Enough in Fine-tuning Pre-trained Large Language Models", ICML 2024);
- :func:`fisher_scores`: accumulated squared mini-batch gradients, the empirical Fisher information's diagonal
  (Kirkpatrick et al. 2017 use it as EWC's importance; per-batch rather than per-sample gradients here, which is
  cheaper and a common approximation);
- :func:`change_scores`: ``|theta_after - theta_before|`` after a short dense fine-tuning phase (LT-SFT: Ansell et
  al., "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL 2022);
- :func:`random_scores`: seeded uniform noise (the random-mask control).

:func:`select_masks` keeps the top ``density`` fraction per tensor or globally, never choosing entries that are
``frozen`` (owned by earlier tasks: PackNet's idea, Mallya & Lazebnik, CVPR 2018, but every task's weights stay in
use at test time, so no task label is needed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_range

SCOPES = ("tensor", "global")


def check_density(density: float) -> None:
    """Raise ``ValueError`` unless ``density`` is in (0, 1]."""
    check_range("density", density, 0.0, 1.0, low_open=True)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of ``scores`` (ties in ``torch.topk``'s order)."""
    return _topk_flat(scores.flatten(), k, True).view_as(scores)


def select_masks(scores: Mapping[str, torch.Tensor], density: float, *, scope: str = "tensor",
                 frozen: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks of the entries to update: the top ``density`` fraction of ``scores``.

    Args:
        scores: per-parameter importance (any real tensors; NaN counts as least important).
        density: fraction of entries to select, in (0, 1]: ``round(density * numel)`` per tensor
            (``scope="tensor"``) or of all entries together (``"global"``).
        scope: ``"tensor"`` or ``"global"``.
        frozen: per-parameter bool masks of entries that must not be selected (fewer than ``k`` free entries:
            all free ones are selected).

    Returns:
        ``{name: bool mask}`` with the shapes of ``scores``.
    """
    check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    frozen = frozen or {}
    free_scores = {}
    for name, s in scores.items():
        s = torch.nan_to_num(s.detach().float(), nan=-float("inf"))
        if name in frozen:
            if frozen[name].shape != s.shape:
                raise ValueError(f"frozen mask of {name!r} has shape {tuple(frozen[name].shape)}, "
                                 f"scores {tuple(s.shape)}")
            s = s.masked_fill(frozen[name].to(s.device), -float("inf"))
        free_scores[name] = s
    if scope == "tensor":
        masks = {}
        for name, s in free_scores.items():
            free = int((s > -float("inf")).sum()) if name in frozen else s.numel()
            masks[name] = topk_mask(s, min(round(density * s.numel()), free))
        return masks
    flat = torch.cat([s.flatten() for s in free_scores.values()])
    k = min(round(density * flat.numel()), int((flat > -float("inf")).sum()))
    chosen = topk_mask(flat, k)
    masks, start = {}, 0
    for name, s in free_scores.items():
        masks[name] = chosen[start:start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def pick_among(scores: Mapping[str, torch.Tensor], allowed: Mapping[str, torch.Tensor], counts: Mapping[str, int] | int,
               *, largest: bool = True) -> dict[str, torch.Tensor]:
    """Masks of the ``counts`` entries with the largest (or smallest) ``scores`` among the ``allowed`` ones.

    Args:
        scores: per-parameter scores (NaN counts as the least preferred).
        allowed: per-parameter bool masks of the candidates.
        counts: per tensor (a mapping) or over all tensors together (an int); fewer candidates: all of them.
        largest: pick the largest scores (else the smallest).

    Returns:
        ``{name: bool mask}``; ties are broken by ``torch.topk`` (deterministic on CPU).
    """
    fill = -float("inf") if largest else float("inf")  # never picked before an allowed entry
    worst = torch.finfo(torch.float32).min if largest else torch.finfo(torch.float32).max  # NaN: after real scores
    masked = {n: torch.nan_to_num(s.float(), nan=worst).masked_fill(~allowed[n], fill) for n, s in scores.items()}
    if isinstance(counts, Mapping):
        out = {}
        for n, s in masked.items():
            k = min(counts[n], int(allowed[n].sum()))
            out[n] = _topk_flat(s.flatten(), k, largest).view_as(s)
        return out
    flat = torch.cat([s.flatten() for s in masked.values()])
    k = min(counts, int(sum(int(a.sum()) for a in allowed.values())))
    chosen = _topk_flat(flat, k, largest)
    out, start = {}, 0
    for n, s in masked.items():
        out[n] = chosen[start:start + s.numel()].view_as(s)
        start += s.numel()
    return out


def _topk_flat(flat: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, largest=largest, sorted=False).indices] = True
    return mask


Loss = Callable[[nn.Module, object], torch.Tensor]


def cross_entropy_loss(model: nn.Module, batch) -> torch.Tensor:
    """``cross_entropy(model(x), y)`` for a batch ``(x, y, ...)``."""
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


def _accumulate(model: nn.Module, params: Mapping[str, nn.Parameter], batches: Iterable, loss: Loss,
                reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for batch in batches:
            grads = torch.autograd.grad(loss(model, batch), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    total[name] += reduce(g.detach().float())
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return total


def gradient_scores(model: nn.Module, params: Mapping[str, nn.Parameter], batches: Iterable,
                    loss: Loss = cross_entropy_loss) -> dict[str, torch.Tensor]:
    """``|sum_b grad_b|``: magnitude of the task's accumulated gradient at the current weights (SIFT)."""
    summed = _accumulate(model, params, batches, loss, lambda g: g)
    return {n: s.abs() for n, s in summed.items()}


def fisher_scores(model: nn.Module, params: Mapping[str, nn.Parameter], batches: Iterable,
                  loss: Loss = cross_entropy_loss) -> dict[str, torch.Tensor]:
    """``sum_b grad_b^2``: the diagonal empirical Fisher information from mini-batch gradients."""
    return _accumulate(model, params, batches, loss, lambda g: g * g)


def change_scores(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|after - before|`` per parameter (LT-SFT's selection after a dense phase)."""
    if set(before) != set(after):
        raise ValueError(f"before/after parameter names differ: {sorted(set(before) ^ set(after))[:4]}")
    return {n: (after[n].detach().float() - before[n].detach().float()).abs() for n in before}


def random_scores(params: Mapping[str, torch.Tensor], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded uniform scores (a random mask of the requested density)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in params.items()}


def mask_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Jaccard overlap ``|a & b| / |a | b|`` of two mask sets over their common parameters (0 if both empty)."""
    inter = union = 0
    for name in set(a) & set(b):
        inter += int((a[name] & b[name]).sum())
        union += int((a[name] | b[name]).sum())
    return inter / union if union else 0.0


def applied_fraction(masks: Mapping[str, torch.Tensor], grad_masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the active entries (``masks``) whose gradient is applied (also in ``grad_masks``); 0 when none
    is active. SparCL's dynamic gradient masking keeps it near ``1 - gradient_sparsity``."""
    active = sum(int(m.sum()) for m in masks.values())
    applied = sum(int((m & grad_masks[n]).sum()) for n, m in masks.items())
    return applied / active if active else 0.0


def density_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of ``True`` entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 0.0
