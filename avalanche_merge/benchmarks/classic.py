"""Split CIFAR-100 / Split CIFAR-10 as thin wrappers over ``avalanche.benchmarks.classic``, from local files only.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009. The extracted python-pickle archives
must sit under ``dataset_root`` in torchvision's layout (``cifar-100-python/``, ``cifar-10-batches-py/``). They
are checked (presence and, by default, torchvision's MD5s) before Avalanche is imported, so a wrong path fails at
once; Avalanche's ``SplitCIFAR100``/``SplitCIFAR10`` then load them through torchvision (``download=True``
finds the intact files; a guard turns any download attempt into an error). Classes are shuffled by ``seed`` and
relabelled in order of appearance (``class_ids_from_zero_from_first_exp=True``): experience ``k`` holds the
contiguous labels named in ``experience_names[k]``, ``class_names[y]`` names label ``y`` and
``info["class_order"]`` keeps the original ids. Samples are ``(x, y, t)`` triplets (``t`` = experience index
with ``task_labels=True``, else 0). Also holds validation helpers shared with :mod:`.image_folder`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..safe_load import NUMPY_ARRAY_GLOBALS, safe_unpickle
from .base import Benchmark
from .registry import register_benchmark

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Layout and MD5s of the extracted archives: torchvision's CIFAR100/CIFAR10 ``train_list``, ``test_list`` and
# ``meta`` (pinned here so a wrong path fails before torchvision is imported; a test checks they still agree).
_CIFAR = {
    "cifar100": {
        "folder": "cifar-100-python", "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "files": [("train", "16019d7e3df5f24257cddd939b257f8d"), ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
                  ("meta", "7973b15100ade9c7d40fb424638fde48")],
        "names_key": "fine_label_names", "num_classes": 100, "avalanche": "SplitCIFAR100",
    },
    "cifar10": {
        "folder": "cifar-10-batches-py", "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "files": [("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                  ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                  ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                  ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                  ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
                  ("test_batch", "40351d587109b95175f43aff81a1287e"),
                  ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")],
        "names_key": "label_names", "num_classes": 10, "avalanche": "SplitCIFAR10",
    },
}

# ----------------------------------------------------------------------------------------------------------------
# validation helpers (shared with image_folder.py)


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_root(dataset_root: Any) -> Path:
    if not isinstance(dataset_root, (str, os.PathLike)):
        raise TypeError(f"dataset_root must be a str or path, got {type(dataset_root).__name__} ({dataset_root!r})")
    if not str(dataset_root).strip():
        raise ValueError(f"dataset_root must point at local data (a folder holding the extracted dataset; nothing "
                         f"is downloaded), got {dataset_root!r}")
    return Path(dataset_root).expanduser()


def _check_stats(name: str, value: Any) -> tuple[float, float, float]:
    try:
        stats = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of 3 numbers, got {value!r}") from None
    if len(stats) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {value!r}")
    if name == "std" and any(s <= 0 for s in stats):
        raise ValueError(f"std values must be positive, got {value!r}")
    return stats  # type: ignore[return-value]


def _check_divides(n_experiences: int, num_classes: int) -> None:
    if not 1 <= n_experiences <= num_classes or num_classes % n_experiences:
        divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
        raise ValueError(f"n_experiences must divide the {num_classes} classes, one of {divisors}, got {n_experiences}")


def _experience_names(sizes: Sequence[int]) -> list[str]:
    """``"classes 0-9"``, ``"classes 10-19"``, ... for experiences holding ``sizes`` contiguous labels."""
    names, start = [], 0
    for size in sizes:
        stop = start + size - 1
        names.append(f"class {start}" if stop == start else f"classes {start}-{stop}")
        start = stop + 1
    return names


# ----------------------------------------------------------------------------------------------------------------
# CIFAR


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_cifar_files(kind: str, root: Path, verify_checksums: bool) -> list[str]:
    """Raise at once if ``kind``'s extracted files are missing or corrupt; return the class names of its meta file."""
    spec = _CIFAR[kind]
    folder = root / spec["folder"]
    archive = spec["url"].rsplit("/", 1)[1]
    missing = [str(folder / f) for f, _ in spec["files"] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{kind} files not found: missing {', '.join(missing)} (looked for torchvision's extracted folder "
            f"{spec['folder']!r} under dataset_root={str(root)!r}). Nothing is downloaded at run time: on a "
            f"machine with internet, fetch {spec['url']} and run 'tar xzf {archive} -C {root}', or copy an "
            f"existing '{spec['folder']}' folder there."
        )
    if verify_checksums:
        for f, md5 in spec["files"]:
            if _md5(folder / f) != md5:
                raise ValueError(
                    f"{folder / f} is corrupted or not the official {kind} file (MD5 mismatch, expected {md5}); "
                    f"re-extract it from {archive}"
                )
    else:  # unverified files: torchvision unpickles them, so refuse any that would run code (issue 15)
        for f, _ in spec["files"][:-1]:
            safe_unpickle(folder / f, allowed=NUMPY_ARRAY_GLOBALS)
    meta = folder / spec["files"][-1][0]
    try:  # plain lists and strings: no global may be loaded, so a crafted meta file cannot run code
        names = [str(n) for n in safe_unpickle(meta)[spec["names_key"]]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta} is not a valid {kind} meta file: {exc!r}") from exc
    if len(names) != spec["num_classes"]:
        raise ValueError(f"{meta} names {len(names)} classes, expected {spec['num_classes']}")
    return names


@contextmanager
def _no_download(kind: str) -> Iterator[None]:
    """Turn any download torchvision's CIFAR loader would start (files failing its MD5 check) into an error."""
    import torchvision.datasets.cifar as tv_cifar

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"torchvision rejected the {kind} files (MD5 check) and tried to download {url}; nothing is "
            f"downloaded at run time: re-extract the official archive under dataset_root"
        )

    original = tv_cifar.download_and_extract_archive
    tv_cifar.download_and_extract_archive = refuse
    try:
        yield
    finally:
        tv_cifar.download_and_extract_archive = original


def _split_cifar(kind: str, *, dataset_root: Any, n_experiences: int, seed: int, task_labels: bool,
                 image_size: int | None, mean: Sequence[float], std: Sequence[float],
                 verify_checksums: bool) -> Benchmark:
    spec = _CIFAR[kind]
    num_classes = spec["num_classes"]
    root = _check_root(dataset_root)
    _check_divides(_check_int("n_experiences", n_experiences, low=1), num_classes)
    _check_int("seed", seed, low=0)
    if image_size is not None:
        _check_int("image_size", image_size, low=1)
    mean, std = _check_stats("mean", mean), _check_stats("std", std)
    names = _check_cifar_files(kind, root, verify_checksums)  # fail fast, before any heavy import

    import torch
    from avalanche.benchmarks import classic
    from torchvision import transforms as T

    steps: list[Any] = []
    if image_size is not None and image_size != 32:
        steps.append(T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC))
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    with torch.random.fork_rng(devices=[]), _no_download(kind):  # Avalanche reseeds the global RNG; keep it
        scenario = getattr(classic, spec["avalanche"])(
            n_experiences=n_experiences, seed=seed, return_task_id=task_labels, dataset_root=str(root),
            train_transform=transform, eval_transform=transform,
            class_ids_from_zero_in_each_exp=False, class_ids_from_zero_from_first_exp=True,
        )
    sample = scenario.train_stream[0].dataset[0]
    if len(sample) != 3:
        raise RuntimeError(f"Avalanche's {spec['avalanche']} returned {len(sample)}-item samples, not (x, y, t)")
    order = [int(c) for c in scenario.classes_order_original_ids]
    return Benchmark(
        name=f"split_{kind}",
        scenario=scenario,
        scenario_type="task_incremental" if task_labels else "class_incremental",
        num_classes=num_classes,
        input_shape=(3, image_size or 32, image_size or 32),
        class_names=[names[c] for c in order],
        experience_names=_experience_names(scenario.n_classes_per_exp),
        info={"dataset": kind, "dataset_root": str(root), "source": str(root / spec["folder"]),
              "avalanche": f"avalanche.benchmarks.classic.{spec['avalanche']}", "seed": seed,
              "n_experiences": n_experiences, "task_labels": task_labels, "class_order": order,
              "train_sizes": [len(e.dataset) for e in scenario.train_stream],
              "test_sizes": [len(e.dataset) for e in scenario.test_stream], "mean": mean, "std": std},
    )


def split_cifar100(*, dataset_root: str, n_experiences: int = 10, seed: int = 0, task_labels: bool = False,
                   image_size: int | None = None, mean: Sequence[float] = CIFAR100_MEAN,
                   std: Sequence[float] = CIFAR100_STD, verify_checksums: bool = True) -> Benchmark:
    """Split CIFAR-100 via Avalanche's ``SplitCIFAR100``: 100 classes shuffled by ``seed`` into experiences.

    Args:
        dataset_root: folder holding the extracted ``cifar-100-python`` folder (train, test, meta).
        n_experiences: number of experiences; must divide 100.
        seed: seeds the class order (the global RNGs are left untouched).
        task_labels: task-incremental (task label = experience index) instead of class-incremental (label 0).
        image_size: resize the 32x32 images (bicubic), e.g. 224 for CLIP-sized ViTs; ``None`` keeps 32.
        mean: per-channel normalisation mean (pass ``CLIP_MEAN`` for CLIP backbones).
        std: per-channel normalisation std (pass ``CLIP_STD`` for CLIP backbones).
        verify_checksums: check the files' MD5s up front (torchvision checks them again when loading).

    Raises:
        FileNotFoundError: the extracted files are not under ``dataset_root``.
        ValueError: a bad argument, or files that are corrupt or not CIFAR-100.
        TypeError: an argument of the wrong type.
        RuntimeError: torchvision rejected the files and tried to download (only with ``verify_checksums=False``).
    """
    return _split_cifar("cifar100", dataset_root=dataset_root, n_experiences=n_experiences, seed=seed,
                        task_labels=task_labels, image_size=image_size, mean=mean, std=std,
                        verify_checksums=verify_checksums)


def split_cifar10(*, dataset_root: str, n_experiences: int = 5, seed: int = 0, task_labels: bool = False,
                  image_size: int | None = None, mean: Sequence[float] = CIFAR10_MEAN,
                  std: Sequence[float] = CIFAR10_STD, verify_checksums: bool = True) -> Benchmark:
    """Split CIFAR-10 via Avalanche's ``SplitCIFAR10``, from ``dataset_root/cifar-10-batches-py/``.

    Arguments and errors are as in :func:`split_cifar100`; ``n_experiences`` must divide 10.
    """
    return _split_cifar("cifar10", dataset_root=dataset_root, n_experiences=n_experiences, seed=seed,
                        task_labels=task_labels, image_size=image_size, mean=mean, std=std,
                        verify_checksums=verify_checksums)


# ----------------------------------------------------------------------------------------------------------------
# registry


@dataclass
class SplitCIFAR100Config:
    """Options of ``split_cifar100``.

    Args:
        dataset_root: folder holding the extracted ``cifar-100-python`` folder (required).
        n_experiences: number of experiences; must divide the 100 classes.
        task_labels: give experience ``i`` task label ``i`` (task-incremental) instead of 0.
        image_size: side of the (bicubically resized) inputs; None keeps 32.
        verify_checksums: check the files' MD5s before building.
    """

    num_classes: ClassVar[int] = 100

    dataset_root: str = ""
    n_experiences: int = 10
    task_labels: bool = False
    image_size: int | None = None
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        _check_root(self.dataset_root)
        _check_divides(self.n_experiences, self.num_classes)
        if self.image_size is not None:
            _check_int("image_size", self.image_size, low=1)


@dataclass
class SplitCIFAR10Config(SplitCIFAR100Config):
    """Options of ``split_cifar10``: as :class:`SplitCIFAR100Config`, with ``cifar-10-batches-py`` and 10 classes."""

    num_classes: ClassVar[int] = 10

    n_experiences: int = 5


@register_benchmark("split_cifar100", config_cls=SplitCIFAR100Config, offline=False, default_head="reset",
                    scenario="class_incremental",
                    description="Avalanche SplitCIFAR100 from local files (dataset_root/cifar-100-python)")
def _build_split_cifar100(config: SplitCIFAR100Config, seed: int) -> Benchmark:
    return split_cifar100(dataset_root=config.dataset_root, n_experiences=config.n_experiences, seed=seed,
                          task_labels=config.task_labels, image_size=config.image_size,
                          verify_checksums=config.verify_checksums)


@register_benchmark("split_cifar10", config_cls=SplitCIFAR10Config, offline=False, default_head="reset",
                    scenario="class_incremental",
                    description="Avalanche SplitCIFAR10 from local files (dataset_root/cifar-10-batches-py)")
def _build_split_cifar10(config: SplitCIFAR10Config, seed: int) -> Benchmark:
    return split_cifar10(dataset_root=config.dataset_root, n_experiences=config.n_experiences, seed=seed,
                         task_labels=config.task_labels, image_size=config.image_size,
                         verify_checksums=config.verify_checksums)
