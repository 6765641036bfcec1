"""C-CLIP's pure core (no Avalanche import): the CLIP and CKC losses, the shared projector, merging LoRA.

Liu et al., "C-CLIP: Multimodal Continual Learning for Vision-Language Model", ICLR 2025. Per task, both CLIP
towers get a fresh LoRA; the loss is CLIP's contrastive loss plus *contrastive knowledge consolidation* (CKC,
Eq. 5): an InfoNCE loss (temperature 0.07) between the new model's image/text features passed through a shared
two-layer projector ``h_psi`` and the frozen previous model's features, each side the concatenation
``[image, text]`` L2-normalised as one vector, positives the same image-text pair. After the task the LoRA update
is merged into the weights with a factor ``alpha`` (0.5): ``W <- W + alpha * delta W``.

The official code was not readable; the details below follow the paper and the reimplementation
KoyoImai/C-CLIP (read, not copied): projector Linear(d, 2d) - BatchNorm - ReLU - Linear(2d, d) applied to the
L2-normalised CLIP features; LoRA r 16, alpha 32, dropout 0.1; AdamW weight decay 0.2; text learning rate 10x the
image one; CKC only from the second task on (the first has no previous model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn


def clip_contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over ``logit_scale * image @ text.T`` (Radford et al. 2021; C-CLIP Eq. 6).

    Args:
        image, text: ``(N, D)`` L2-normalised features of N matching pairs.
        logit_scale: the inverse temperature (CLIP's ``logit_scale.exp()``).
    """
    _check_pair(image, text, "image", "text")
    logits = logit_scale * image @ text.t()
    labels = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def ckc_loss(new_image: torch.Tensor, new_text: torch.Tensor, old_image: torch.Tensor, old_text: torch.Tensor,
             temperature: float = 0.07) -> torch.Tensor:
    """Contrastive knowledge consolidation (C-CLIP Eq. 5): symmetric InfoNCE between
    ``h_i = normalize([new_image_i, new_text_i])`` (the new model's projected features) and
    ``z_i = normalize([old_image_i, old_text_i])`` (the frozen previous model's), positives on the diagonal.

    Returns ``log N`` in expectation for unrelated random features, and tends to 0 when ``h == z`` (distinct rows)
    as the temperature goes to 0.

    Raises:
        ValueError: shapes differ, fewer than 2 pairs, or a temperature that is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_pair(new_image, new_text, "new_image", "new_text")
    _check_pair(old_image, old_text, "old_image", "old_text")
    h = F.normalize(torch.cat([new_image, new_text], dim=-1), dim=-1)
    z = F.normalize(torch.cat([old_image, old_text], dim=-1), dim=-1)
    if h.shape != z.shape:
        raise ValueError(f"new features {tuple(h.shape)} and old features {tuple(z.shape)} differ in shape")
    logits = h @ z.t() / temperature
    labels = torch.arange(h.shape[0], device=h.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _check_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must be (N, D) of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"a contrastive loss needs at least 2 pairs, got {a.shape[0]}")


class Projector(nn.Module):
    """C-CLIP's shared projector ``h_psi``: Linear(d, h) - BatchNorm1d - ReLU - Linear(h, d), ``h = 2d`` default."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        if dim < 1 or (hidden is not None and hidden < 1):
            raise ValueError(f"dim and hidden must be >= 1, got {dim} and {hidden}")
        hidden = hidden or 2 * dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def merge_lora_(model: nn.Module, alpha: float) -> int:
    """Fold every peft LoRA layer of ``model`` into its base weight as ``W <- W + alpha * delta W`` (delta W =
    ``scaling * B A`` of each of its adapters) and put the plain base layer back in its place, in place.

    Returns:
        The number of layers merged.

    Raises:
        ValueError: ``alpha`` outside ``(0, 1]``.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        base = layer.get_base_layer()
        for adapter in list(layer.lora_A):
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            base.weight += alpha * layer.scaling[adapter] * (b @ a).to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return len(layers)


__all__ = ["Projector", "ckc_loss", "clip_contrastive_loss", "merge_lora_"]
