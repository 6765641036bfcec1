"""AugMix views of float image batches, vectorised (pure torch; no Avalanche import).

AugMix (Hendrycks et al., "AugMix: A Simple Data Processing Method to Improve Robustness and Uncertainty", ICLR
2020) as MEMO (Zhang et al., NeurIPS 2022) and TTACIL (Marouf et al., arXiv 2310.11482; ``utils/third_party.py``
of thinh-huynh-re/TTACIL) use it at test time: a pre-augmentation (random crop with padding, random horizontal
flip), then three chains of 1-3 random operations mixed with Dirichlet(1, 1, 1) weights, and the mix blended with
the pre-augmented image by a Beta(1, 1) factor. The operations and their severity-1 ranges are the reference's:
autocontrast, equalize, rotate (up to 3 degrees), solarize (threshold 230-255 of 255), shear x/y (up to 0.03),
translate x/y, posterize (4 bits).

torchvision's ``AugMix`` and the reference's PIL operations need ``uint8`` images one at a time; the offline
benchmarks hold small float tensors, so every operation here acts on a float batch ``(M, C, H, W)`` in ``[0, 1]``
with parameters drawn per image, and the geometric operations are one batched affine resampling. Differences to
the reference (documented in ``docs/methods/zero_shot_and_tta.md``):

- translation is continuous and relative to the image side (up to ``side / 30`` at severity 1; the reference's
  ``32 / 3 / 10`` pixels were meant for 32-pixel CIFAR images and become ``int()``-truncated at 224);
- equalize and posterize round to 256 levels and back; solarize uses the reference's threshold on that scale;
- ``hflip`` is an option, off by default: mirrored digits are not the same digit (``flip_lr`` is a test domain of
  ``domain_mnist``); the reference flips (natural images);
- inputs outside ``[0, 1]`` (normalised images) are refused: give the un-normalised batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..config import check_range

OPS = ("autocontrast", "equalize", "rotate", "solarize", "shear_x", "shear_y", "translate_x", "translate_y",
       "posterize")


@dataclass(kw_only=True)
class AugMixConfig:
    """AugMix views as MEMO / TTACIL make them (severity 1, width 3, depth 1-3).

    Args:
        width: number of mixed chains (the reference's 3), >= 1.
        max_depth: each chain applies 1..max_depth random operations (reference 3), >= 1.
        crop_padding: pixels of zero padding of the pre-augmentation random crop (reference 4), >= 0.
        hflip: random horizontal flip in the pre-augmentation (reference True; False here, see the module doc).
        fill: value of the pixels that rotate/shear/translate bring in (reference 128 of 255), in [0, 1].
    """

    width: int = 3
    max_depth: int = 3
    crop_padding: int = 4
    hflip: bool = False
    fill: float = 128 / 255

    def __post_init__(self) -> None:
        for name in ("width", "max_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.crop_padding, bool) or not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {self.crop_padding!r}")
        check_range("fill", self.fill, 0.0, 1.0)


def _level(m: int, g: torch.Generator, device) -> torch.Tensor:
    """The reference's ``rand_lvl(1)``: uniform in [0.1, 1], one per image."""
    return 0.1 + 0.9 * torch.rand(m, generator=g).to(device)


def _sign(m: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.where(torch.rand(m, generator=g) > 0.5, -1.0, 1.0).to(device)


def _affine(x: torch.Tensor, theta: torch.Tensor, fill: float) -> torch.Tensor:
    """Resample ``x`` with per-image affine maps ``theta`` (M, 2, 3) in normalised coordinates; outside = fill."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    ones = torch.ones_like(x[:, :1])
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = out[:, -1:]
    return out[:, :-1] + (1 - inside) * fill


def _op(name: str, x: torch.Tensor, g: torch.Generator, fill: float) -> torch.Tensor:
    m, device = x.shape[0], x.device
    if name == "autocontrast":
        return TF.autocontrast(x)
    if name in ("equalize", "posterize"):
        q = (x * 255).round().to(torch.uint8)
        q = TF.equalize(q) if name == "equalize" else TF.posterize(q, 4)  # bits 4 - int(0.4 * level) = 4
        return q.to(x.dtype) / 255
    if name == "solarize":
        threshold = (256 - (_level(m, g, device) * 25.6).floor()).view(-1, 1, 1, 1) / 255
        return torch.where(x >= threshold, 1 - x, x)
    theta = torch.zeros(m, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if name == "rotate":  # int(level * 30 / 10) degrees, random sign
        angle = torch.deg2rad((_level(m, g, device) * 3).floor() * _sign(m, g, device))
        theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
        theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    elif name in ("shear_x", "shear_y"):  # level * 0.3 / 10, random sign
        theta[:, 0 if name == "shear_x" else 1, 1 if name == "shear_x" else 0] = (
            _level(m, g, device) * 0.03 * _sign(m, g, device))
    else:  # translate: level * side / 3 / 10 pixels, i.e. level / 15 in [-1, 1] coordinates
        theta[:, 0 if name == "translate_x" else 1, 2] = _level(m, g, device) / 15 * _sign(m, g, device)
    return _affine(x, theta, fill)


def _pre_augment(x: torch.Tensor, g: torch.Generator, config: AugMixConfig) -> torch.Tensor:
    m, _, h, w = x.shape
    p = config.crop_padding
    if p:
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (m,), generator=g).tolist()
        dx = torch.randint(0, 2 * p + 1, (m,), generator=g).tolist()
        x = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))])
    if config.hflip:
        flip = (torch.rand(m, generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x


@torch.no_grad()
def augmix_views(images: torch.Tensor, n_views: int, *, generator: torch.Generator,
                 config: AugMixConfig | None = None) -> torch.Tensor:
    """``n_views`` AugMix views of each image: ``(B, C, H, W)`` in [0, 1] -> ``(B, n_views, C, H, W)``.

    Every view draws its own pre-augmentation, chains, Dirichlet weights and Beta factor from ``generator``
    (CPU generator; the same generator state gives the same views).

    Raises:
        ValueError: ``images`` is not a 4-D float batch in [0, 1], or ``n_views`` < 1.
    """
    config = config or AugMixConfig()
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float batch (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"AugMix needs images in [0, 1] (un-normalised), got values in [{lo:.3g}, {hi:.3g}]")
    b = images.shape[0]
    x = images.repeat_interleave(n_views, 0)  # view j of image i at row i * n_views + j
    m, device = x.shape[0], x.device
    x = _pre_augment(x, generator, config)
    w = _dirichlet(m, config.width, generator)
    beta = torch.rand(m, generator=generator)  # Beta(1, 1) is uniform on [0, 1]
    mix = torch.zeros_like(x)
    for k in range(config.width):
        chain = x
        depth = torch.randint(1, config.max_depth + 1, (m,), generator=generator)
        for step in range(config.max_depth):
            choice = torch.randint(0, len(OPS), (m,), generator=generator)
            active = depth > step
            out = chain.clone()
            for o, name in enumerate(OPS):
                rows = ((choice == o) & active).nonzero().flatten()
                if rows.numel():
                    out[rows.to(device)] = _op(name, chain[rows.to(device)], generator, config.fill)
            chain = out
        mix = mix + w[:, k].to(device).view(-1, 1, 1, 1) * chain
    beta = beta.to(device).view(-1, 1, 1, 1)
    views = (beta * x + (1 - beta) * mix).clamp(0, 1)
    return views.view(b, n_views, *images.shape[1:])


def _dirichlet(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Dirichlet(1, ..., 1) samples from ``g``: normalised Exp(1) draws (the Gamma(1) special case)."""
    e = -torch.log1p(-torch.rand(m, k, generator=g))  # 1 - U is in (0, 1]: no log(0)
    return e / e.sum(1, keepdim=True)
