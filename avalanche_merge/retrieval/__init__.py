"""Clustering-based task retrieval, retrieval-routed LoRA and prototype classifiers (pure torch / scikit-learn; no
Avalanche import).

- :mod:`.router`: the :class:`Router` interface that retrieval-routed methods expose;
- :mod:`.signatures`: per-task signatures of embeddings (Dirichlet-process GMM, k-means centroids) and
  maximum-likelihood task retrieval;
- :mod:`.routed`: :class:`RoutedLoRA`, per-task LoRA modules and heads routed by the signatures: CoLoR (Wistuba et
  al. 2023) and Proteus (Le et al. 2026);
- :mod:`.prototypes`: nearest class mean and RanPAC (McDonnell et al., NeurIPS 2023) on frozen features.
"""

from .prototypes import NCMConfig, NearestClassMean, RanPAC, RanPACConfig
from .routed import CoLoRConfig, ProteusConfig, RoutedLoRA, RoutedLoRAConfig
from .router import Router, find_router
from .signatures import SignatureConfig, TaskSignatures

__all__ = ["CoLoRConfig", "NCMConfig", "NearestClassMean", "ProteusConfig", "RanPAC", "RanPACConfig", "Router",
           "RoutedLoRA", "RoutedLoRAConfig", "SignatureConfig", "TaskSignatures", "find_router"]
