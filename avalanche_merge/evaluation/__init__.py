"""Continual-learning metrics: pure functions over the accuracy matrix (:mod:`.matrix`), loss interference and
LoRA subspace overlap as Avalanche plugin metrics (:mod:`.interference`), and sparse fine-tuning statistics
(updated fraction, mask overlap, estimated FLOPs saved; :mod:`.sparsity`) and retrieval accuracy of routed methods
(:mod:`.retrieval`); the papers' forgetting metrics with held-out retention (:mod:`.continual`), task-vector
geometry (:mod:`.parameter_geometry`) and representation drift (:mod:`.drift`) as plugin metrics. Modules that
import Avalanche are imported lazily."""

_LAZY = {name: ".interference" for name in (
    "Interference", "InterferencePluginMetric", "LoRAOverlapPluginMetric", "final_interference",
    "interference_matrix", "interference_metrics", "lora_overlap_metrics", "task_losses")}
_LAZY.update({name: ".sparsity" for name in (
    "LinearShape", "SparsityPluginMetric", "changed_masks", "find_sparse_learner", "flops_saving", "jaccard_matrix",
    "learner_flops_saving", "linear_layers", "mask_densities", "record_linear_rows", "sparsity_metrics",
    "updated_fraction", "weight_snapshot")})
_LAZY.update({name: ".retrieval" for name in (
    "RetrievalAccuracy", "RetrievalAccuracyPluginMetric", "retrieval_accuracy", "retrieval_metrics")})
_LAZY.update({"ContinualMetricsPluginMetric": ".continual", "continual_metrics": ".continual",
              "ParameterGeometryPluginMetric": ".parameter_geometry", "geometry_metrics": ".parameter_geometry",
              "RepresentationDriftPluginMetric": ".drift", "drift_metrics": ".drift"})


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
