"""Offline tests of the ImageFolder / ImageNet-R benchmark builders (tiny fake image trees, no downloads)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_merge.benchmarks.image_folder import _split_classes, image_folder_benchmark, imagenet_r
from avalanche_merge.benchmarks.registry import BENCHMARKS, build_benchmark, list_benchmarks
from avalanche_merge.config import ConfigError

N_CLASSES, N_PER_CLASS = 6, 10


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """6 classes x 10 distinct random 40x36 RGB PNGs (odd size, so resize and crop both act)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        (root / f"class_{c}").mkdir()
        for i in range(N_PER_CLASS):
            pixels = rng.integers(0, 256, size=(36, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"img_{i}.png")
    return root


def _experience_digests(stream) -> list[set[str]]:
    return [{_digest(x) for x, *_ in exp.dataset} for exp in stream]


# ---------------------------------------------------------------------------------------------- fast failures


def test_image_folder_missing_root_fails_fast(tmp_path):
    missing = tmp_path / "nowhere"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        image_folder_benchmark(dataset_root=str(missing))
    assert time.perf_counter() - start < 5
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        imagenet_r(dataset_root=str(missing))


def test_image_folder_empty_root_or_empty_class_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class folders"):
        image_folder_benchmark(dataset_root=str(tmp_path))
    (tmp_path / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="cat"):
        image_folder_benchmark(dataset_root=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_experiences": 0},
        {"n_experiences": 7},
        {"test_fraction": 0.0},
        {"test_fraction": 1.0},
        {"test_fraction": -0.5},
        {"image_size": 0},
    ],
)
def test_image_folder_bad_arguments_raise_value_error(image_tree, kwargs):
    with pytest.raises(ValueError):
        image_folder_benchmark(dataset_root=str(image_tree), **kwargs)


def test_bad_types_raise_type_error(image_tree):
    with pytest.raises(TypeError, match="n_experiences"):
        image_folder_benchmark(dataset_root=str(image_tree), n_experiences=2.0)
    with pytest.raises(TypeError, match="dataset_root"):
        image_folder_benchmark(dataset_root=None)
    with pytest.raises(ValueError, match="must point at local data"):
        imagenet_r(dataset_root="")


def test_split_classes_spreads_remainder():
    assert [len(g) for g in _split_classes(list(range(10)), 3)] == [4, 3, 3]
    assert [c for g in _split_classes(list(range(10)), 3) for c in g] == list(range(10))


# ---------------------------------------------------------------------------------------------- image folder


def test_image_folder_benchmark_structure(image_tree):
    bench = image_folder_benchmark(dataset_root=str(image_tree), n_experiences=3, image_size=32, seed=0)
    assert bench.n_experiences == 3 and len(bench.test_stream) == 3
    assert bench.scenario_type == "class_incremental"
    assert bench.num_classes == N_CLASSES and bench.input_shape == (3, 32, 32)
    assert bench.experience_names == ["classes 0-1", "classes 2-3", "classes 4-5"]
    assert sorted(bench.class_names) == [f"class_{c}" for c in range(N_CLASSES)]
    assert bench.info["num_train"] + bench.info["num_test"] == N_CLASSES * N_PER_CLASS
    assert bench.info["test_sizes"] == [4, 4, 4]  # 2 of 10 images per class

    seen: set[int] = set()
    for k, (train_exp, test_exp) in enumerate(zip(bench.train_stream, bench.test_stream, strict=True)):
        classes = set(train_exp.dataset.targets)
        assert classes == {2 * k, 2 * k + 1} == set(test_exp.dataset.targets)
        assert not classes & seen
        seen |= classes
        for exp in (train_exp, test_exp):
            assert exp.task_label == 0
            for x, y, t in exp.dataset:
                assert x.shape == (3, 32, 32) and x.dtype == torch.float32
                assert y in classes and t == 0
    # relabelling keeps class_names[y] right: a sample of label y comes from folder class_names[y]
    folder_of = {name: c for c, name in enumerate(bench.info["folder_classes"])}
    assert [folder_of[n] for n in bench.class_names] == bench.info["class_order"]

    train = set().union(*_experience_digests(bench.train_stream))
    test = set().union(*_experience_digests(bench.test_stream))
    assert len(train) == 48 and len(test) == 12 and not train & test


def test_image_folder_benchmark_is_seeded(image_tree):
    def build(seed):
        return image_folder_benchmark(dataset_root=str(image_tree), n_experiences=3, image_size=16, seed=seed)

    a, b, c = build(0), build(0), build(1)
    assert a.class_names == b.class_names and a.info["class_order"] == b.info["class_order"]
    assert _experience_digests(a.test_stream) == _experience_digests(b.test_stream)
    assert _experience_digests(a.train_stream) == _experience_digests(b.train_stream)
    assert a.info["class_order"] != c.info["class_order"]


def test_image_folder_task_labels_and_global_rng_untouched(image_tree):
    state = torch.random.get_rng_state()
    bench = image_folder_benchmark(dataset_root=str(image_tree), n_experiences=3, image_size=16, task_labels=True)
    assert torch.equal(state, torch.random.get_rng_state())
    assert bench.scenario_type == "task_incremental"
    for stream in (bench.train_stream, bench.test_stream):
        for k, exp in enumerate(stream):
            assert exp.task_label == k
            assert {t for _, _, t in exp.dataset} == {k}


def test_imagenet_r_uses_subfolder(image_tree, tmp_path):
    (tmp_path / "imagenet-r").symlink_to(image_tree, target_is_directory=True)
    bench = imagenet_r(dataset_root=str(tmp_path), n_experiences=2, image_size=8)
    assert bench.name == "imagenet_r" and bench.n_experiences == 2
    assert bench.info["dataset_root"].endswith("imagenet-r")


# ---------------------------------------------------------------------------------------------- registry


def test_registered_specs():
    assert {"image_folder", "imagenet_r"} <= set(list_benchmarks())
    assert not {"image_folder", "imagenet_r"} & set(list_benchmarks(offline_only=True))
    for name in ("image_folder", "imagenet_r"):
        spec = BENCHMARKS.get(name)
        assert not spec.offline and spec.default_head == "reset" and spec.scenario == "class_incremental"


def test_build_benchmark_matches_direct_call(image_tree):
    bench = build_benchmark("image_folder", seed=2, dataset_root=str(image_tree), n_experiences=3, image_size=16)
    direct = image_folder_benchmark(dataset_root=str(image_tree), n_experiences=3, image_size=16, seed=2)
    assert bench.name == "image_folder" and bench.info["seed"] == 2
    assert bench.class_names == direct.class_names
    assert _experience_digests(bench.test_stream) == _experience_digests(direct.test_stream)


def test_build_benchmark_imagenet_r_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class folders"):
        build_benchmark("imagenet_r", dataset_root=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("image_folder", {}, "must point at local data"),
        ("imagenet_r", {"dataset_root": " "}, "must point at local data"),
        ("image_folder", {"dataset_root": "x", "n_experiences": 0}, "n_experiences must be >= 1, got 0"),
        ("imagenet_r", {"dataset_root": "x", "n_experiences": 201}, r"n_experiences must be in \[1, 200\], got 201"),
        ("image_folder", {"dataset_root": "x", "test_fraction": 1.0}, r"test_fraction must be in \(0.0, 1.0\)"),
        ("imagenet_r", {"dataset_root": "x", "image_size": 0}, "image_size must be >= 1, got 0"),
    ],
)
def test_build_benchmark_rejects_bad_config(name, options, match):
    with pytest.raises(ConfigError, match=match):
        build_benchmark(name, **options)
