"""What every avalanche-merge benchmark returns, and how its experience datasets are made.

Benchmarks are built with Avalanche's non-deprecated API (``benchmark_from_datasets``, ``with_task_labels``,
``with_classes_timeline``). Every sample carries a task label (``targets_task_labels``), so mini-batches are
``(x, y, t)`` triplets and every Avalanche baseline, LwF included, runs on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

SCENARIO_TYPES = ("class_incremental", "domain_incremental", "task_incremental")


@dataclass
class Benchmark:
    """A continual-learning benchmark ready for an Avalanche strategy.

    Attributes:
        name: registry name.
        scenario: Avalanche ``CLScenario`` with ``train_stream`` and ``test_stream``.
        scenario_type: one of ``class_incremental``, ``domain_incremental``, ``task_incremental``.
        num_classes: classes over the whole stream (size of a shared output layer).
        input_shape: ``(channels, height, width)`` of one input.
        class_names: human-readable class names (used by zero-shot heads and plots).
        experience_names: one short name per experience (for plots and tables).
        info: free-form provenance (data source, split sizes, seed).
    """

    name: str
    scenario: Any
    scenario_type: str
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    experience_names: list[str]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scenario_type not in SCENARIO_TYPES:
            raise ValueError(f"scenario_type must be one of {SCENARIO_TYPES}, got {self.scenario_type!r}")

    @property
    def train_stream(self):
        return self.scenario.train_stream

    @property
    def test_stream(self):
        return self.scenario.test_stream

    @property
    def n_experiences(self) -> int:
        return len(self.scenario.train_stream)


def as_classification_dataset(
    dataset: Dataset,
    targets: Sequence[int] | torch.Tensor,
    task_labels: int | Sequence[int],
    *,
    transform=None,
):
    """Wrap a ``(x, y)`` dataset as an Avalanche classification dataset with targets and task labels.

    Args:
        dataset: any map-style dataset returning ``(x, y)``.
        targets: the class label of every sample, in dataset order.
        task_labels: one task label for all samples, or one per sample.
        transform: optional transform applied to ``x`` in both train and eval groups.

    Returns:
        A ``TaskAwareSupervisedClassificationDataset`` whose items are ``(x, y, t)``.
    """
    from avalanche.benchmarks.utils import DataAttribute, TaskAwareSupervisedClassificationDataset
    from avalanche.benchmarks.utils.data_attribute import TaskLabels

    targets = [int(t) for t in (targets.tolist() if isinstance(targets, torch.Tensor) else targets)]
    if len(targets) != len(dataset):
        raise ValueError(f"got {len(targets)} targets for a dataset of {len(dataset)} samples")
    if isinstance(task_labels, int):
        task_labels = [task_labels] * len(targets)
    task_labels = [int(t) for t in task_labels]
    if len(task_labels) != len(targets):
        raise ValueError(f"got {len(task_labels)} task labels for a dataset of {len(targets)} samples")
    groups = None
    if transform is not None:
        from avalanche.benchmarks.utils.transform_groups import TransformGroups

        groups = TransformGroups({"train": transform, "eval": transform})
    return TaskAwareSupervisedClassificationDataset(
        [dataset],
        data_attributes=[DataAttribute(targets, "targets"), TaskLabels(task_labels)],
        transform_groups=groups,
    )


def tensor_classification_dataset(x: torch.Tensor, y: torch.Tensor, task_label: int):
    """An Avalanche classification dataset from in-memory tensors, every sample with ``task_label``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    return as_classification_dataset(TensorDataset(x, y), y, task_label)


def make_scenario(train_sets: Sequence, test_sets: Sequence):
    """A task-aware, class-timeline-decorated ``CLScenario`` with one experience per dataset."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    if len(train_sets) != len(test_sets):
        raise ValueError(f"got {len(train_sets)} train and {len(test_sets)} test experiences")
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train_sets, test=test_sets)))
