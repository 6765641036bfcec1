"""``task_folders``: one experience per dataset folder, labels offset per task, official or seeded splits."""

import numpy as np
import pytest
from PIL import Image

from avalanche_merge.benchmarks.task_folders import TaskFoldersConfig, task_folders_benchmark
from avalanche_merge.config import ConfigError, from_dict


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def roots(tmp_path):
    # task A: 3 classes x 4 images, split by the benchmark; task B: official train/ and test/ folders, 2 classes
    for c, name in enumerate(("forest_path", "beach", "abbey")):
        for i in range(4):
            _png(tmp_path / "A" / name / f"{i}.png", 10 * c + i)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("0", "1"):
            for i in range(n):
                _png(tmp_path / "B" / split / c / f"{i}.png", 100 + 10 * int(c) + i)
    (tmp_path / "B" / "classnames.txt").write_text("zero\none\n")
    return [str(tmp_path / "A"), str(tmp_path / "B")]


def test_each_folder_is_one_experience_with_offset_labels(roots):
    bench = task_folders_benchmark(dataset_roots=roots, task_names=["A", "B"], image_size=8)
    assert bench.n_experiences == 2 and bench.num_classes == 5
    assert bench.scenario_type == "task_incremental"
    assert bench.class_names == ["abbey", "beach", "forest path", "zero", "one"]  # sorted folders; classnames.txt
    assert bench.experience_names == ["A", "B"]
    train_a, train_b = (set(int(y) for y in e.dataset.targets) for e in bench.train_stream)
    assert train_a == {0, 1, 2} and train_b == {3, 4}
    assert [set(int(t) for t in e.dataset.targets_task_labels) for e in bench.test_stream] == [{0}, {1}]
    # task A split 80/20 per class (one test image each); task B keeps its official split
    assert bench.info["train_sizes"] == [9, 6] and bench.info["test_sizes"] == [3, 4]
    x, y, t = bench.test_stream[1].dataset[0]
    assert tuple(x.shape) == (3, 8, 8) and y in (3, 4) and t == 1


def test_class_incremental_variant_and_checks(roots, tmp_path):
    bench = task_folders_benchmark(dataset_roots=roots, task_labels=False, image_size=8)
    assert bench.scenario_type == "class_incremental"
    assert bench.experience_names == ["A", "B"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task_folders_benchmark(dataset_roots=[str(tmp_path / "none")])
    (tmp_path / "A" / "classnames.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="names 1 classes but"):
        task_folders_benchmark(dataset_roots=roots)
    with pytest.raises(ConfigError, match="dataset_roots must list one local ImageFolder root per task"):
        from_dict(TaskFoldersConfig, {})
    with pytest.raises(ConfigError, match="task_names has 1 names for 2 roots"):
        from_dict(TaskFoldersConfig, {"dataset_roots": roots, "task_names": ["x"]})
