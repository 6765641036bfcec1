"""TF-IDF ranking of memory slots (Lin et al., "Continual Learning via Sparse Memory Finetuning", 2025). Pure torch.

A batch is a "document" and a memory slot a "term". For a batch with access counts ``c(i)`` (how many times slot
``i`` is among the top-k of a token and head) and a background set of ``N`` batches where ``df(i)`` batches access
slot ``i`` at least once, Lin et al. score

    tfidf(i) = c(i) / sum_j c(j) * log(N / (1 + df(i)))

so slots read often by the current batch but rarely by background data rank high; slots that every background
batch uses (general-purpose memory) get ``log(N / (N + 1)) < 0`` and rank last. With no background yet (``N = 0``)
the idf is 1 and slots are ranked by batch frequency alone.

Background choice (documented, see :class:`~avalanche_merge.plugins.sparse_memory.SparseMemoryPlugin`): Lin et al.
use batches of pretraining data (DCLM). In a continual stream the analogue is the data the model already holds:
the plugin accumulates the accesses of the inputs of every experience trained so far (after it is trained), so the
slots that serve earlier experiences are protected; callers with pretraining data add it with
:meth:`BackgroundCounts.add`.
"""

from __future__ import annotations

import torch


def slot_counts(indices: torch.Tensor, n_slots: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Access count per slot, ``[n_slots]`` float: occurrences of each id in ``indices`` (any shape).

    With ``weights`` (same shape) the counts are weighted sums instead (e.g. by softmax read weights).
    """
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_slots):
        raise ValueError(f"slot indices must be in [0, {n_slots - 1}], got range "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    w = None if weights is None else weights.reshape(-1).float()
    return torch.bincount(flat, weights=w, minlength=n_slots).float()


def idf(background_df: torch.Tensor, n_background_docs: int) -> torch.Tensor:
    """``log(N / (1 + df(i)))`` (Lin et al.); all ones when ``N = 0`` (no background)."""
    if n_background_docs < 0:
        raise ValueError(f"n_background_docs must be >= 0, got {n_background_docs}")
    df = background_df.float()
    if n_background_docs == 0:
        return torch.ones_like(df)
    if bool((df > n_background_docs).any()) or bool((df < 0).any()):
        raise ValueError(f"document frequencies must be in [0, {n_background_docs}] (n_background_docs)")
    return torch.log(n_background_docs / (1.0 + df))


def tfidf_scores(batch_counts: torch.Tensor, background_df: torch.Tensor, n_background_docs: int) -> torch.Tensor:
    """TF-IDF of every slot: ``c(i) / sum_j c(j) * log(N / (1 + df(i)))`` (module docstring).

    Args:
        batch_counts: access counts of the current batch, ``[n_slots]`` (:func:`slot_counts`).
        background_df: per slot, the number of background batches that accessed it, ``[n_slots]``.
        n_background_docs: ``N``, the number of background batches (0: rank by term frequency only).
    """
    if batch_counts.shape != background_df.shape:
        raise ValueError(f"batch_counts and background_df must have the same shape, got "
                         f"{tuple(batch_counts.shape)} and {tuple(background_df.shape)}")
    counts = batch_counts.float()
    tf = counts / counts.sum().clamp_min(1e-12)
    return tf * idf(background_df.to(counts.device), n_background_docs)


def top_slots(scores: torch.Tensor, t: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``t`` highest ``scores`` (fewer if fewer candidates), highest first.

    Args:
        scores: ``[n_slots]`` scores.
        t: slots to keep, >= 1.
        candidates: optional bool ``[n_slots]``; only these slots can be chosen (the batch's accessed slots).
    """
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an int >= 1, got {t!r}")
    if candidates is not None:
        pool = candidates.nonzero().flatten()
        order = scores[pool].argsort(descending=True, stable=True)[:t]
        return pool[order]
    return scores.argsort(descending=True, stable=True)[:t]


class BackgroundCounts:
    """Document frequencies of slots over background batches: ``df[i]`` batches accessed slot ``i``; ``n_docs``.

    Also keeps the total access counts (``total``) for inspection.
    """

    def __init__(self, n_slots: int) -> None:
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be an int >= 1, got {n_slots!r}")
        self.n_slots = n_slots
        self.df = torch.zeros(n_slots)
        self.total = torch.zeros(n_slots)
        self.n_docs = 0

    def add(self, counts: torch.Tensor) -> None:
        """Add one background batch given its per-slot access counts ``[n_slots]``."""
        if counts.shape != (self.n_slots,):
            raise ValueError(f"counts must have shape ({self.n_slots},), got {tuple(counts.shape)}")
        counts = counts.detach().float().cpu()
        self.df += (counts > 0).float()
        self.total += counts
        self.n_docs += 1

    def state_dict(self) -> dict:
        return {"df": self.df.clone(), "total": self.total.clone(), "n_docs": self.n_docs}

    def load_state_dict(self, state: dict) -> None:
        self.df = state["df"].clone().float()
        self.total = state["total"].clone().float()
        self.n_docs = int(state["n_docs"])
