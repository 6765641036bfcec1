"""Backbones: the offline TinyViT (pretrained and cached by the pipeline), full-size timm-format ViTs, open_clip and
MiniLM wrappers."""

from . import timm_vit  # noqa: F401 - registers the timm_vit backbone
from .attention import SplitMultiheadAttention, SplitQKV, split_attention
from .backbones import BACKBONES, BackboneSpec, list_backbones, register_backbone
from .targets import default_targets, detect_architecture, lora_targets
from .vit import FeatureExtractor, TinyViT, TinyViTConfig

__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "SplitMultiheadAttention", "SplitQKV", "TinyViT",
           "TinyViTConfig", "default_targets", "detect_architecture", "list_backbones", "lora_targets",
           "register_backbone", "split_attention"]
