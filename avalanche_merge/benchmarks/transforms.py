"""Fixed (deterministic) image transformations that turn MNIST into distinct domains.

Each domain applies one fixed transformation to every image, in the spirit of permuted/rotated MNIST
(Goodfellow et al. 2013; Lopez-Paz & Ranzato 2017) and of the corruption families of MNIST-C
(Mu & Gilmer 2019). A sequence of domains over the same ten digits is the small-scale analogue of the
8-dataset benchmark of task-vector merging (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

All functions map a float batch ``(N, C, H, W)`` in [0, 1] to a batch of the same shape, and are deterministic:
the permutation and the noise are drawn from fixed generators, independent of any run seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ..registry import Registry

DomainTransform = Callable[[torch.Tensor], torch.Tensor]

DOMAINS: Registry[DomainTransform] = Registry("domain")

DEFAULT_DOMAINS = ("rotate_90", "flip_lr", "edges", "zoom_out", "noise", "shear", "blur", "rotate_45")
"""Default sequence of the ``domain_mnist`` benchmark: eight domains, some far from the pretraining augmentation
(rotations, mirroring, edge maps) and some close to it (scale, noise, shear, blur): the regime in which the
pretrained model is fairly strong relative to the tasks and fine-tuning moves the weights little. Measured on
the default backbone with the bench settings (``experiments/individual_finetune.py``, 3 seeds): pretrained 56.4%
mean accuracy, each domain fine-tuned alone 79.9%. ``invert`` and ``pixel_permute`` are registered too; they are
far harder for a patch-based ViT (fine-tuning reached about 50% on ``invert`` in that budget in a probe run)."""


@DOMAINS.register("identity")
def identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@DOMAINS.register("rotate_90")
def rotate_90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(-2, -1)).contiguous()


@DOMAINS.register("rotate_180")
def rotate_180(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 2, dims=(-2, -1)).contiguous()


@DOMAINS.register("rotate_45")
def rotate_45(x: torch.Tensor) -> torch.Tensor:
    return TF.rotate(x, 45.0)


@DOMAINS.register("flip_lr")
def flip_lr(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).contiguous()


@DOMAINS.register("flip_ud")
def flip_ud(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-2).contiguous()


@DOMAINS.register("invert")
def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


@DOMAINS.register("blur")
def blur(x: torch.Tensor) -> torch.Tensor:
    return TF.gaussian_blur(x, kernel_size=[7, 7], sigma=[1.5, 1.5])


@DOMAINS.register("noise")
def noise(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (x + 0.35 * torch.randn(x.shape, generator=g)).clamp(0, 1)


@DOMAINS.register("low_contrast")
def low_contrast(x: torch.Tensor) -> torch.Tensor:
    return 0.4 + 0.25 * x


@DOMAINS.register("shear")
def shear(x: torch.Tensor) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[35.0, 0.0])


@DOMAINS.register("zoom_out")
def zoom_out(x: torch.Tensor) -> torch.Tensor:
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=0.7, shear=[0.0, 0.0])


@DOMAINS.register("pixel_permute")
def pixel_permute(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    flat = x.flatten(-2)
    perm = torch.randperm(flat.shape[-1], generator=g)
    return flat[..., perm].view_as(x).contiguous()


@DOMAINS.register("patch_shuffle")
def patch_shuffle(x: torch.Tensor, patch: int = 7) -> torch.Tensor:
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"patch_shuffle needs image sides divisible by {patch}, got {h}x{w}")
    g = torch.Generator().manual_seed(3)
    gh, gw = h // patch, w // patch
    tiles = x.view(n, c, gh, patch, gw, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, gh * gw, patch, patch)
    tiles = tiles[:, :, torch.randperm(gh * gw, generator=g)]
    return tiles.view(n, c, gh, gw, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w).contiguous()


def apply_domain(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the registered domain transformation ``name`` to a batch in [0, 1]."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    return DOMAINS.get(name)(x)


@DOMAINS.register("edges")
def edges(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude (the edge-map corruption of MNIST-C)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    kx = kx.repeat(x.shape[1], 1, 1, 1)
    gx = F.conv2d(x, kx, padding=1, groups=x.shape[1])
    gy = F.conv2d(x, kx.transpose(-1, -2), padding=1, groups=x.shape[1])
    return ((gx**2 + gy**2).sqrt() / 2.0).clamp(0, 1)


@DOMAINS.register("impulse")
def impulse(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    u = torch.rand(x.shape, generator=g)
    return torch.where(u < 0.08, torch.zeros_like(x), torch.where(u > 0.92, torch.ones_like(x), x))
