"""One experience per dataset, each a local ``ImageFolder`` tree: the 8 tasks of task arithmetic and OPCM.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, and Tang et al., "Merging Models on the Fly
Without Retraining" (OPCM), 2025, fine-tune and merge CLIP image towers over SUN397, Cars, RESISC45, EuroSAT,
SVHN, GTSRB, MNIST and DTD, each evaluated with its own frozen zero-shot head. Here every dataset is a folder with
one sub-folder per class; ``<root>/train`` and ``<root>/test`` are used when both exist (the datasets' official
splits), otherwise the root itself is split per class (seeded, ``test_fraction``). Task ``k``'s classes get the
labels after those of tasks ``0..k-1`` (so one head over the union of class names covers every task) and, with
``task_labels`` (the default), task label ``k``; the runner's within-task accuracy (argmax over the task's own
classes) is then the per-task-head accuracy the papers report. Class names are the folder names with ``_``
replaced by spaces, or the lines of an optional ``<root>/classnames.txt`` (one per class, in sorted folder order).
Nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset, Subset

from ..config import check_range
from .base import Benchmark, as_classification_dataset, make_scenario
from .classic import CLIP_MEAN, CLIP_STD, _check_int, _check_root
from .image_folder import _LAYOUT, _RelabelledSubset, _stratified_split, scan_image_folder
from .registry import register_benchmark

TA8_TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
"""The 8 tasks of the task-arithmetic / OPCM table, in the papers' order."""


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist or is not a folder; {_LAYOUT}")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"no class folders in {str(root)!r}; {_LAYOUT}")
    return names


def _class_names(root: Path, folders: list[str]) -> list[str]:
    listed = root / "classnames.txt"
    if not listed.is_file():
        return [f.replace("_", " ") for f in folders]
    names = [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{listed} names {len(names)} classes but {root} has {len(folders)} class folders")
    return names


def _image_folder(root: Path):
    return scan_image_folder(root)[0]


def _task_split(root: Path, test_fraction: float, seed: int) -> tuple[Dataset, list[int], Dataset, list[int], Path]:
    """``(train, train_targets, test, test_targets, class_root)`` of one task folder."""
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        if _class_folders(train_dir) != _class_folders(test_dir):
            raise ValueError(f"{train_dir} and {test_dir} hold different class folders")
        train, test = _image_folder(train_dir), _image_folder(test_dir)
        return train, list(train.targets), test, list(test.targets), train_dir
    _class_folders(root)
    folder = _image_folder(root)
    train_idx, test_idx = _stratified_split(folder.targets, test_fraction, seed)
    return (Subset(folder, train_idx), [folder.targets[i] for i in train_idx], Subset(folder, test_idx),
            [folder.targets[i] for i in test_idx], root)


def task_folders_benchmark(*, dataset_roots: list[str], task_names: list[str] | None = None, seed: int = 0,
                           test_fraction: float = 0.2, image_size: int = 224, task_labels: bool = True) -> Benchmark:
    """A stream with one experience per dataset folder (see the module doc).

    Args:
        dataset_roots: one folder per task, in stream order.
        task_names: a name per task (default: the folders' names).
        seed: seeds the per-class split of roots without ``train/`` and ``test/``.
        test_fraction: share of each class held out for testing in such roots, in (0, 1).
        image_size: side of the square (bicubic-resized, centre-cropped, CLIP-normalised) inputs.
        task_labels: give task ``k`` task label ``k`` (task-incremental, the papers' protocol).

    Raises:
        FileNotFoundError: a root is missing, has no class folders, or a class folder has no images.
        ValueError: a bad argument, two tasks with the same name, or a ``classnames.txt`` of the wrong length.
    """
    roots = [_check_root(r) for r in dataset_roots]
    if not roots:
        raise ValueError("dataset_roots must name at least one dataset folder")
    names = list(task_names) if task_names is not None else [r.name for r in roots]
    if len(names) != len(roots):
        raise ValueError(f"got {len(names)} task_names for {len(roots)} dataset_roots")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {names}")
    _check_int("image_size", image_size, low=1)
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                           T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    train_sets, test_sets, class_names, sizes, offset = [], [], [], [], 0
    for k, root in enumerate(roots):
        train, train_y, test, test_y, class_root = _task_split(root, test_fraction, seed)
        folders = _class_folders(class_root)
        task_classes = _class_names(root, folders)
        label = k if task_labels else 0
        for base, targets, out in ((train, train_y, train_sets), (test, test_y, test_sets)):
            labels = [offset + int(y) for y in targets]
            out.append(as_classification_dataset(_RelabelledSubset(base, range(len(labels)), labels), labels, label,
                                                  transform=transform))
        class_names += task_classes
        sizes.append(len(folders))
        offset += len(folders)
    return Benchmark(
        name="task_folders",
        scenario=make_scenario(train_sets, test_sets),
        scenario_type="task_incremental" if task_labels else "class_incremental",
        num_classes=offset,
        input_shape=(3, image_size, image_size),
        class_names=class_names,
        experience_names=names,
        info={"dataset_roots": [str(r) for r in roots], "classes_per_task": sizes, "seed": seed,
              "task_labels": task_labels, "train_sizes": [len(d) for d in train_sets],
              "test_sizes": [len(d) for d in test_sets], "mean": CLIP_MEAN, "std": CLIP_STD},
    )


@dataclass
class TaskFoldersConfig:
    """Options of ``task_folders``.

    Args:
        dataset_roots: one ImageFolder root per task, in stream order (required; nothing is downloaded).
        task_names: a distinct name per task (default: the roots' folder names).
        test_fraction: per-class test share for roots without ``train/`` and ``test/`` sub-folders, in (0, 1).
        image_size: side of the square inputs.
        task_labels: give task ``k`` task label ``k`` (default, as in the papers).
    """

    dataset_roots: list[str] = field(default_factory=list)
    task_names: list[str] | None = None
    test_fraction: float = 0.2
    image_size: int = 224
    task_labels: bool = True

    @property
    def n_experiences(self) -> int:
        return len(self.dataset_roots)

    def __post_init__(self) -> None:
        if not self.dataset_roots:
            raise ValueError("dataset_roots must list one local ImageFolder root per task, e.g. the 8 tasks "
                             f"{list(TA8_TASKS)}")
        for root in self.dataset_roots:
            _check_root(root)
        if self.task_names is not None and len(self.task_names) != len(self.dataset_roots):
            raise ValueError(f"task_names has {len(self.task_names)} names for {len(self.dataset_roots)} roots")
        check_range("test_fraction", self.test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        _check_int("image_size", self.image_size, low=1)


@register_benchmark("task_folders", config_cls=TaskFoldersConfig, offline=False, default_head="pretrained",
                    scenario="class_incremental",
                    description="one experience per local ImageFolder dataset (e.g. the 8 CLIP merging tasks)")
def _build_task_folders(config: TaskFoldersConfig, seed: int) -> Benchmark:
    return task_folders_benchmark(dataset_roots=config.dataset_roots, task_names=config.task_names, seed=seed,
                                  test_fraction=config.test_fraction, image_size=config.image_size,
                                  task_labels=config.task_labels)
