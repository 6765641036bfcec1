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
    """A registered backbone: ``build(options, benchmark, seed) -> nn.Module``.

    ``skeleton(options, input_shape, num_classes) -> nn.Module`` (optional) builds the same architecture on the
    ``meta`` device without loading or pretraining any weights, after checking every path the build will read;
    the runner's plan-time check (``--dry-run``) resolves LoRA targets and analysis layers on it.
    """

    name: str
    build: Callable[[Any, Any, int], nn.Module]
    config_cls: type
    description: str
    offline: bool = True
    skeleton: Callable[[Any, tuple[int, int, int], int], nn.Module] | None = None
    text_tower: bool = False


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, *, config_cls: type, description: str, offline: bool = True,
                      skeleton: Callable | None = None, text_tower: bool = False) -> Callable:
    """Decorator registering a backbone builder (``skeleton``: see :class:`BackboneSpec`; ``text_tower``: the
    built model can encode class names, e.g. open_clip's, which methods such as ``zeroshot`` need)."""

    def decorator(build: Callable) -> Callable:
        BACKBONES.add(name, BackboneSpec(name, build, config_cls, description, offline, skeleton, text_tower))
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


def _tiny_vit_config(options: TinyViTOptions, input_shape: tuple[int, int, int], num_classes: int):
    from .vit import TinyViTConfig

    c, s, _ = input_shape
    if s % options.patch_size:
        raise ValueError(f"patch_size {options.patch_size} does not divide the benchmark's image size {s}")
    return TinyViTConfig(image_size=s, patch_size=options.patch_size, in_chans=c, dim=options.dim,
                         depth=options.depth, heads=options.heads, num_classes=num_classes)


def tiny_vit_skeleton(options: TinyViTOptions, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The ``tiny_vit`` architecture on the meta device; checks the checkpoint (keys and shapes) and cache folder.

    Raises:
        ValueError: the architecture does not fit the benchmark, the checkpoint is not a safetensors file of
            this architecture, or the cache folder is a file or cannot be written.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    from .pretrain import check_cache_dir, checkpoint_shapes
    from .vit import TinyViT

    vit = _tiny_vit_config(options, input_shape, num_classes)
    with torch.device("meta"):
        model = TinyViT(vit)
    if options.checkpoint is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = checkpoint_shapes(options.checkpoint)
        if found != expected:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
            raise ValueError(f"checkpoint {options.checkpoint} does not fit tiny_vit {vit.to_dict()}: missing "
                             f"{missing[:4]}, unexpected {extra[:4]}, wrong shapes "
                             f"{[(k, found[k], expected[k]) for k in wrong[:4]]}")
    elif options.pretrained:
        check_cache_dir(options.cache_dir)
    return model


@register_backbone("tiny_vit", config_cls=TinyViTOptions, skeleton=tiny_vit_skeleton,
                   description="4-block ViT (d=64, ~140k params) pretrained offline on reserved MNIST 5k images")
def build_tiny_vit(options: TinyViTOptions, benchmark, seed: int) -> nn.Module:
    from .pretrain import PretrainConfig, load_checkpoint, pretrained_tiny_vit
    from .vit import TinyViT

    vit = _tiny_vit_config(options, benchmark.input_shape, benchmark.num_classes)
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


def open_clip_skeleton(options: OpenCLIPOptions, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The open_clip zero-shot classifier's architecture on the meta device (no weights read, no text encoded).

    Raises:
        ValueError: unknown or unsupported architecture, or a config open_clip rejects.
        FileNotFoundError: ``pretrained`` is not an existing file.
    """
    from .clip import ZeroShotClassifier, _resolve_config, open_clip_architecture

    embed_dim = int(_resolve_config(options.model_name, options.model_cfg)["embed_dim"])  # timm towers: no output_dim
    with torch.device("meta"):
        model = open_clip_architecture(options.model_name, pretrained=options.pretrained, model_cfg=options.model_cfg)
        return ZeroShotClassifier(model.visual, torch.empty(num_classes, embed_dim))


@register_backbone("open_clip", config_cls=OpenCLIPOptions, offline=False, skeleton=open_clip_skeleton,
                   text_tower=True,
                   description="open_clip image tower with a zero-shot head from class names (local weights)")
def build_open_clip(options: OpenCLIPOptions, benchmark, seed: int) -> nn.Module:
    from .clip import DEFAULT_TEMPLATES, zero_shot_classifier

    torch.manual_seed(seed)
    return zero_shot_classifier(options.model_name, benchmark.class_names,
                                templates=tuple(options.templates or DEFAULT_TEMPLATES),
                                pretrained=options.pretrained, model_cfg=options.model_cfg)
