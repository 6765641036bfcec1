"""Zero-shot and test-time adaptation cores (pure torch; no Avalanche import): entropies (TENT, MEMO), the
normalisation parameters TTA adapts, AugMix views of float images, AdaptFormer-style adapters, configs."""

from .adapters import ClassMeans, CosineHead, ParallelAdapter, attach_parallel_adapters
from .augmix import AugMixConfig, augmix_views
from .config import TentConfig, TTACILConfig, ZeroShotConfig, resolve_templates
from .entropy import adapt_step, entropy_loss, marginal_entropy, softmax_entropy
from .norms import NormSnapshot, adaptation_mode, norm_modules, norm_parameters

__all__ = ["AugMixConfig", "ClassMeans", "CosineHead", "NormSnapshot", "ParallelAdapter", "TTACILConfig",
           "TentConfig", "ZeroShotConfig", "adapt_step", "adaptation_mode", "attach_parallel_adapters",
           "augmix_views", "entropy_loss", "marginal_entropy", "norm_modules", "norm_parameters",
           "resolve_templates", "softmax_entropy"]
