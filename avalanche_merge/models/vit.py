"""A small Vision Transformer that trains on two CPU cores in seconds.

Architecture as in Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), scaled down:
patch embedding, a learnable class token, learned position embeddings, pre-norm blocks and a linear head.
Attention uses separate ``q``, ``k`` and ``v`` linear layers (not a fused ``qkv``) so that peft's
``target_modules=["q", "k", "v"]`` and per-projection analyses address them by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyViTConfig:
    """Shape of a :class:`TinyViT`.

    Args:
        image_size: side of the square input image, in pixels.
        patch_size: side of a square patch; must divide ``image_size``.
        in_chans: input channels.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        num_classes: outputs of the classification head.
    """

    image_size: int = 28
    patch_size: int = 7
    in_chans: int = 1
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "dim", "depth", "heads", "mlp_ratio", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size must divide image_size, got patch_size={self.patch_size}, image_size={self.image_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"heads must divide dim, got heads={self.heads}, dim={self.dim}")

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small ViT classifier; ``features(x)`` returns the normalised class token.

    Args:
        config: the architecture; defaults to :class:`TinyViTConfig()` (about 70k parameters).
    """

    def __init__(self, config: TinyViTConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyViTConfig()
        c = self.config
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(c.in_chans, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token embedding after the final norm, shape ``(batch, dim)``."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_chans or x.shape[-1] != c.image_size or x.shape[-2] != c.image_size:
            raise ValueError(
                f"expected input of shape (batch, {c.in_chans}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_head(self, num_classes: int | None = None, *, generator: torch.Generator | None = None) -> None:
        """Replace the head by a freshly initialised linear layer (class-incremental use)."""
        n = self.config.num_classes if num_classes is None else num_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {n!r}")
        self.config = replace(self.config, num_classes=n)
        head = nn.Linear(self.config.dim, n)
        bound = 1.0 / self.config.dim**0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.zero_()
        self.head = head


class FeatureExtractor(nn.Module):
    """Wraps a model exposing ``features(x)`` so that ``forward`` returns the features (for SLDA/NCM)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "features"):
            raise TypeError(f"{type(model).__name__} has no features(x) method")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)
