"""Class-incremental benchmarks from any local ``ImageFolder`` tree (one sub-folder per class), e.g. ImageNet-R.

ImageNet-R: Hendrycks et al., "The Many Faces of Robustness", ICCV 2021 (200 ImageNet classes, 30,000
renditions), which has no official train/test split. Nothing is ever downloaded.

Images are split per class into train/test (seeded, stratified), classes are shuffled by ``seed`` into
``n_experiences`` groups (the first ``num_classes % n_experiences`` experiences get one extra class) and
**relabelled** in order of appearance, so experience ``k`` holds the contiguous labels named in
``experience_names[k]`` and ``class_names[y]`` names label ``y``; ``info["class_order"]`` keeps the folder class
ids in that order. Streams are built with Avalanche's non-deprecated ``benchmark_from_datasets`` (via
:func:`make_scenario`), and every sample is an ``(x, y, t)`` triplet: ``t`` is 0, or the experience index when
``task_labels=True``. Avalanche is imported lazily, as importing it takes seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch.utils.data import Dataset, Subset

from ..config import check_range
from .base import Benchmark, as_classification_dataset, make_scenario
from .classic import CLIP_MEAN, CLIP_STD, _check_int, _check_root, _check_stats, _experience_names
from .registry import register_benchmark

IMAGENET_R_FOLDER = "imagenet-r"
_LAYOUT = "expected one sub-folder per class holding its images, e.g. <root>/<class_name>/<image>.jpg"


def scan_image_folder(root: str | os.PathLike):
    """``(ImageFolder, images per class)`` of ``root`` (file names only; images load lazily).

    Raises:
        FileNotFoundError: a class folder holds no images.
    """
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root), allow_empty=True)
    counts = [0] * len(folder.classes)
    for y in folder.targets:
        counts[y] += 1
    empty = [c for c, n in zip(folder.classes, counts, strict=True) if n == 0]
    if empty:
        raise FileNotFoundError(f"{len(empty)} class folder(s) under {str(root)!r} hold no images "
                                f"(e.g. {', '.join(repr(c) for c in empty[:5])}); {_LAYOUT}")
    return folder, counts


class _RelabelledSubset(Dataset):
    """``base[indices[i]]`` with its label replaced by ``labels[i]``; loads items lazily from ``base``."""

    def __init__(self, base: Dataset, indices: Sequence[int], labels: Sequence[int]) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"got {len(indices)} indices but {len(labels)} labels")
        self.base = base
        self.indices = list(indices)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]][0], self.labels[index]


def _class_order(num_classes: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(num_classes)`` that leaves the global RNGs untouched."""
    import torch

    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def _split_classes(class_order: list[int], n_experiences: int) -> list[list[int]]:
    """Contiguous groups of ``class_order``; the first ``len % n`` groups get one extra class."""
    size, extra = divmod(len(class_order), n_experiences)
    groups, start = [], 0
    for k in range(n_experiences):
        stop = start + size + (1 if k < extra else 0)
        groups.append(class_order[start:stop])
        start = stop
    return groups


def _stratified_split(targets: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split of sample indices; every class keeps at least one train and one test sample."""
    import torch

    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(int(y), []).append(i)
    generator = torch.Generator().manual_seed(seed + 1)  # decoupled from the class-order permutation
    train, test = [], []
    for c in sorted(by_class):
        indices = by_class[c]
        perm = torch.randperm(len(indices), generator=generator).tolist()
        n_test = min(max(1, round(test_fraction * len(indices))), len(indices) - 1)
        test += sorted(indices[p] for p in perm[:n_test])
        train += sorted(indices[p] for p in perm[n_test:])
    return sorted(train), sorted(test)


def _build(*, name: str, train_base: Dataset, train_targets: Sequence[int], test_base: Dataset,
           test_targets: Sequence[int], class_names: list[str], n_experiences: int, seed: int, task_labels: bool,
           transform: Callable, image_size: int, info: dict) -> Benchmark:
    """Split train/test bases into seeded class-incremental experiences and wrap them as a :class:`Benchmark`."""
    num_classes = len(class_names)
    order = _class_order(num_classes, seed)
    groups = _split_classes(order, n_experiences)
    new_label = {old: new for new, old in enumerate(order)}

    def experiences(base: Dataset, targets: Sequence[int]) -> list:
        by_class: dict[int, list[int]] = {c: [] for c in range(num_classes)}
        for i, y in enumerate(targets):
            by_class[int(y)].append(i)
        sets = []
        for k, group in enumerate(groups):
            indices = [i for c in group for i in by_class[c]]
            labels = [new_label[int(targets[i])] for i in indices]
            subset = _RelabelledSubset(base, indices, labels)
            sets.append(as_classification_dataset(subset, labels, k if task_labels else 0, transform=transform))
        return sets

    train_sets = experiences(train_base, train_targets)
    test_sets = experiences(test_base, test_targets)
    info = dict(info, seed=seed, n_experiences=n_experiences, task_labels=task_labels, class_order=order,
                train_sizes=[len(d) for d in train_sets], test_sizes=[len(d) for d in test_sets])
    return Benchmark(
        name=name,
        scenario=make_scenario(train_sets, test_sets),
        scenario_type="task_incremental" if task_labels else "class_incremental",
        num_classes=num_classes,
        input_shape=(3, image_size, image_size),
        class_names=[class_names[c] for c in order],
        experience_names=_experience_names([len(g) for g in groups]),
        info=info,
    )


def image_folder_benchmark(*, dataset_root: str, n_experiences: int = 10, seed: int = 0, test_fraction: float = 0.2,
                           image_size: int = 224, task_labels: bool = False, mean: Sequence[float] = CLIP_MEAN,
                           std: Sequence[float] = CLIP_STD, name: str = "image_folder") -> Benchmark:
    """A class-incremental benchmark from an ``ImageFolder`` tree (one sub-folder per class), e.g. ImageNet-R.

    Images are read lazily from disk; each is resized (bicubic) and centre-cropped to ``image_size``, converted
    to a tensor and normalised (CLIP statistics by default).

    Args:
        dataset_root: folder with one sub-folder per class.
        n_experiences: number of experiences, 1 to the number of classes.
        seed: seeds both the train/test split and the class order.
        test_fraction: share of each class held out for testing, in (0, 1); every class keeps at least one
            train and one test image, so each class needs two images or more.
        image_size: side of the square inputs.
        task_labels: task-incremental (task label = experience index) instead of class-incremental (label 0).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        name: the benchmark's name.

    Raises:
        FileNotFoundError: ``dataset_root`` is missing, has no class folders, or a class folder has no images.
        ValueError: a bad argument, or a class with fewer than two images.
        TypeError: an argument of the wrong type.
    """
    root = _check_root(dataset_root)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a float, got {type(test_fraction).__name__} ({test_fraction!r})")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    _check_int("n_experiences", n_experiences, low=1)
    _check_int("seed", seed, low=0)
    _check_int("image_size", image_size, low=1)
    mean, std = _check_stats("mean", mean), _check_stats("std", std)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder dataset_root={str(root)!r} does not exist or is not a folder; {_LAYOUT}")
    if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root)):
        raise FileNotFoundError(f"no class folders in dataset_root={str(root)!r}; {_LAYOUT}")

    from torchvision import transforms as T

    folder, counts = scan_image_folder(root)
    single = [c for c, n in zip(folder.classes, counts, strict=True) if n < 2]
    if single:
        raise ValueError(f"classes need two images or more for a train/test split; {single[:5]} have one")
    _check_int("n_experiences", n_experiences, low=1, high=len(folder.classes))

    train_idx, test_idx = _stratified_split(folder.targets, test_fraction, seed)
    transform = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                           T.ToTensor(), T.Normalize(mean, std)])
    return _build(
        name=name,
        train_base=Subset(folder, train_idx),
        train_targets=[folder.targets[i] for i in train_idx],
        test_base=Subset(folder, test_idx),
        test_targets=[folder.targets[i] for i in test_idx],
        class_names=list(folder.classes),
        n_experiences=n_experiences,
        seed=seed,
        task_labels=task_labels,
        transform=transform,
        image_size=image_size,
        info={"dataset_root": str(root), "num_images": len(folder), "num_train": len(train_idx),
              "num_test": len(test_idx), "test_fraction": test_fraction, "folder_classes": list(folder.classes),
              "mean": mean, "std": std},
    )


def imagenet_r(*, dataset_root: str, n_experiences: int = 10, seed: int = 0, test_fraction: float = 0.2,
               image_size: int = 224, task_labels: bool = False, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> Benchmark:
    """ImageNet-R (Hendrycks et al., ICCV 2021): 200 classes, 30,000 images.

    Reads ``dataset_root/imagenet-r`` if it exists, else ``dataset_root`` itself (the extracted
    ``imagenet-r.tar``: one ``n0...`` WordNet-id folder per class). The dataset has no official split; the
    seeded stratified ``test_fraction`` split of :func:`image_folder_benchmark` is used (0.2 by default, i.e. the
    80/20 split common in continual-learning work). Arguments and errors are as in
    :func:`image_folder_benchmark`; ``class_names`` are the folder names (WordNet ids).
    """
    root = _check_root(dataset_root)
    if (root / IMAGENET_R_FOLDER).is_dir():
        root = root / IMAGENET_R_FOLDER
    return image_folder_benchmark(dataset_root=str(root), n_experiences=n_experiences, seed=seed,
                                  test_fraction=test_fraction, image_size=image_size, task_labels=task_labels,
                                  mean=mean, std=std, name="imagenet_r")


# ----------------------------------------------------------------------------------------------------------------
# registry


@dataclass
class ImageFolderConfig:
    """Options of ``image_folder`` (and ``imagenet_r``).

    Args:
        dataset_root: folder with one sub-folder per class (required; nothing is downloaded).
        n_experiences: number of experiences, 1 to the number of classes (checked against the data when built).
        test_fraction: per-class share of images held out for testing, in (0, 1).
        image_size: side of the square (resized, centre-cropped) inputs.
        task_labels: give experience ``i`` task label ``i`` (task-incremental) instead of 0.
    """

    max_classes: ClassVar[int | None] = None

    dataset_root: str = ""
    n_experiences: int = 10
    test_fraction: float = 0.2
    image_size: int = 224
    task_labels: bool = False

    def __post_init__(self) -> None:
        _check_root(self.dataset_root)
        _check_int("n_experiences", self.n_experiences, low=1, high=self.max_classes)
        check_range("test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _check_int("image_size", self.image_size, low=1)


@dataclass
class ImageNetRConfig(ImageFolderConfig):
    """Options of ``imagenet_r``: as :class:`ImageFolderConfig`; ``dataset_root`` holds ``imagenet-r/`` or is it."""

    max_classes: ClassVar[int | None] = 200


@register_benchmark("image_folder", config_cls=ImageFolderConfig, offline=False, default_head="reset",
                    scenario="class_incremental",
                    description="class-incremental benchmark from a local ImageFolder tree (one folder per class)")
def _build_image_folder(config: ImageFolderConfig, seed: int) -> Benchmark:
    return image_folder_benchmark(dataset_root=config.dataset_root, n_experiences=config.n_experiences, seed=seed,
                                  test_fraction=config.test_fraction, image_size=config.image_size,
                                  task_labels=config.task_labels)


@register_benchmark("imagenet_r", config_cls=ImageNetRConfig, offline=False, default_head="reset",
                    scenario="class_incremental",
                    description="ImageNet-R (200 classes) from local files, seeded 80/20 split")
def _build_imagenet_r(config: ImageNetRConfig, seed: int) -> Benchmark:
    return imagenet_r(dataset_root=config.dataset_root, n_experiences=config.n_experiences, seed=seed,
                      test_fraction=config.test_fraction, image_size=config.image_size,
                      task_labels=config.task_labels)
