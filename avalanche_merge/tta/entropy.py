"""Entropy objectives of test-time adaptation (pure torch; no Avalanche import).

- :func:`softmax_entropy` / :func:`entropy_loss`: TENT's objective (Wang et al., ICLR 2021), the Shannon entropy
  of each sample's softmax prediction, **averaged** over the batch (the reference's
  ``softmax_entropy(outputs).mean(0)``).
- :func:`marginal_entropy`: MEMO's objective (Zhang, Levine & Finn, "MEMO: Test Time Robustness via Adaptation
  and Augmentation", NeurIPS 2022), used by TTACIL (Marouf et al., arXiv 2310.11482): the entropy of the
  prediction averaged over N augmented views of one image, ``H(1/N sum_i softmax(z_i))``, computed in log space.
- :func:`adapt_step`: one optimizer step on a loss over chosen parameters only, without touching the ``.grad``
  of any other parameter.
"""

from __future__ import annotations

import math

import torch


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum_c p_c log p_c`` of ``softmax(logits)`` along the last axis (one value per row)."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """TENT's loss: the per-sample softmax entropy of ``(batch, classes)`` logits, averaged over the batch."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    return softmax_entropy(logits).mean(0)


def marginal_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log(1/N sum_i softmax(z_i))`` over the views axis ``-2`` of ``(..., N, C)`` logits (log-sum-exp form)."""
    n = logits.shape[-2]
    log_p = logits.log_softmax(-1)
    avg = torch.logsumexp(log_p, dim=-2) - math.log(n)
    return avg.clamp_min(torch.finfo(avg.dtype).min)  # as MEMO: a class with probability 0 adds 0, not NaN


def marginal_entropy(logits: torch.Tensor, *, per_instance: bool = True) -> torch.Tensor:
    """MEMO's marginal entropy of ``(batch, views, classes)`` logits.

    Args:
        logits: ``(B, N, C)``: N augmented views of each of B images.
        per_instance: True (MEMO and the TTACIL paper): the marginal is taken over each image's N views and the
            B entropies are averaged. False (the TTACIL code, which feeds all ``B*N`` rows to one marginal): one
            marginal over all ``B*N`` views of the batch.

    Returns:
        A scalar. 0 when all views of an image put probability 1 on the same class; ``log C`` when they are
        uniform.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, views, classes), got shape {tuple(logits.shape)}")
    if not per_instance:
        logits = logits.reshape(1, -1, logits.shape[-1])
    avg = marginal_log_probs(logits)
    return -(avg.exp() * avg).sum(-1).mean()


def adapt_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """One ``optimizer`` step on ``loss`` over ``params``; gradients of every other tensor are never written.

    ``params[i].grad`` is set for the step and put back to its previous value afterwards, so an optimizer of the
    training phase that shares these parameters sees no stale gradient.
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    saved = [p.grad for p in params]
    try:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.detach()
        optimizer.step()
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
