"""Representation similarity: linear CKA and SVCCA, and the features of named layers on a probe set.

- Linear CKA (Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited",
  ICML 2019): for column-centred features ``X`` (``n x p``) and ``Y`` (``n x q``) of the same ``n`` inputs,
  ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. It is 1 for identical representations, invariant to
  orthogonal transforms and isotropic scaling of either side, and not invariant to general invertible linear
  maps. ``debiased=True`` uses the unbiased HSIC estimator (Song et al., JMLR 2012), as Nguyen, Raghu & Kornblith
  (ICLR 2021) do, which removes the upward bias of CKA when ``n`` is small relative to the width.
- SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein, NeurIPS 2017): keep each side's leading singular directions
  holding ``energy`` of the variance, then the mean canonical correlation between the two reduced subspaces.

:func:`layer_features` runs a model on a batch of inputs and returns the pooled outputs of named modules
(forward hooks; the model's training mode and the global RNG are left as they were). Pure torch, no Avalanche.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

POOLS = ("mean", "cls", "flatten")


def _features(x: Any, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be an n x features matrix, got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def _pair(x: Any, y: Any, min_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _features(x, "x"), _features(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must hold the same inputs (rows), got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < min_n:
        raise ValueError(f"need at least {min_n} inputs, got {a.shape[0]}")
    return a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)


def _unbiased_hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC of two Gram matrices (diagonals are zeroed here)."""
    n = k.shape[0]
    k = k - torch.diag(torch.diagonal(k))
    l_ = l_ - torch.diag(torch.diagonal(l_))
    ones = torch.ones(n, dtype=k.dtype)
    kl = k @ l_
    term = torch.trace(kl) + (ones @ k @ ones) * (ones @ l_ @ ones) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (ones @ kl @ ones)
    return term / (n * (n - 3))


def linear_cka(x: Any, y: Any, *, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same inputs (rows), in [0, 1] (debiased: may dip below 0).

    Args:
        x: ``n x p`` features (tensor or array).
        y: ``n x q`` features of the same ``n`` inputs.
        debiased: use the unbiased HSIC estimator (needs ``n >= 4``).

    Returns:
        The similarity, or ``nan`` when either representation is constant over the inputs.

    Raises:
        ValueError: not matrices, different row counts, too few rows, NaN/Inf.
    """
    a, b = _pair(x, y, 4 if debiased else 2)
    if debiased:
        k, l_ = a @ a.T, b @ b.T
        hxy, hxx, hyy = _unbiased_hsic(k, l_), _unbiased_hsic(k, k), _unbiased_hsic(l_, l_)
        denom = (hxx * hyy).sqrt() if hxx > 0 and hyy > 0 else torch.tensor(0.0, dtype=torch.float64)
        return float(hxy / denom) if denom > 0 else math.nan
    if a.shape[0] < min(a.shape[1], b.shape[1]):  # Gram form is cheaper when there are fewer inputs than features
        k, l_ = a @ a.T, b @ b.T
        num, nx, ny = (k * l_).sum(), k.norm(), l_.norm()
    else:
        num, nx, ny = (b.T @ a).pow(2).sum(), (a.T @ a).norm(), (b.T @ b).norm()
    if nx == 0 or ny == 0:
        return math.nan
    return float((num / (nx * ny)).clamp(0.0, 1.0))


def _leading(a: torch.Tensor, energy: float) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    power = s.pow(2)
    if power.sum() <= 0:
        return u[:, :0]
    cum = torch.cumsum(power, 0) / power.sum()
    k = int((cum < energy - 1e-12).sum()) + 1
    return u[:, :k]


def svcca(x: Any, y: Any, *, energy: float = 0.99) -> float:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation after keeping ``energy`` of each side's
    variance (their Sec. 2 keeps 99%).

    The reduced subspaces are spanned by the leading left singular vectors of the centred features; canonical
    correlations between them are the singular values of ``U_x^T U_y`` (Björck & Golub 1973). Returns ``nan``
    when a side is constant.

    Raises:
        ValueError: ``energy`` outside (0, 1], or the inputs as in :func:`linear_cka`.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    a, b = _pair(x, y, 2)
    ua, ub = _leading(a, energy), _leading(b, energy)
    k = min(ua.shape[1], ub.shape[1])
    if k == 0:
        return math.nan
    if k >= a.shape[0] - 1:
        raise ValueError(f"SVCCA keeps {k} directions from only {a.shape[0]} inputs: canonical correlations are "
                         f"trivially 1; use more probe inputs than kept directions (or a lower energy)")
    return float(torch.linalg.svdvals(ua.T @ ub).clamp(0.0, 1.0)[:k].mean())


def pool_output(out: Any, pool: str = "mean") -> torch.Tensor:
    """One vector per input from a module's output: tokens ``(B, N, D)`` are averaged (``mean``), the first one
    taken (``cls``) or flattened; conv maps ``(B, C, H, W)`` are averaged over space (``mean``/``cls``) or
    flattened; ``(B, D)`` is kept. A tuple output uses its first element. The batch must be dim 0."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot pool a module output of type {type(out).__name__}")
    out = out.detach()
    if out.ndim == 2 or pool == "flatten":
        return out.reshape(out.shape[0], -1)
    if out.ndim == 3:
        return out.mean(1) if pool == "mean" else out[:, 0]
    return out.reshape(out.shape[0], out.shape[1], -1).mean(-1)


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of the longest ``nn.ModuleList`` in ``model`` (a transformer's layers: TinyViT's
    ``blocks``, open_clip's ``transformer.resblocks``, a Hugging Face encoder's ``layer``).

    Raises:
        ValueError: the model has no non-empty ``nn.ModuleList``.
    """
    best: tuple[int, str] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 1 and (best is None or len(m) > best[0]):
            best = (len(m), name)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks; name the layers to probe")
    return [f"{best[1]}.{i}" if best[1] else str(i) for i in range(best[0])]


def layer_features(model: nn.Module, inputs: torch.Tensor | Sequence[Any], layers: Sequence[str], *,
                   pool: str = "mean", batch_size: int = 256, device: torch.device | str | None = None,
                   forward: Callable[..., Any] | None = None) -> dict[str, torch.Tensor]:
    """Pooled outputs of the modules ``layers`` for ``inputs``, as float32 CPU ``n x d`` tensors.

    Args:
        model: the network (evaluated in eval mode under ``torch.no_grad``; its mode is restored).
        inputs: a tensor batch ``(n, ...)``, or a sequence of batches: tensors, or tuples ``(x, *rest)`` whose
            ``rest`` (e.g. task labels) is passed on to ``forward``.
        layers: module names (``model.named_modules()``), e.g. from :func:`find_blocks`.
        pool: how token or spatial outputs become one vector, see :func:`pool_output`.
        batch_size: inputs per forward pass when ``inputs`` is one tensor.
        device: where to run (default: the model's parameters' device).
        forward: ``forward(model, x, *rest)``; default ``model(x)``.

    A module that runs several times in one forward pass contributes its last call (a routed model first embeds
    the input with its adapters off, then runs the routed pass through the same blocks).

    Raises:
        ValueError: an unknown layer name (the message lists some valid ones) or a layer that never ran.
    """
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        some = [n for n in modules if n][:8]
        raise ValueError(f"model has no module {missing[0]!r}; modules include {some}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    batches = list(torch.split(inputs, batch_size)) if isinstance(inputs, torch.Tensor) else list(inputs)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    last: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, _inp, output):
            last[name] = pool_output(output, pool).float().cpu()  # several calls per pass: the last one counts
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                x, *rest = batch if isinstance(batch, (tuple, list)) else (batch,)
                x = x.to(device)
                rest = [r.to(device) if isinstance(r, torch.Tensor) else r for r in rest]
                last.clear()
                forward(model, x, *rest) if forward is not None else model(x)
                for name, value in last.items():
                    out[name].append(value)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    empty = [n for n, v in out.items() if not v]
    if empty:
        raise ValueError(f"layer {empty[0]!r} did not run in the forward pass")
    feats = {n: torch.cat(v) for n, v in out.items()}
    n_inputs = sum(len(b[0] if isinstance(b, (tuple, list)) else b) for b in batches)
    for name, f in feats.items():
        if f.shape[0] != n_inputs:
            raise ValueError(f"layer {name!r} gave {f.shape[0]} rows for {n_inputs} inputs: its last call in a "
                             f"forward pass saw part of the batch (a routed model runs each task's inputs "
                             f"separately); probe a layer that sees the whole batch")
    return feats


__all__ = ["POOLS", "find_blocks", "layer_features", "linear_cka", "pool_output", "svcca"]
