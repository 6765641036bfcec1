"""Backbones: the offline TinyViT (pretrained and cached by the pipeline), full-size timm-format ViTs, open_clip and
MiniLM wrappers."""

from . import timm_vit  # noqa: F401 - registers the timm_vit backbone
from .backbones import BACKBONES, BackboneSpec, list_backbones, register_backbone
from .vit import FeatureExtractor, TinyViT, TinyViTConfig

__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "TinyViT", "TinyViTConfig", "list_backbones",
           "register_backbone"]
