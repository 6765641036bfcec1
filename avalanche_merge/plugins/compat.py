"""What else a strategy does, for plugins that cannot work with it: detected before training, never by a crash.

Avalanche strategies are a template plus plugins; the classic continual-learning methods are plugins
(``EWCPlugin``, ``LwFPlugin``, ``AGEMPlugin``, ``ReplayPlugin``, ...) that a strategy such as ``EWC`` appends to its
list. These helpers name the plugins (or strategy classes) of ``strategy`` that

- mix earlier experiences' samples into training or into gradient constraints (a storage policy or a buffer:
  ``ReplayPlugin``, ``GDumbPlugin``, ``AGEMPlugin``, ``GEMPlugin``, ``GSS_greedyPlugin``, ``MIRPlugin``, ``RARPlugin``,
  ``BiCPlugin``, ``GenerativeReplayPlugin``, ``CoPEPlugin``, any plugin with a ``storage_policy``; the strategies
  ``Cumulative``, ``GDumb``, ``JointTraining``);
- regularise towards earlier weights or outputs (``EWCPlugin``, ``SynapticIntelligencePlugin``, ``MASPlugin``,
  ``RWalkPlugin``, ``LwFPlugin``, ``LFLPlugin``, ``FeatureDistillationPlugin``).

Plugins unknown here are not detected; the per-batch checks of the plugins (e.g. a routed model's foreign-class
check) still stop what they can see.
"""

from __future__ import annotations

from typing import Any

MIXING_PLUGINS = ("ReplayPlugin", "GDumbPlugin", "AGEMPlugin", "GEMPlugin", "GSS_greedyPlugin", "MIRPlugin",
                  "RARPlugin", "BiCPlugin", "GenerativeReplayPlugin", "CoPEPlugin", "TrainGeneratorAfterExpPlugin")
MIXING_STRATEGIES = ("Cumulative", "GDumb", "JointTraining")
REGULARISING_PLUGINS = ("EWCPlugin", "SynapticIntelligencePlugin", "MASPlugin", "RWalkPlugin", "LwFPlugin",
                        "LFLPlugin", "FeatureDistillationPlugin")


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def mixing_components(strategy: Any) -> list[str]:
    """Plugins (and the strategy class) of ``strategy`` that train or constrain with earlier experiences' samples."""
    found = [f"strategy {type(strategy).__name__}"] if _class_names(strategy) & set(MIXING_STRATEGIES) else []
    for p in getattr(strategy, "plugins", []):
        if _class_names(p) & set(MIXING_PLUGINS) or hasattr(p, "storage_policy"):
            found.append(f"plugin {type(p).__name__}")
    return found


def regularising_components(strategy: Any) -> list[str]:
    """Plugins of ``strategy`` that regularise towards earlier weights or outputs (EWC, SI, MAS, LwF, ...)."""
    return [f"plugin {type(p).__name__}" for p in getattr(strategy, "plugins", [])
            if _class_names(p) & set(REGULARISING_PLUGINS)]


def other_plugins(strategy: Any, kind: type) -> list[Any]:
    """Plugins of ``strategy`` that are instances of ``kind`` (to refuse two plugins of one family)."""
    return [p for p in getattr(strategy, "plugins", []) if isinstance(p, kind)]
