"""Offline tests of the Split CIFAR wrappers over Avalanche (fake files in the official format, no downloads)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_merge.benchmarks import classic
from avalanche_merge.benchmarks.classic import _experience_names, split_cifar10, split_cifar100
from avalanche_merge.benchmarks.registry import BENCHMARKS, build_benchmark, list_benchmarks
from avalanche_merge.config import ConfigError


def _write_fake_cifar(kind: str, root: Path, n_train_per_class: int = 3, n_test_per_class: int = 1) -> None:
    """Files in the official python-pickle format with every class but few images (their MD5s will not match)."""
    spec = classic._CIFAR[kind]
    n, folder = spec["num_classes"], root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    *train_files, (test_file, _), (meta_file, _) = spec["files"]
    label_key = "fine_labels" if kind == "cifar100" else "labels"
    for name, per_class in [(f, n_train_per_class) for f, _ in train_files] + [(test_file, n_test_per_class)]:
        labels = [c for c in range(n) for _ in range(per_class)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
    with open(folder / meta_file, "wb") as f:
        pickle.dump({spec["names_key"]: [f"c{i:02d}" for i in range(n)]}, f)


@pytest.fixture
def accept_fake_files(monkeypatch):
    """Make torchvision's CIFAR loader accept fake files: its MD5 checks (data files and meta) pass."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


# ---------------------------------------------------------------------------------------------- fast failures


def test_split_cifar100_missing_root_fails_fast(tmp_path):
    missing = tmp_path / "nowhere"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        split_cifar100(dataset_root=str(missing))
    assert time.perf_counter() - start < 5
    assert str(missing) in str(err.value)
    assert "cifar-100-python" in str(err.value)


def test_split_cifar100_partial_files_names_missing_ones(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="test"):
        split_cifar100(dataset_root=str(tmp_path))


def test_split_cifar10_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        split_cifar10(dataset_root=str(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="dataset_root"):
        split_cifar100(dataset_root=None)
    with pytest.raises(ValueError, match="must point at local data"):
        split_cifar100(dataset_root="")
    with pytest.raises(ValueError, match="n_experiences"):
        split_cifar100(dataset_root=str(tmp_path), n_experiences=101)
    with pytest.raises(ValueError, match=r"divide the 100 classes.*got 3"):
        split_cifar100(dataset_root=str(tmp_path), n_experiences=3)
    with pytest.raises(ValueError, match=r"divide the 10 classes.*got 4"):
        split_cifar10(dataset_root=str(tmp_path), n_experiences=4)
    with pytest.raises(TypeError, match="n_experiences"):
        split_cifar10(dataset_root=str(tmp_path), n_experiences=2.0)


def test_pinned_checksums_match_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100

    for kind, tv in (("cifar100", CIFAR100), ("cifar10", CIFAR10)):
        expected = [tuple(e) for e in tv.train_list + tv.test_list] + [(tv.meta["filename"], tv.meta["md5"])]
        assert classic._CIFAR[kind]["files"] == expected
        assert classic._CIFAR[kind]["folder"] == tv.base_folder and classic._CIFAR[kind]["url"] == tv.url
        assert classic._CIFAR[kind]["names_key"] == tv.meta["key"]


def test_experience_names():
    assert _experience_names([10, 10]) == ["classes 0-9", "classes 10-19"]
    assert _experience_names([1, 2]) == ["class 0", "classes 1-2"]


# ---------------------------------------------------------------------------------------------- fake files


def test_fake_files_fail_md5_check(tmp_path):
    _write_fake_cifar("cifar100", tmp_path)
    with pytest.raises(ValueError, match="MD5"):
        split_cifar100(dataset_root=str(tmp_path))


def test_torchvision_download_attempt_is_refused(tmp_path):
    # without our MD5 check, torchvision rejects the fake files and would download: the guard stops it
    _write_fake_cifar("cifar100", tmp_path)
    with pytest.raises(RuntimeError, match="nothing is downloaded"):
        split_cifar100(dataset_root=str(tmp_path), verify_checksums=False)
    import torchvision.datasets.cifar as tv_cifar
    from torchvision.datasets.utils import download_and_extract_archive

    assert tv_cifar.download_and_extract_archive is download_and_extract_archive  # guard restored


def test_split_cifar100_through_avalanche(tmp_path, accept_fake_files):
    _write_fake_cifar("cifar100", tmp_path)
    state = torch.random.get_rng_state()
    bench = split_cifar100(dataset_root=str(tmp_path), n_experiences=10, seed=3, verify_checksums=False)
    assert torch.equal(state, torch.random.get_rng_state())
    from avalanche.benchmarks.scenarios.deprecated.new_classes.nc_scenario import NCScenario

    assert isinstance(bench.scenario, NCScenario)
    assert bench.name == "split_cifar100" and bench.scenario_type == "class_incremental"
    assert bench.n_experiences == 10 and len(bench.test_stream) == 10
    assert bench.num_classes == 100 and bench.input_shape == (3, 32, 32)
    assert bench.experience_names[0] == "classes 0-9" and bench.experience_names[-1] == "classes 90-99"
    assert bench.info["train_sizes"] == [30] * 10 and bench.info["test_sizes"] == [10] * 10
    assert sorted(bench.info["class_order"]) == list(range(100))
    assert bench.class_names == [f"c{i:02d}" for i in bench.info["class_order"]]
    for k, exp in enumerate(bench.train_stream):
        assert exp.task_label == 0 and set(exp.dataset.targets) == set(range(10 * k, 10 * k + 10))
    x, y, t = bench.train_stream[4].dataset[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 40 <= y < 50 and t == 0
    again = split_cifar100(dataset_root=str(tmp_path), n_experiences=10, seed=3, verify_checksums=False)
    assert again.info["class_order"] == bench.info["class_order"]
    other = split_cifar100(dataset_root=str(tmp_path), n_experiences=10, seed=4, verify_checksums=False)
    assert other.info["class_order"] != bench.info["class_order"]


def test_split_cifar100_task_labels_resize_and_md5_pass(tmp_path, accept_fake_files, monkeypatch):
    _write_fake_cifar("cifar100", tmp_path)
    expected = dict(classic._CIFAR["cifar100"]["files"])
    monkeypatch.setattr(classic, "_md5", lambda path: expected[path.name])  # only the checksum is faked
    bench = split_cifar100(dataset_root=str(tmp_path), n_experiences=4, image_size=48, task_labels=True)
    assert bench.scenario_type == "task_incremental" and bench.experience_names[0] == "classes 0-24"
    assert bench.input_shape == (3, 48, 48)
    x, y, t = bench.test_stream[2].dataset[0]
    assert x.shape == (3, 48, 48) and 50 <= y < 75 and t == 2 and bench.test_stream[2].task_label == 2


def test_split_cifar10_through_avalanche(tmp_path, accept_fake_files):
    _write_fake_cifar("cifar10", tmp_path, n_train_per_class=2)
    bench = split_cifar10(dataset_root=str(tmp_path), verify_checksums=False)
    assert bench.name == "split_cifar10" and bench.n_experiences == 5 and bench.num_classes == 10
    assert bench.experience_names == ["classes 0-1", "classes 2-3", "classes 4-5", "classes 6-7", "classes 8-9"]
    assert bench.info["train_sizes"] == [20] * 5 and bench.info["test_sizes"] == [2] * 5  # 5 batches x 2 per class
    x, y, t = bench.test_stream[1].dataset[0]
    assert x.shape == (3, 32, 32) and y in (2, 3) and t == 0


# ---------------------------------------------------------------------------------------------- registry


def test_registered_specs():
    assert {"split_cifar100", "split_cifar10"} <= set(list_benchmarks())
    assert not {"split_cifar100", "split_cifar10"} & set(list_benchmarks(offline_only=True))
    for name in ("split_cifar100", "split_cifar10"):
        spec = BENCHMARKS.get(name)
        assert not spec.offline and spec.default_head == "reset" and spec.scenario == "class_incremental"
        assert spec.scenario_type(spec.config_cls(dataset_root="x", task_labels=True)) == "task_incremental"


def test_build_benchmark_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        build_benchmark("split_cifar100", dataset_root=str(tmp_path))
    assert time.perf_counter() - start < 5
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_benchmark("split_cifar10", dataset_root=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("split_cifar100", {}, "must point at local data"),
        ("split_cifar100", {"dataset_root": ""}, "must point at local data"),
        ("split_cifar100", {"dataset_root": "x", "n_experiences": 3}, r"divide the 100 classes.*got 3"),
        ("split_cifar10", {"dataset_root": "x", "n_experiences": 20}, r"divide the 10 classes.*got 20"),
        ("split_cifar10", {"dataset_root": "x", "image_size": 0}, "image_size must be >= 1, got 0"),
        ("split_cifar10", {"dataset_root": "x", "mean": [0.5]}, "unknown option"),
    ],
)
def test_build_benchmark_rejects_bad_config(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build_benchmark(name, **options)


def test_build_benchmark_on_fake_files(tmp_path, accept_fake_files):
    _write_fake_cifar("cifar10", tmp_path, n_train_per_class=1)
    bench = build_benchmark("split_cifar10", seed=7, dataset_root=str(tmp_path), n_experiences=2,
                            task_labels=True, verify_checksums=False)
    assert bench.n_experiences == 2 and bench.info["seed"] == 7 and bench.scenario_type == "task_incremental"
    assert [exp.task_label for exp in bench.train_stream] == [0, 1]
