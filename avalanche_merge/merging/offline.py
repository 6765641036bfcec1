"""Offline merges: many task vectors in, one merged task vector out.

Every function takes a list of :class:`TaskVector` with identical keys and shapes and returns a TaskVector;
apply it to the pretrained weights with ``merged.apply_to(pretrained, scaling=lam)``. Per-task ``weights``
multiply each task vector before combining (as ``peft.utils.merge_utils``).

- :func:`average`: weight averaging (model soups, Wortsman et al., ICML 2022).
- :func:`task_arithmetic`: weighted sum (Ilharco et al., ICLR 2023).
- :func:`ties`: trim, elect sign, disjoint mean (Yadav et al., "TIES-Merging", NeurIPS 2023).
- :func:`dare`: drop-and-rescale, then task arithmetic or TIES (Yu et al., "Language Models are Super Mario",
  ICML 2024).
- :func:`breadcrumbs`: drop both the largest-magnitude outliers and the smallest entries of each tensor, then
  sum (Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024).
- :func:`magmax`: per entry, the value of largest magnitude across tasks (Marczak et al., "MagMax", ECCV 2024).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from .steps import (
    check_density,
    drop_and_rescale,
    global_magnitude_threshold,
    kth_largest_magnitude,
)
from .task_vector import TaskVector, check_scalar, check_task_vectors


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [check_scalar(f"weights[{i}]", x) for i, x in enumerate(weights)]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} task vectors")
    return w


# 256 KiB of fp32: a chunk and its accumulator stay in cache across the T task vectors. A multiple of 32: torch
# sums a (T, m) block over T in task order for the first 32 * (m // 32) columns and the rest in another order, so
# chunk boundaries at multiples of 32 keep the chunked sums bit-identical to whole-tensor ones.
_CHUNK = 1 << 16


def _step(t: torch.Tensor) -> int:
    """Cache-sized chunks on CPU; one chunk on GPUs, where kernel launches cost more than cache misses."""
    return _CHUNK if t.device.type == "cpu" else max(t.numel(), 1)


def _chunks(t: torch.Tensor) -> range:
    return range(0, t.numel(), _step(t))


def weighted_sum(tensors: Sequence[torch.Tensor], w: Sequence[float]) -> torch.Tensor:
    """``sum_t w_t x_t``, chunk by chunk: each input is read once, the output written once, no ``(T, ...)``
    stack is built."""
    out = torch.empty_like(tensors[0])
    flat, inputs, step = out.view(-1), [x.reshape(-1) for x in tensors], _step(out)
    uniform = all(x == w[0] for x in w)  # add_ with alpha=1 is about twice as fast as with another alpha
    for start in _chunks(out):
        acc = flat[start:start + step]
        if uniform:
            acc.copy_(inputs[0][start:start + step])
        else:
            torch.mul(inputs[0][start:start + step], w[0], out=acc)
        for x, wt in zip(inputs[1:], w[1:]):
            acc.add_(x[start:start + step], alpha=1.0 if uniform else wt)
        if uniform and w[0] != 1.0:
            acc.mul_(w[0])
    return out


def task_arithmetic(task_vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
    """``sum_t w_t tau_t``."""
    tvs = check_task_vectors(task_vectors)
    w = _weights(weights, len(tvs))
    return TaskVector._trusted({k: weighted_sum([tv[k] for tv in tvs], w) for k in tvs[0]})


def average(task_vectors: Sequence[TaskVector]) -> TaskVector:
    """``mean_t tau_t``; applied with scaling 1 it gives the weight average of the fine-tuned models."""
    tvs = check_task_vectors(task_vectors)
    return task_arithmetic(tvs, [1.0 / len(tvs)] * len(tvs))


def _trimmer(tvs: list[TaskVector], density: float, trim_scope: str) -> list:
    """One ``threshold(name, tensor) -> float | None`` per task vector: entries with ``|v| >= threshold`` survive
    the trim (None keeps all); model-wide thresholds are computed once, up front."""
    if trim_scope == "tensor":
        return [lambda _, v: _tensor_threshold(v, density)] * len(tvs)
    if trim_scope == "model":
        thresholds = [global_magnitude_threshold([v for _, v in tv.items()], density) for tv in tvs]
        return [lambda _, v, thr=thr: thr for thr in thresholds]
    raise ValueError(f"trim_scope must be 'tensor' or 'model', got {trim_scope!r}")


def _tensor_threshold(v: torch.Tensor, density: float) -> float | None:
    k = int(density * v.numel())
    if k == v.numel():
        return None
    return float("inf") if k == 0 else float(kth_largest_magnitude(v, k))


def _ties_merge(tvs: list[TaskVector], w: list[float], sign_method: str, merge_func: str = "mean",
                trims: list | None = None) -> TaskVector:
    """Trim (optional: ``trims`` from :func:`_trimmer`), elect sign, disjoint mean or sum; one parameter at a time
    (memory: one chunk of each of the T tensors, never T trimmed copies of the model)."""
    if merge_func not in ("mean", "sum"):
        raise ValueError(f"merge_func must be 'mean' or 'sum', got {merge_func!r}")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority sign method must be 'total' or 'frequency', got {sign_method!r}")
    merged = {}
    for k in tvs[0]:
        tensors = [tv[k] for tv in tvs]
        thresholds = [None] * len(tvs) if trims is None else [trims[i](k, v) for i, v in enumerate(tensors)]
        merged[k] = ties_tensor(tensors, thresholds, w, sign_method, merge_func)
    return TaskVector._trusted(merged)


def ties_tensor(tensors: list[torch.Tensor], thresholds: list[float | None], w: list[float],
                sign_method: str = "total", merge_func: str = "mean") -> torch.Tensor:
    """TIES on one parameter, chunk by chunk (a ``(T, chunk)`` buffer stays in cache; no ``(T, ...)`` stack).

    Per chunk: the trim is one ``hardshrink`` per task (``|v| > nextafter(thr, 0)``, i.e. ``|v| >= thr`` in
    float32); with the elected sign, one ``clamp`` to ``[0, inf)`` or ``(-inf, 0]`` keeps exactly the agreeing
    entries, and their count is ``|sum_t sign|``. Same values as
    :func:`~avalanche_merge.merging.reference.ties_tensor_reference` (a zero may come out as ``-0.0`` there and
    ``+0.0`` here).
    """
    out = torch.empty_like(tensors[0])
    flat_out, inputs, n, t = out.view(-1), [x.reshape(-1) for x in tensors], out.numel(), len(tensors)
    step = min(_step(out), max(n, 1))
    buf, scratch = torch.empty(2, t * step, dtype=out.dtype, device=out.device)
    zero, low_open, high_open = (torch.full((step,), v, dtype=out.dtype, device=out.device)
                                 for v in (0.0, float("-inf"), float("inf")))
    lambdas = [None if thr is None else _shrink_level(thr) for thr in thresholds]
    weights = None if all(x == 1.0 for x in w) else torch.tensor(w, dtype=out.dtype, device=out.device).view(-1, 1)
    for start in _chunks(out):
        m = min(step, n - start)
        values, signs = buf[:t * m].view(t, m), scratch[:t * m].view(t, m)
        for row, x, lam in zip(values, inputs, lambdas):
            if lam is None:
                row.copy_(x[start:start + m])
            else:
                torch.nn.functional.hardshrink(x[start:start + m], lam, out=row)
        score = values.sum(dim=0) if sign_method == "total" else torch.sign(values, out=signs).sum(dim=0)
        positive = score >= 0  # the elected sign (a zero score elects +1, as peft)
        low = torch.where(positive, zero[:m], low_open[:m])
        torch.clamp(values, min=low, max=torch.where(positive, high_open[:m], zero[:m]), out=values)
        target = flat_out[start:start + m]
        if merge_func == "mean":
            count = torch.sign(values, out=signs).sum(dim=0).abs_().clamp_(min=1)
        if weights is not None:
            values.mul_(weights)
        torch.sum(values, dim=0, out=target)
        if merge_func == "mean":
            target.div_(count)
    return out


def _shrink_level(threshold: float) -> float:
    """The float32 just below ``threshold`` (towards 0): ``|v| > level`` iff ``|v| >= threshold`` in float32."""
    thr = torch.tensor(threshold, dtype=torch.float32)
    return float(torch.nextafter(thr, torch.zeros_like(thr)))


def ties(task_vectors: Sequence[TaskVector], *, density: float = 0.2, sign_method: str = "total",
         trim_scope: str = "tensor", weights: Sequence[float] | None = None, merge_func: str = "mean") -> TaskVector:
    """TIES-Merging.

    Args:
        task_vectors: the task vectors.
        density: fraction of entries kept by the magnitude trim, in (0, 1].
        sign_method: ``"total"`` (sign of the summed values, the paper's) or ``"frequency"`` (majority count).
        trim_scope: ``"tensor"`` keeps the top fraction of each tensor (as peft); ``"model"`` of the whole task
            vector (as the paper's reference code).
        weights: per-task weights applied after the sign election (as peft).
        merge_func: ``"mean"`` (the paper's disjoint mean) or ``"sum"`` (disjoint sum, as FusionBench's continual
            TIES baseline).
    """
    tvs = check_task_vectors(task_vectors)
    check_density(density)
    return _ties_merge(tvs, _weights(weights, len(tvs)), sign_method, merge_func, _trimmer(tvs, density, trim_scope))


def dare(task_vectors: Sequence[TaskVector], *, density: float = 0.5, combine: str = "task_arithmetic",
         sign_method: str = "total", weights: Sequence[float] | None = None, seed: int = 0,
         masks: Sequence[dict[str, torch.Tensor]] | None = None) -> TaskVector:
    """DARE: drop each entry with probability ``1 - density`` and rescale by ``1 / density``, then combine.

    Args:
        task_vectors: the task vectors.
        density: keep probability in (0, 1].
        combine: ``"task_arithmetic"`` (DARE-linear) or ``"ties"`` (DARE-TIES: sign election and disjoint mean
            on the rescaled vectors, no further trimming).
        sign_method: TIES sign election method for ``combine="ties"``.
        weights: per-task weights.
        seed: seed of the Bernoulli masks. Each (task, parameter) pair draws from its own generator seeded from
            ``seed``, the task index and the parameter name, so a streaming merge gives the same result.
        masks: explicit keep masks, one ``{name: bool tensor}`` per task vector (overrides ``seed``).
    """
    tvs = check_task_vectors(task_vectors)
    check_density(density)
    if combine not in ("task_arithmetic", "ties"):
        raise ValueError(f"combine must be 'task_arithmetic' or 'ties', got {combine!r}")
    if masks is not None and len(masks) != len(tvs):
        raise ValueError(f"got {len(masks)} masks for {len(tvs)} task vectors")
    w = _weights(weights, len(tvs))
    merged = {}
    for k in tvs[0]:  # one parameter at a time: never T dropped copies of the model
        dropped = [drop_and_rescale(tv[k], density, mask=None if masks is None else masks[i][k],
                                    generator=_generator(seed, i, k, tv[k].device)) for i, tv in enumerate(tvs)]
        if combine == "task_arithmetic":
            merged[k] = weighted_sum(dropped, w)
        else:
            merged[k] = _ties_merge([TaskVector._trusted({k: d}) for d in dropped], w, sign_method)[k]
    return TaskVector._trusted(merged)


def _generator(seed: int, task: int, name: str, device: torch.device) -> torch.Generator:
    key = (int(seed) * 1_000_003 + task * 7_919 + zlib.crc32(name.encode())) % (2**63)
    return torch.Generator(device=device).manual_seed(key)


def breadcrumbs(task_vectors: Sequence[TaskVector], *, top_drop: float = 0.01, bottom_drop: float = 0.85,
                weights: Sequence[float] | None = None) -> TaskVector:
    """Model Breadcrumbs: in each tensor drop the ``top_drop`` fraction of largest magnitudes (outliers) and the
    ``bottom_drop`` fraction of smallest, then take the weighted sum.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more (nothing would be kept).
    """
    for name, value in (("top_drop", top_drop), ("bottom_drop", bottom_drop)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if top_drop + bottom_drop >= 1.0:
        raise ValueError(f"top_drop + bottom_drop must be < 1, got {top_drop} + {bottom_drop}")
    tvs = check_task_vectors(task_vectors)

    def crumbs(_, v: torch.Tensor) -> torch.Tensor:
        n, mag = v.numel(), v.abs()
        flat = mag.reshape(-1)
        keep = torch.ones_like(mag, dtype=torch.bool)
        low, high = int(bottom_drop * n), int(top_drop * n)  # entries dropped at each end (selection, no sort)
        if low:
            keep &= mag > torch.kthvalue(flat, low).values
        if high:
            keep &= mag < torch.kthvalue(flat, n - high + 1).values
        return v * keep

    w = _weights(weights, len(tvs))
    return TaskVector._trusted({k: weighted_sum([crumbs(k, tv[k]) for tv in tvs], w) for k in tvs[0]})


def magmax(task_vectors: Sequence[TaskVector]) -> TaskVector:
    """MagMax: for every entry, the task-vector value of largest magnitude (computed as the running maximum or
    minimum, whichever is larger in magnitude: two in-place passes per task; an exact tie between ``+a`` and
    ``-a`` resolves to ``+a``)."""
    tvs = check_task_vectors(task_vectors)
    merged = {}
    for k in tvs[0]:
        # the entry of largest magnitude is the running max or the running min, whichever is larger in magnitude
        out = tvs[0][k].clone()
        flat, inputs, step = out.view(-1), [tv[k].reshape(-1) for tv in tvs[1:]], _step(out)
        for start in _chunks(out):
            high = flat[start:start + step]
            low = high.clone()
            for x in inputs:
                chunk = x[start:start + step]
                torch.maximum(high, chunk, out=high)
                torch.minimum(low, chunk, out=low)
            torch.where(high + low >= 0, high, low, out=high)
        merged[k] = out
    return TaskVector._trusted(merged)


def magmax_update_(running: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """In place: replace the entries of ``running`` whose magnitude ``new`` strictly exceeds (chunked)."""
    flat, cand_all, step = running.view(-1), new.reshape(-1), _step(running)
    for start in _chunks(running):
        chunk, cand = flat[start:start + step], cand_all[start:start + step]
        chunk.copy_(torch.where(cand.abs() > chunk.abs(), cand, chunk))
    return running
