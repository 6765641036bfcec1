"""Prompt pools with key-query selection (L2P, DualPrompt), pure torch.

Wang et al., "Learning to Prompt for Continual Learning" (L2P, CVPR 2022) and "DualPrompt: Complementary Prompting
for Rehearsal-free Continual Learning" (ECCV 2022): a pool of ``M`` prompts, each with a learnable key; the query
``q(x)`` (the frozen backbone's final class token) picks the ``N`` prompts whose keys have the highest cosine
similarity; a "pull" term ``sum_selected cos(q, k) / batch`` (minus, times lambda, in the loss) draws the chosen keys
to the queries. Reference code read: google-research/l2p, JH-LEE-KR/l2p-pytorch and dualprompt-pytorch
(``prompt.py``: keys and prompts initialised uniform in [-1, 1], l2 normalisation with a 1e-12 floor on the squared
norm, batch-wise majority selection, ``reduce_sim = sum(selected key * query) / batch``).
"""

from __future__ import annotations

import torch
from torch import nn


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x / ||x||`` along ``dim`` with the squared norm floored at ``eps`` (the references' normalisation)."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=dim, keepdim=True), min=eps))


def key_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[batch, pool]`` between queries ``[batch, d]`` and keys ``[pool, d]``."""
    return l2_normalize(query) @ l2_normalize(keys).t()


def select_prompts(scores: torch.Tensor, top_n: int, *, batchwise: bool = False,
                   task: int | None = None) -> torch.Tensor:
    """Indices ``[batch, top_n]`` of the prompts to use.

    Args:
        scores: ``[batch, pool]`` key-query similarities.
        top_n: prompts per input (N).
        batchwise: replace every row by the ``top_n`` prompts chosen most often in the batch (ties: lower index
            first), L2P's batch-wise selection.
        task: task-indexed training selection (DualPrompt's ``use_prompt_mask``): prompts
            ``task * top_n .. (task + 1) * top_n - 1`` for every input, whatever the scores.

    Raises:
        ValueError: ``top_n`` outside ``[1, pool]`` or a task slice beyond the pool.
    """
    batch, pool = scores.shape
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= pool:
        raise ValueError(f"top_n must be an int in [1, pool size {pool}], got {top_n!r}")
    if task is not None:
        if task < 0 or (task + 1) * top_n > pool:
            raise ValueError(f"task {task} needs prompts {task * top_n}..{(task + 1) * top_n - 1}; the pool has {pool}")
        return torch.arange(task * top_n, (task + 1) * top_n, device=scores.device).expand(batch, -1)
    idx = scores.topk(top_n, dim=1).indices
    if batchwise:
        counts = torch.bincount(idx.flatten(), minlength=pool)
        # stable sort by count (descending): equal counts keep the lower index first
        order = torch.sort(-counts, stable=True).indices[:top_n]
        idx = order.expand(batch, -1)
    return idx


def pull_term(query: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``sum_{b, j} cos(q_b, k_{idx[b, j]}) / batch``: the similarity the loss subtracts (times lambda)."""
    q = l2_normalize(query).unsqueeze(1)
    k = l2_normalize(keys)[idx]
    return (q * k).sum() / query.shape[0]


class PromptPool(nn.Module):
    """``pool_size`` keys ``[pool, key_dim]`` and prompts ``[pool, *prompt_shape]``, both uniform in [-1, 1].

    Args:
        pool_size: M, >= 1.
        key_dim: width of the keys (the query's width).
        prompt_shape: shape of one prompt (e.g. ``(length, width)``; ``(layers, 2, length, width)`` for prefixes).
        top_n: prompts chosen per input, in ``[1, pool_size]``.
        batchwise: batch-wise majority selection.
        generator: random generator of the initialisation.
    """

    def __init__(self, pool_size: int, key_dim: int, prompt_shape: tuple[int, ...], *, top_n: int,
                 batchwise: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= pool_size:
            raise ValueError(f"top_n must be an int in [1, pool_size={pool_size}], got {top_n!r} (the pool is "
                             f"smaller than top-N)")
        self.top_n, self.batchwise = top_n, batchwise
        self.keys = nn.Parameter(torch.rand(pool_size, key_dim, generator=generator) * 2 - 1)
        self.prompts = nn.Parameter(torch.rand(pool_size, *prompt_shape, generator=generator) * 2 - 1)

    @property
    def pool_size(self) -> int:
        return self.keys.shape[0]

    def forward(self, query: torch.Tensor, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(prompts [batch, top_n, *prompt_shape], idx [batch, top_n], pull term)`` for queries ``[batch, d]``."""
        idx = select_prompts(key_scores(query, self.keys), self.top_n, batchwise=self.batchwise, task=task)
        return self.prompts[idx], idx, pull_term(query, self.keys, idx)
