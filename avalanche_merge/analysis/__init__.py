"""Plots and tables of stored runs; subspace analysis of LoRA updates (:mod:`.subspace`, :mod:`.subspace_plots`);
task-vector geometry (:mod:`.geometry`); representation similarity, CKA and SVCCA (:mod:`.cka`).

Names are imported lazily (importing the package stays cheap).
"""

_LAZY = {
    **{name: ".subspace" for name in (
        "lora_overlap", "lora_snapshot", "lora_update_since", "orthonormal_basis", "overlap_matrix",
        "overlap_matrix_from_bases", "principal_angles", "subspace_overlap", "update_subspace")},
    **{name: ".subspace_plots" for name in ("plot_interference", "plot_overlap_matrix")},
    **{name: ".geometry" for name in (
        "cosine_matrix", "effective_rank", "effective_state", "geometry_report", "layer_norms", "matrix_names",
        "shared_names", "sign_conflict_matrix", "sign_conflict_rate", "task_vectors", "update_angles")},
    **{name: ".cka" for name in ("find_blocks", "layer_features", "linear_cka", "pool_output", "svcca")},
    **{name: ".report" for name in (
        "correlations", "generate_report", "load_results", "report_rows", "run_values", "write_report")},
    **{name: ".analysis_plots" for name in (
        "block_prefix", "group_norms", "plot_accumulation_retention", "plot_cka_curves", "plot_cosine_heatmap",
        "plot_geometry_vs_forgetting", "plot_layer_norms", "probe_mean", "seed_mean")},
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
