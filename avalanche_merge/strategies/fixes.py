"""Workarounds for Avalanche 0.6.0 bugs that would silently change a baseline's results.

Each fix is applied by the builder of the strategy it concerns (never at import time), is idempotent, and is
covered by a test that shows the bug on unpatched Avalanche.
"""

from __future__ import annotations

import torch


def fix_si_weight_aliasing() -> None:
    """Make Avalanche's Synaptic Intelligence store copies of the weights, not views of them.

    ``SynapticIntelligencePlugin.extract_weights`` stores ``param.detach().cpu().flatten()``. On a CUDA device
    ``.cpu()`` copies, but on CPU it returns the parameter's own storage, so the stored "old" weights, "new"
    weights and anchor are all views of the live parameters: every weight change is zero, the path-integral
    importances are zero, and the SI penalty vanishes (SI trains exactly like Naive). The replacement is the same
    function with ``.clone()``; on GPU it only adds a copy that ``.cpu()`` already made.
    """
    from avalanche.training.plugins.synaptic_intelligence import SynapticIntelligencePlugin as SI

    if getattr(SI.extract_weights, "_avalanche_merge_fixed", False):
        return

    @torch.no_grad()
    def extract_weights(model, target, excluded_parameters) -> None:
        for name, param in SI.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    extract_weights._avalanche_merge_fixed = True
    SI.extract_weights = staticmethod(extract_weights)
