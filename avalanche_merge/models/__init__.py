"""Backbones: the offline TinyViT (pretrained and cached by the pipeline), open_clip and MiniLM wrappers."""

from .backbones import BACKBONES, BackboneSpec, list_backbones, register_backbone
from .vit import FeatureExtractor, TinyViT, TinyViTConfig

__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "TinyViT", "TinyViTConfig", "list_backbones",
           "register_backbone"]
