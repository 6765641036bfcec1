"""Offline open_clip loading and zero-shot classification.

CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021)
classifies an image by the cosine similarity between its embedding and text embeddings of class prompts.
Following the task-arithmetic recipe (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023),
:class:`ZeroShotClassifier` keeps only the image tower plus a frozen-able linear head made of those text
embeddings, so fine-tuning and merging act on the image encoder.

Nothing here downloads: models are built from open_clip's bundled configs (or a caller's config dict), use the
bundled BPE tokenizer, and load weights only from a local checkpoint file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..safe_load import load_weights

#: six of CLIP's 80 ImageNet prompt templates (Radford et al. 2021, Sec. 3.1.4)
DEFAULT_TEMPLATES: tuple[str, ...] = (
    *("a photo of a {}.", "a photo of the {}.", "a bad photo of a {}."),
    *("a close-up photo of a {}.", "itap of a {}.", "art of the {}."),
)

_BPE_VOCAB_SIZE = 49408  # ids produced by open_clip's bundled SimpleTokenizer


def _check_strings(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of str, got {type(value).__name__}")
    items = tuple(value)
    if not items:
        raise ValueError(f"{name} must not be empty")
    if not all(isinstance(item, str) for item in items):
        raise TypeError(f"{name} must contain only str, got {items!r}")
    return items


@torch.no_grad()
def build_zero_shot_head(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings for zero-shot classification, shape ``(num_classes, embed_dim)``.

    Each template is filled with each class name, encoded by ``model.encode_text``, L2-normalised,
    averaged over templates and normalised again (prompt ensembling, Radford et al. 2021, Sec. 3.1.4).
    ``batch_size`` counts prompts per text-encoder call. The model's train/eval mode is restored afterwards.
    """
    names = _check_strings(class_names, "class_names")
    temps = _check_strings(templates, "templates")
    for template in temps:
        if "{}" not in template:
            raise ValueError(f"every template must contain '{{}}' for the class name, got {template!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not callable(getattr(model, "encode_text", None)):
        raise TypeError(f"{type(model).__name__} has no encode_text method")

    prompts = [template.replace("{}", name) for name in names for template in temps]
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device)).float()
            for i in range(0, len(prompts), batch_size)
        ]
    finally:
        model.train(was_training)
    embeddings = F.normalize(torch.cat(chunks), dim=-1).view(len(names), len(temps), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)


class ZeroShotClassifier(nn.Module):
    """An image encoder followed by a bias-free linear head of class text embeddings.

    ``forward(images)`` returns ``logit_scale * head(normalize(image_features))``; with unit-norm head rows
    these are scaled cosine similarities, as in CLIP's zero-shot evaluation.

    Args:
        image_encoder: open_clip's ``model.visual`` tower, a whole CLIP model (its ``visual`` tower is kept),
            or any module mapping images to ``(batch, embed_dim)`` features.
        head_weights: ``(num_classes, embed_dim)`` class embeddings, e.g. from :func:`build_zero_shot_head`.
        logit_scale: multiplier of the cosine similarities (CLIP's learned temperature, 100 when pretrained).
        class_names: optional names of the classes, kept as ``self.class_names``.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        head_weights: torch.Tensor,
        *,
        logit_scale: float = 100.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(image_encoder, nn.Module):
            raise TypeError(f"image_encoder must be an nn.Module, got {type(image_encoder).__name__}")
        if not isinstance(head_weights, torch.Tensor):
            raise TypeError(f"head_weights must be a torch.Tensor, got {type(head_weights).__name__}")
        if head_weights.dim() != 2 or not head_weights.is_floating_point():
            raise ValueError(
                f"head_weights must be a 2-D float tensor (num_classes, embed_dim), "
                f"got {head_weights.dtype} of shape {tuple(head_weights.shape)}"
            )
        visual = getattr(image_encoder, "visual", None)
        if callable(getattr(image_encoder, "encode_image", None)) and isinstance(visual, nn.Module):
            image_encoder = visual
        num_classes, embed_dim = head_weights.shape
        output_dim = getattr(image_encoder, "output_dim", None)
        if isinstance(output_dim, int) and output_dim != embed_dim:
            raise ValueError(f"head_weights have embed_dim {embed_dim} but the image encoder outputs {output_dim}")
        if class_names is not None:
            class_names = _check_strings(class_names, "class_names")
            if len(class_names) != num_classes:
                raise ValueError(f"got {len(class_names)} class_names for {num_classes} head rows")
        self.image_encoder = image_encoder
        self.head = nn.Linear(embed_dim, num_classes, bias=False)
        self.head.to(device=head_weights.device, dtype=head_weights.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head_weights)
        self.logit_scale = float(logit_scale)
        self.class_names = class_names

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, shape ``(batch, embed_dim)``."""
        encoder = self.image_encoder
        out = encoder.encode_image(images) if callable(getattr(encoder, "encode_image", None)) else encoder(images)
        if isinstance(out, tuple):  # open_clip towers built with output_tokens=True
            out = out[0]
        return F.normalize(out, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.head.parameters()).dtype  # any head module (a per-task head replaces the linear one)
        return self.logit_scale * self.head(self.features(images).to(dtype))


def _resolve_config(model_name: str, model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    import open_clip

    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    if not model_name or model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model_name={model_name!r}: give a built-in config name or model_cfg (no schemas)")
    if model_cfg is None:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; pass model_cfg or use open_clip.list_models()")
    elif isinstance(model_cfg, Mapping):
        cfg = copy.deepcopy(dict(model_cfg))
    else:
        raise TypeError(f"model_cfg must be a dict, got {type(model_cfg).__name__}")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise ValueError(f"model_cfg for {model_name!r} lacks keys {missing}")
    text_cfg, vision_cfg = dict(cfg["text_cfg"]), dict(cfg["vision_cfg"])
    if "multimodal_cfg" in cfg:
        raise ValueError(f"{model_name!r} is a CoCa model; only contrastive CLIP models are supported")
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        raise ValueError(f"{model_name!r} needs a Hugging Face Hub text tower/tokenizer, unavailable offline")
    if text_cfg.get("vocab_size", _BPE_VOCAB_SIZE) < _BPE_VOCAB_SIZE:
        raise ValueError(f"text_cfg vocab_size must be >= {_BPE_VOCAB_SIZE} for the BPE tokenizer")
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # never fetch ImageNet weights for a timm tower
    cfg["text_cfg"], cfg["vision_cfg"] = text_cfg, vision_cfg
    return cfg


def _checkpoint_path(pretrained: str | os.PathLike[str] | None) -> Path | None:
    if pretrained is None:
        return None
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a path or None, got {type(pretrained).__name__}")
    checkpoint = Path(pretrained).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"pretrained={os.fspath(pretrained)!r} is not an existing file; weights cannot be downloaded here, "
            "so give a local checkpoint path (or None for a random initialisation)"
        )
    return checkpoint


def _build_architecture(model_name: str, cfg: dict[str, Any]) -> nn.Module:
    import open_clip

    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    try:
        return model_class(**cfg)
    except TypeError as error:  # unknown keys in a caller's config
        raise ValueError(f"invalid config for {model_name!r}: {error}") from None


def open_clip_architecture(
    model_name: str,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    model_cfg: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The CLIP model :func:`load_open_clip` would build, with random weights and ``pretrained`` only checked.

    Build it under ``torch.device("meta")`` for a free shape check (the runner's plan-time check does).

    Raises:
        FileNotFoundError: ``pretrained`` is not an existing file.
        ValueError: unknown or unsupported architecture.
    """
    _checkpoint_path(pretrained)
    return _build_architecture(model_name, _resolve_config(model_name, model_cfg))


def load_open_clip(
    model_name: str,
    *,
    pretrained: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    model_cfg: Mapping[str, Any] | None = None,
    preprocess_cfg: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """Build an open_clip model without network access; returns ``(model, preprocess, tokenizer)``.

    Args:
        model_name: a built-in config (``open_clip.list_models()``; ``-quickgelu`` ones for OpenAI weights),
            or any label when ``model_cfg`` (``embed_dim``, ``vision_cfg``, ``text_cfg``...) is given.
        pretrained: a local checkpoint file (``.bin``/``.pt``/``.safetensors`` state dict), loaded strictly with
            :func:`avalanche_merge.safe_load.load_weights` (safetensors, or ``torch.load(weights_only=True)``: a
            checkpoint cannot run code); ``None`` keeps the random init. Hub tags are never resolved.
        preprocess_cfg: overrides of ``open_clip.transform.PreprocessCfg`` (``mean``, ``std``...).

    The model comes back in eval mode, with the evaluation transform (PIL image to tensor) and BPE tokenizer.

    Raises:
        FileNotFoundError: ``pretrained`` is not an existing file (checked before anything is built).
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    checkpoint = _checkpoint_path(pretrained)
    cfg = _resolve_config(model_name, model_cfg)
    model = _build_architecture(model_name, cfg)
    if checkpoint is not None:  # our loader: open_clip's retries without weights_only on a TypeError (issue 15)
        state = load_weights(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{checkpoint} does not fit {model_name!r}: {exc}") from None
    model.to(device).eval()

    overrides = dict(preprocess_cfg or {})
    overrides["size"] = model.visual.image_size
    try:
        pp_cfg = PreprocessCfg(**overrides)
    except TypeError as error:
        raise ValueError(f"invalid preprocess_cfg {dict(preprocess_cfg or {})!r}: {error}") from None
    open_clip.set_model_preprocess_cfg(model, asdict(pp_cfg))
    preprocess = image_transform_v2(pp_cfg, is_train=False)

    text_cfg = cfg["text_cfg"]  # the bundled BPE vocabulary: no Hub access, unlike HF tokenizers
    tokenizer = open_clip.SimpleTokenizer(
        context_length=text_cfg.get("context_length", 77), **text_cfg.get("tokenizer_kwargs", {})
    )
    return model, preprocess, tokenizer


def zero_shot_classifier(
    model_name: str,
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    pretrained: str | os.PathLike[str] | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> ZeroShotClassifier:
    """Load a CLIP model with :func:`load_open_clip` and wrap its image tower with a zero-shot head.

    The text tower builds the head; it is not part of the classifier's modules (its state dict, parameters and
    task vectors are the image tower's and the head's), but stays reachable as ``classifier.text_tower``
    (a :class:`TextTower`, for methods that train both towers, such as C-CLIP). The evaluation transform is kept
    as ``classifier.preprocess``.
    """
    names = _check_strings(class_names, "class_names")
    model, preprocess, tokenizer = load_open_clip(model_name, pretrained=pretrained, device=device, model_cfg=model_cfg)
    head = build_zero_shot_head(model, tokenizer, names, templates, device=device, batch_size=batch_size)
    scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    classifier = ZeroShotClassifier(model.visual, head, logit_scale=scale, class_names=names)
    classifier.preprocess = preprocess
    classifier.text_tower = TextTower(model, tokenizer, tuple(templates))  # a plain attribute, not a submodule
    return classifier


class TextTower:
    """The whole CLIP model behind a :class:`ZeroShotClassifier` (its ``visual`` is the classifier's image
    encoder, the same module), its tokenizer and the head's prompt templates. A plain object, so that nn.Module
    does not register the text tower as a submodule of the classifier."""

    def __init__(self, clip: nn.Module, tokenizer: Callable[..., torch.Tensor], templates: tuple[str, ...]) -> None:
        self.clip, self.tokenizer, self.templates = clip, tokenizer, templates
