"""``DERPP``: Avalanche's DER/DER++ (Buzzega et al., "Dark Experience for General Continual Learning: a Strong,
Simple Baseline", NeurIPS 2020) whose current-batch loss goes through the strategy's criterion.

Avalanche 0.6.0's ``DER.training_epoch`` writes the current-batch cross-entropy inline once the buffer is in use, so
a head protocol that wraps ``strategy._criterion`` (``masked``: :class:`~avalanche_merge.plugins.HeadProtocolPlugin`)
would act on the first experience only. Here the loss is Avalanche's, term for term,

    criterion(out_current, y_current) + alpha * mse(out_buffer, stored_logits) + beta * ce(out_buffer, y_buffer),

computed in :meth:`DERPP.criterion`; with the plain cross-entropy criterion it equals Avalanche's DER bit for bit
(``tests/strategies/test_der.py``). As in SparCL's script (``--use_cl_mask``), a ``masked`` protocol restricts the
current-batch term only; the buffer terms see every logit. Avalanche's own differences from the authors' DER++
remain (one joint forward, one replay batch for both buffer terms, a class-balanced buffer filled at the end of an
experience with its final logits instead of reservoir sampling during training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.training import DER
from avalanche.training.templates.update_type import SGDUpdate


class DERPP(DER):
    """Avalanche's ``DER`` (DER++ when ``beta > 0``) with the current-batch term through ``strategy._criterion``."""

    training_epoch = SGDUpdate.training_epoch  # DER's own loop differs only by its inline loss

    def criterion(self) -> torch.Tensor:
        """DER++'s training loss while the buffer is in use; the plain criterion otherwise (and in evaluation)."""
        if not self.is_training or self.replay_loader is None:
            return super().criterion()
        m = self.batch_size_mem
        out, y = self.mb_output, self.mb_y
        return (
            self._criterion(out[m:], y[m:])
            + self.alpha * F.mse_loss(out[:m], self.batch_logits)
            + self.beta * F.cross_entropy(out[:m], y[:m])
        )
