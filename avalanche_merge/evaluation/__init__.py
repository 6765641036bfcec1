"""Continual-learning metrics: pure functions over the accuracy matrix (:mod:`.matrix`), and loss interference
and LoRA subspace overlap as Avalanche plugin metrics (:mod:`.interference`, imported lazily: it imports
Avalanche)."""

_LAZY = {name: ".interference" for name in (
    "Interference", "InterferencePluginMetric", "LoRAOverlapPluginMetric", "final_interference",
    "interference_matrix", "interference_metrics", "lora_overlap_metrics", "task_losses")}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
