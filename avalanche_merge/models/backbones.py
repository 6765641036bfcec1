"""Backbone registry: how the runner builds the model every method starts from.

A backbone builder takes its validated options, the benchmark (for the number of classes and input shape) and
the run seed, and returns a fresh ``nn.Module`` whose ``forward`` gives class logits and whose ``features(x)``
gives embeddings (prototype methods such as SLDA use those).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: ``build(options, benchmark, seed) -> nn.Module``."""

    name: str
    build: Callable[[Any, Any, int], nn.Module]
    config_cls: type
    description: str
    offline: bool = True


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, *, config_cls: type, description: str, offline: bool = True) -> Callable:
    """Decorator registering a backbone builder."""

    def decorator(build: Callable) -> Callable:
        BACKBONES.add(name, BackboneSpec(name, build, config_cls, description, offline))
        return build

    return decorator


@dataclass
class TinyViTOptions:
    """Options of the ``tiny_vit`` backbone.

    Args:
        pretrained: start from the cached pretrained checkpoint (made on first use, see ``models.pretrain``).
        head: ``"pretrained"`` keeps the pretrained digit classifier, ``"reset"`` draws a fresh one from the
            run seed, ``"auto"`` uses the benchmark's default (pretrained for domain shifts, reset for
            class-incremental splits).
        checkpoint: path of a safetensors checkpoint to load instead of the cache.
        dim, depth, heads, patch_size: architecture (changing them pretrains a new cached checkpoint).
        pretrain_epochs: epochs of the pretraining run.
        cache_dir: where pretrained checkpoints live (default ``$AVALANCHE_MERGE_CACHE`` or
            ``~/.cache/avalanche_merge``).
    """

    pretrained: bool = True
    head: str = "auto"
    checkpoint: str | None = None
    dim: int = 64
    depth: int = 4
    heads: int = 4
    patch_size: int = 7
    pretrain_epochs: int = 40
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.head not in ("auto", "pretrained", "reset"):
            raise ValueError(f"head must be 'auto', 'pretrained' or 'reset', got {self.head!r}")
        if self.pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be >= 1, got {self.pretrain_epochs}")
        if not self.pretrained and self.head == "pretrained":
            raise ValueError("head='pretrained' needs pretrained=True")


@register_backbone("tiny_vit", config_cls=TinyViTOptions,
                   description="4-block ViT (d=64, ~140k params) pretrained offline on reserved MNIST 5k images")
def build_tiny_vit(options: TinyViTOptions, benchmark, seed: int) -> nn.Module:
    from .pretrain import PretrainConfig, load_checkpoint, pretrained_tiny_vit
    from .vit import TinyViT, TinyViTConfig

    c, s, _ = benchmark.input_shape
    if s % options.patch_size:
        raise ValueError(f"patch_size {options.patch_size} does not divide the benchmark's image size {s}")
    vit = TinyViTConfig(image_size=s, patch_size=options.patch_size, in_chans=c, dim=options.dim,
                        depth=options.depth, heads=options.heads, num_classes=benchmark.num_classes)
    if options.checkpoint is not None:
        state, _ = load_checkpoint(options.checkpoint)
        model = TinyViT(vit)
        model.load_state_dict(state)
    elif options.pretrained:
        model, _ = pretrained_tiny_vit(PretrainConfig(vit=vit, epochs=options.pretrain_epochs),
                                       cache_dir=options.cache_dir)
    else:
        torch.manual_seed(seed)
        model = TinyViT(vit)
    from ..benchmarks.registry import BENCHMARKS

    head = options.head
    if head == "auto":
        head = BENCHMARKS.get(benchmark.name).default_head if benchmark.name in BENCHMARKS else "reset"
    if head == "reset" and (options.pretrained or options.checkpoint):
        model.reset_head(benchmark.num_classes, generator=torch.Generator().manual_seed(seed))
    return model


def list_backbones() -> list[str]:
    """Registered backbone names."""
    return BACKBONES.names()


@dataclass
class OpenCLIPOptions:
    """Options of the ``open_clip`` backbone (Radford et al. 2021; open_clip, Ilharco et al. 2021).

    Args:
        model_name: an open_clip architecture, e.g. ``"ViT-B-16"``.
        pretrained: path of a LOCAL checkpoint file; ``None`` builds random weights (tests only). Hub tags are
            refused: nothing is downloaded at run time.
        templates: prompt templates with ``{}`` for the class name (default: a few of CLIP's ImageNet prompts).
        model_cfg: a full open_clip model config (e.g. a tiny one for tests) instead of the bundled one.
    """

    model_name: str = "ViT-B-16"
    pretrained: str | None = None
    templates: list[str] | None = None
    model_cfg: dict | None = None

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be a non-empty open_clip architecture name")


@register_backbone("open_clip", config_cls=OpenCLIPOptions, offline=False,
                   description="open_clip image tower with a zero-shot head from class names (local weights)")
def build_open_clip(options: OpenCLIPOptions, benchmark, seed: int) -> nn.Module:
    from .clip import DEFAULT_TEMPLATES, zero_shot_classifier

    torch.manual_seed(seed)
    return zero_shot_classifier(options.model_name, benchmark.class_names,
                                templates=tuple(options.templates or DEFAULT_TEMPLATES),
                                pretrained=options.pretrained, model_cfg=options.model_cfg)
