"""TF-IDF ranking of memory slots (Lin et al., "Continual Learning via Sparse Memory Finetuning", 2025). Pure torch.

A batch is a "document" and a memory slot a "term". For a batch with access counts ``c(i)`` (how many times slot
``i`` is among the top-k of a token and head) and a background set of ``N`` batches where ``df(i)`` batches access
slot ``i`` at least once, Lin et al. score

    tfidf(i) = c(i) / sum_j c(j) * log(N / (1 + df(i)))

so slots read often by the current batch but rarely by background data rank high; slots that every background
batch uses (general-purpose memory) get ``log(N / (N + 1)) < 0`` and rank last. With no background yet (``N = 0``)
the idf is 1 and slots are ranked by batch frequency alone.

Background choice (see :class:`~avalanche_merge.plugins.sparse_memory.SparseMemoryOptions`, ``background``): Lin
et al. rank slots "relative to usage on pretraining data": the background documents are batches of pretraining data
(DCLM), fixed before fine-tuning. ``background="pretrain"`` does that with the backbone's pretraining pool;
``"stream"`` uses the inputs of every experience trained so far instead (after it is trained). Protection only works
when the slots a new batch updates are rarely read by the background: :func:`background_overlap` measures it.
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


def background_overlap(updated: torch.Tensor, background_df: torch.Tensor, n_background_docs: int) -> dict:
    """How much of the background reads the slots that were updated (the regime check of sparse memory fine-tuning).

    Args:
        updated: bool ``[n_slots]``, the slots updated for new data (e.g. the union of the per-batch selections).
        background_df: per slot, the number of background documents that read it, ``[n_slots]``.
        n_background_docs: ``N``, the number of background documents, >= 1.

    Returns:
        ``{"updated": u, "read_by_half": f_half, "read_by_all": f_all}``: ``u`` updated slots, and the fractions of
        them read by at least half of the background documents (``2 df >= N``) and by every one (``df = N``);
        the fractions are NaN when no slot was updated.

    Raises:
        ValueError: mismatched shapes, ``N < 1``, or document frequencies outside ``[0, N]``.
    """
    if updated.shape != background_df.shape:
        raise ValueError(f"updated and background_df must have the same shape, got {tuple(updated.shape)} and "
                         f"{tuple(background_df.shape)}")
    if isinstance(n_background_docs, bool) or not isinstance(n_background_docs, int) or n_background_docs < 1:
        raise ValueError(f"n_background_docs must be an int >= 1, got {n_background_docs!r}")
    df = background_df.float().cpu()
    if bool((df < 0).any()) or bool((df > n_background_docs).any()):
        raise ValueError(f"document frequencies must be in [0, {n_background_docs}] (n_background_docs)")
    mask = updated.bool().cpu()
    u = int(mask.sum())
    if u == 0:
        return {"updated": 0, "read_by_half": float("nan"), "read_by_all": float("nan")}
    sel = df[mask]
    return {"updated": u, "read_by_half": int((2 * sel >= n_background_docs).sum()) / u,
            "read_by_all": int((sel == n_background_docs).sum()) / u}


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
