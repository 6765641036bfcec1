"""Plots and tables of stored runs; subspace analysis of LoRA updates (:mod:`.subspace`, :mod:`.subspace_plots`).

Names are imported lazily (importing the package stays cheap).
"""

_LAZY = {
    **{name: ".subspace" for name in (
        "lora_overlap", "lora_snapshot", "lora_update_since", "orthonormal_basis", "overlap_matrix",
        "overlap_matrix_from_bases", "principal_angles", "subspace_overlap", "update_subspace")},
    **{name: ".subspace_plots" for name in ("plot_interference", "plot_overlap_matrix")},
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
