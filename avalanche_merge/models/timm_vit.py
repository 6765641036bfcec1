"""Full-size ViTs (ViT-B/16 and its siblings) from local timm-format checkpoints, for the paper protocols.

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; timm (Wightman, pytorch-image-models). InfLoRA,
SD-LoRA, CL-LoRA, RanPAC, L2P and CODA-Prompt all start from timm's ``vit_base_patch16_224`` (ImageNet-21k or
21k -> 1k weights). The ``timm_vit`` backbone builds the same network as :class:`~avalanche_merge.models.vit.TinyViT`
(class token, learned position embeddings, pre-norm blocks, final norm, linear head on the class token) at timm's
sizes, with LayerNorm ``eps=1e-6`` as in timm, and loads a timm state dict by renaming its keys and splitting the
fused ``attn.qkv`` projection into ``q``, ``k`` and ``v``: the LoRA methods then address ``q``, ``k``, ``v`` by
name exactly as on the tiny backbone (InfLoRA adapts ``k`` and ``v``, SD-LoRA ``q`` and ``v``). The features
equal timm's ``forward_head(forward_features(x), pre_logits=True)`` (a test compares them on a random timm model).

Nothing is downloaded: ``checkpoint`` is a local file (``.safetensors``, or a torch checkpoint read with
``weights_only=True``); the classifier head of the checkpoint is dropped and a new one drawn from the run seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbones import register_backbone
from .vit import TinyViT, TinyViTConfig

#: timm name -> (width, depth, heads, patch size)
ARCHITECTURES = {
    "vit_tiny_patch16_224": (192, 12, 3, 16),
    "vit_small_patch16_224": (384, 12, 6, 16),
    "vit_base_patch16_224": (768, 12, 12, 16),
    "vit_base_patch32_224": (768, 12, 12, 32),
    "vit_large_patch16_224": (1024, 24, 16, 16),
}
LAYER_NORM_EPS = 1e-6  # timm's ViTs; torch's default is 1e-5
_DROPPED = ("head.", "fc_norm.")  # the checkpoint's classifier (a new head is drawn) and an identity fc_norm
_BLOCK_RENAMES = {"mlp.fc1.": "fc1.", "mlp.fc2.": "fc2."}


@dataclass
class TimmViTOptions:
    """Options of the ``timm_vit`` backbone.

    Args:
        arch: timm architecture name, one of :data:`ARCHITECTURES`.
        checkpoint: path of a local timm-format state dict (e.g. ``vit_base_patch16_224.augreg_in21k``'s
            ``model.safetensors``); required unless ``random_init``. ``.safetensors`` files get a full key and
            shape check at plan time (``--dry-run``); other formats are only checked to exist until the run loads
            them.
        random_init: build random weights instead (shape and speed checks only; no paper number holds for them).
    """

    arch: str = "vit_base_patch16_224"
    checkpoint: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        if self.random_init and self.checkpoint:
            raise ValueError("give either checkpoint or random_init=true, not both")
        if not self.random_init and not (self.checkpoint and str(self.checkpoint).strip()):
            raise ValueError(f"checkpoint must be the path of a local {self.arch} weights file (nothing is "
                             f"downloaded), got {self.checkpoint!r}; set random_init=true for random weights")


def vit_config(arch: str, input_shape: tuple[int, int, int], num_classes: int) -> TinyViTConfig:
    """The :class:`TinyViTConfig` of timm's ``arch`` for inputs of ``input_shape`` and ``num_classes`` outputs."""
    dim, depth, heads, patch = ARCHITECTURES[arch]
    c, s, _ = input_shape
    if s % patch:
        raise ValueError(f"{arch} has {patch}-pixel patches, which do not divide the benchmark's image size {s} "
                         f"(set the benchmark's image_size, e.g. 224)")
    return TinyViTConfig(image_size=s, patch_size=patch, in_chans=c, dim=dim, depth=depth, heads=heads,
                         mlp_ratio=4, num_classes=num_classes)


def build_vit(config: TinyViTConfig) -> TinyViT:
    """A :class:`TinyViT` of ``config`` with timm's LayerNorm epsilon."""
    model = TinyViT(config)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = LAYER_NORM_EPS
    return model


def _rename(key: str) -> str:
    if key == "patch_embed.proj.weight" or key == "patch_embed.proj.bias":
        return key.replace("patch_embed.proj.", "patch_embed.")
    if key.startswith("blocks."):
        for old, new in _BLOCK_RENAMES.items():
            key = key.replace(f".{old}", f".{new}", 1)
    return key


def from_timm_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict in :class:`TinyViT` names (``qkv`` split into ``q``, ``k``, ``v``; head dropped).

    Raises:
        ValueError: a key with no counterpart (e.g. ``pre_logits``, layer scales, register tokens).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_DROPPED):
            continue
        if ".attn.qkv." in key:
            prefix, kind = key.split(".attn.qkv.")
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}.attn.{name}.{kind}"] = part.clone()
            continue
        out[_rename(key)] = value
    return out


def expected_timm_shapes(model: TinyViT) -> dict[str, tuple[int, ...]]:
    """The timm keys and shapes a checkpoint for ``model`` must hold (head excluded)."""
    shapes = {}
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            continue
        if ".attn.q." in key:
            shape = (3 * value.shape[0], *value.shape[1:])
            shapes[key.replace(".attn.q.", ".attn.qkv.")] = shape
            continue
        if ".attn.k." in key or ".attn.v." in key:
            continue
        timm_key = key.replace("patch_embed.", "patch_embed.proj.") if key.startswith("patch_embed.") else key
        if key.startswith("blocks."):
            for old, new in _BLOCK_RENAMES.items():
                timm_key = timm_key.replace(f".{new}", f".{old}", 1)
        shapes[timm_key] = tuple(value.shape)
    return shapes


def _check_checkpoint_shapes(path: Path, model: TinyViT, arch: str) -> None:
    from .pretrain import checkpoint_shapes

    found = {k: v for k, v in checkpoint_shapes(path).items() if not k.startswith(_DROPPED)}
    expected = expected_timm_shapes(model)
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        raise ValueError(f"checkpoint {path} is not a timm {arch} state dict: missing {missing[:4]}, unexpected "
                         f"{extra[:4]}, wrong shapes {[(k, found[k], expected[k]) for k in wrong[:4]]}")


def timm_vit_skeleton(options: TimmViTOptions, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The architecture on the meta device; the checkpoint must exist (and fit, when it is safetensors).

    Raises:
        FileNotFoundError: ``checkpoint`` is not a file.
        ValueError: the architecture does not fit the benchmark, or a safetensors checkpoint does not fit it.
    """
    config = vit_config(options.arch, input_shape, num_classes)
    with torch.device("meta"):
        model = build_vit(config)
    if options.checkpoint is not None:
        path = Path(options.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} of {options.arch} is not a file (nothing is "
                                    f"downloaded; give a local timm-format weights file)")
        if path.suffix == ".safetensors":
            _check_checkpoint_shapes(path, model, options.arch)
    return model


@register_backbone("timm_vit", config_cls=TimmViTOptions, offline=False, skeleton=timm_vit_skeleton,
                   description="ViT-B/16 (or another timm ViT) from a local timm-format checkpoint, q/k/v split")
def build_timm_vit(options: TimmViTOptions, benchmark, seed: int) -> nn.Module:
    from ..safe_load import load_weights

    config = vit_config(options.arch, tuple(benchmark.input_shape), benchmark.num_classes)
    torch.manual_seed(seed)
    model = build_vit(config)
    if options.checkpoint is not None:
        state = from_timm_state(load_weights(Path(options.checkpoint).expanduser()))
        expected = {k for k in model.state_dict() if not k.startswith("head.")}
        if set(state) != expected:
            raise ValueError(f"checkpoint {options.checkpoint} does not fit {options.arch}: missing "
                             f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")
        model.load_state_dict(state, strict=False)
    model.reset_head(benchmark.num_classes, generator=torch.Generator().manual_seed(seed))
    return model
