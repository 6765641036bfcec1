"""Offline benchmarks (data shipped in packages): MNIST 5k partition, split_mnist, domain_mnist, split_digits."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch.utils.data import DataLoader

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.benchmarks.data import load_mnist5k, mnist_pretrain_pool, mnist_stream_pool
from avalanche_merge.benchmarks.transforms import DEFAULT_DOMAINS, DOMAINS, apply_domain
from avalanche_merge.config import ConfigError


def _hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for img in x]


def _tensors(experience) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ``(x, y, t)`` of an experience as three tensors, in dataset order."""
    ds = experience.dataset
    (x, y, t), = list(DataLoader(ds, batch_size=len(ds), shuffle=False))
    return x, y, t


def _stream(stream) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [_tensors(e) for e in stream]


@pytest.fixture(scope="module")
def split_mnist_default():
    return build_benchmark("split_mnist", 0)


@pytest.fixture(scope="module")
def domain_mnist_default():
    return build_benchmark("domain_mnist", 0)


# --------------------------------------------------------------------------------------------- data and pools


def test_load_mnist5k_shape_and_balance():
    x, y = load_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [500] * 10
    # a copy: mutating it does not touch the cached data
    x.zero_()
    assert float(load_mnist5k()[0].max()) == 1.0


def test_pretrain_and_stream_pools_are_disjoint_and_cover_mnist5k():
    xp, yp = mnist_pretrain_pool()
    xs, ys = mnist_stream_pool()
    assert xp.shape == (1500, 1, 28, 28) and yp.shape == (1500,)
    assert xs.shape == (3500, 1, 28, 28) and ys.shape == (3500,)
    assert torch.bincount(yp, minlength=10).tolist() == [150] * 10
    assert torch.bincount(ys, minlength=10).tolist() == [350] * 10
    hp, hs = _hashes(xp), _hashes(xs)
    assert len(set(hp)) == 1500 and len(set(hs)) == 3500
    assert set(hp).isdisjoint(hs)
    x, _ = load_mnist5k()
    assert sorted(hp + hs) == sorted(_hashes(x))
    # the partition does not depend on anything: calling again gives the same pools
    assert torch.equal(mnist_pretrain_pool()[0], xp)


# ---------------------------------------------------------------------------------------------- split_mnist


def test_split_mnist_default_structure(split_mnist_default):
    b = split_mnist_default
    assert b.name == "split_mnist"
    assert b.scenario_type == "class_incremental"
    assert b.num_classes == 10 and b.input_shape == (1, 28, 28)
    assert b.n_experiences == 5
    assert len(b.train_stream) == 5 and len(b.test_stream) == 5
    train, test = _stream(b.train_stream), _stream(b.test_stream)
    class_sets = []
    for e, ((xtr, ytr, ttr), (xte, yte, tte)) in enumerate(zip(train, test)):
        classes = set(ytr.tolist())
        assert len(classes) == 2
        assert set(yte.tolist()) == classes
        assert b.experience_names[e] == "+".join(str(c) for c in b.info["class_order"][2 * e : 2 * e + 2])
        assert classes == set(b.info["class_order"][2 * e : 2 * e + 2])
        assert b.train_stream[e].classes_in_this_experience == classes
        # 350 per class: 70 test (0.2), 280 train
        assert torch.bincount(ytr, minlength=10)[sorted(classes)].tolist() == [280, 280]
        assert torch.bincount(yte, minlength=10)[sorted(classes)].tolist() == [70, 70]
        assert ttr.tolist() == [0] * 560 and tte.tolist() == [0] * 140
        assert xtr.shape == (560, 1, 28, 28) and xte.shape == (140, 1, 28, 28)
        class_sets.append(classes)
    assert set().union(*class_sets) == set(range(10))
    assert sum(len(s) for s in class_sets) == 10
    assert sorted(b.info["class_order"]) == list(range(10))
    assert b.info["train_sizes"] == [560] * 5 and b.info["test_sizes"] == [140] * 5


def test_split_mnist_train_test_disjoint_and_from_stream_pool(split_mnist_default):
    b = split_mnist_default
    train_h = [h for x, _, _ in _stream(b.train_stream) for h in _hashes(x)]
    test_h = [h for x, _, _ in _stream(b.test_stream) for h in _hashes(x)]
    assert len(train_h) == 2800 and len(test_h) == 700
    assert len(set(train_h)) == 2800 and len(set(test_h)) == 700
    assert set(train_h).isdisjoint(test_h)
    assert set(train_h) | set(test_h) == set(_hashes(mnist_stream_pool()[0]))
    assert set(train_h).isdisjoint(_hashes(mnist_pretrain_pool()[0]))


def test_split_mnist_samples_are_triplets(split_mnist_default):
    x, y, t = split_mnist_default.train_stream[0].dataset[0]
    assert x.shape == (1, 28, 28)
    assert int(y) in split_mnist_default.info["class_order"][:2]
    assert t == 0


def test_split_mnist_same_seed_identical(split_mnist_default):
    again = build_benchmark("split_mnist", 0)
    assert again.info["class_order"] == split_mnist_default.info["class_order"]
    assert again.experience_names == split_mnist_default.experience_names
    for stream_a, stream_b in ((again.train_stream, split_mnist_default.train_stream),
                               (again.test_stream, split_mnist_default.test_stream)):
        for (xa, ya, ta), (xb, yb, tb) in zip(_stream(stream_a), _stream(stream_b)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ta, tb)


def test_split_mnist_different_seed_differs(split_mnist_default):
    other = build_benchmark("split_mnist", 1)
    assert other.info["class_order"] != split_mnist_default.info["class_order"]
    assert sorted(other.info["class_order"]) == list(range(10))
    # the train/test split depends on the seed too
    test0 = {h for x, _, _ in _stream(split_mnist_default.test_stream) for h in _hashes(x)}
    test1 = {h for x, _, _ in _stream(other.test_stream) for h in _hashes(x)}
    assert len(test1) == 700 and test0 != test1


def test_split_mnist_task_labels():
    b = build_benchmark("split_mnist", 0, task_labels=True)
    assert b.scenario_type == "task_incremental"
    for stream in (b.train_stream, b.test_stream):
        for e, (_, _, t) in enumerate(_stream(stream)):
            assert set(t.tolist()) == {e}
            assert stream[e].task_labels == [e]


def test_split_mnist_max_train_per_class():
    b = build_benchmark("split_mnist", 0, max_train_per_class=7)
    for (_, ytr, _), (_, yte, _) in zip(_stream(b.train_stream), _stream(b.test_stream)):
        counts = torch.bincount(ytr, minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [7, 7]
        # the test split is not capped
        counts = torch.bincount(yte, minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [70, 70]
    assert b.info["train_sizes"] == [14] * 5


def test_split_mnist_class_order_and_n_experiences():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    b = build_benchmark("split_mnist", 0, class_order=order, n_experiences=2)
    assert b.n_experiences == 2
    assert b.experience_names == ["9+8+7+6+5", "4+3+2+1+0"]
    assert b.info["class_order"] == order
    assert [set(y.tolist()) for _, y, _ in _stream(b.train_stream)] == [{5, 6, 7, 8, 9}, {0, 1, 2, 3, 4}]
    assert [set(y.tolist()) for _, y, _ in _stream(b.test_stream)] == [{5, 6, 7, 8, 9}, {0, 1, 2, 3, 4}]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_experiences": 3}, "n_experiences must divide the 10 classes (1, 2, 5 or 10), got 3"),
        ({"test_fraction": 0}, "test_fraction must be in (0.0, 1.0), got 0.0"),
        ({"test_fraction": 1}, "test_fraction must be in (0.0, 1.0), got 1.0"),
        ({"test_fraction": 1.5}, "test_fraction must be in (0.0, 1.0), got 1.5"),
        ({"class_order": [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]}, "class_order must be a permutation of 0..9, got "
                                                          "[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]"),
        ({"class_order": [0, 1, 2]}, "class_order must be a permutation of 0..9, got [0, 1, 2]"),
        ({"max_train_per_class": 0}, "max_train_per_class must be >= 1, got 0"),
    ],
)
def test_split_mnist_bad_options(options, message):
    with pytest.raises(ConfigError) as err:
        build_benchmark("split_mnist", 0, **options)
    assert isinstance(err.value, ValueError)
    assert str(err.value) == f"split_mnist: {message}"


def test_split_mnist_unknown_and_mistyped_options():
    with pytest.raises(ConfigError, match=r"^split_mnist\.n_exp: unknown option for ClassSplitConfig; valid options: "
                                          r"\['class_order', 'max_train_per_class', 'n_experiences', "
                                          r"'task_labels', 'test_fraction'\]$"):
        build_benchmark("split_mnist", 0, n_exp=5)
    with pytest.raises(ConfigError, match=r"^split_mnist\.n_experiences: expected an int, got str '5'$"):
        build_benchmark("split_mnist", 0, n_experiences="5")


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown benchmark 'split_mnsit'; valid benchmarks: .*domain_mnist.*"
                                         r"split_digits.*split_mnist"):
        build_benchmark("split_mnsit", 0)


# --------------------------------------------------------------------------------------------- domain_mnist


def test_domain_mnist_default_structure(domain_mnist_default):
    b = domain_mnist_default
    assert b.name == "domain_mnist"
    assert b.scenario_type == "domain_incremental"
    assert b.n_experiences == 8 and len(b.test_stream) == 8
    assert b.experience_names == list(DEFAULT_DOMAINS)
    assert len(DEFAULT_DOMAINS) == 8
    for (xtr, ytr, ttr), (xte, yte, tte) in zip(_stream(b.train_stream), _stream(b.test_stream)):
        assert xtr.shape == (500, 1, 28, 28) and xte.shape == (200, 1, 28, 28)
        assert torch.bincount(ytr, minlength=10).tolist() == [50] * 10
        assert torch.bincount(yte, minlength=10).tolist() == [20] * 10
        assert set(ttr.tolist()) == {0} and set(tte.tolist()) == {0}
        assert float(xtr.min()) >= 0.0 and float(xtr.max()) <= 1.0


def test_domain_mnist_deterministic(domain_mnist_default):
    again = build_benchmark("domain_mnist", 0)
    for stream_a, stream_b in ((again.train_stream, domain_mnist_default.train_stream),
                               (again.test_stream, domain_mnist_default.test_stream)):
        for (xa, ya, ta), (xb, yb, tb) in zip(_stream(stream_a), _stream(stream_b)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ta, tb)


def test_domain_mnist_applies_domain_to_stream_pool_images_train_test_disjoint():
    b = build_benchmark("domain_mnist", 3, domains=["identity", "flip_lr"], train_per_domain=100,
                        test_per_domain=50)
    assert b.experience_names == ["identity", "flip_lr"]
    stream_pool = set(_hashes(mnist_stream_pool()[0]))
    pretrain_pool = set(_hashes(mnist_pretrain_pool()[0]))
    (x_id, _, _), (x_flip, _, _) = _stream(b.train_stream)
    (xt_id, _, _), (xt_flip, _, _) = _stream(b.test_stream)
    assert len(x_id) == len(x_flip) == 100 and len(xt_id) == len(xt_flip) == 50
    # undo the domain transformation: the images come from the stream pool, never from the pretraining pool
    for x in (x_id, x_flip.flip(-1), xt_id, xt_flip.flip(-1)):
        h = set(_hashes(x))
        assert h <= stream_pool and h.isdisjoint(pretrain_pool)
    assert set(_hashes(x_id)).isdisjoint(_hashes(xt_id))
    assert set(_hashes(x_flip.flip(-1))).isdisjoint(_hashes(xt_flip.flip(-1)))


def test_domain_mnist_task_labels():
    b = build_benchmark("domain_mnist", 0, domains=["rotate_90", "invert", "blur"], train_per_domain=30,
                        test_per_domain=10, task_labels=True)
    assert b.scenario_type == "task_incremental"
    for stream in (b.train_stream, b.test_stream):
        assert [set(t.tolist()) for _, _, t in _stream(stream)] == [{0}, {1}, {2}]


def test_domain_mnist_unknown_domain_lists_valid_domains():
    with pytest.raises(ConfigError) as err:
        build_benchmark("domain_mnist", 0, domains=["rotate_90", "rotate_30"])
    msg = str(err.value)
    assert msg.startswith("domain_mnist: unknown domain 'rotate_30'; valid domains: ")
    assert msg.endswith(", ".join(DOMAINS.names()))
    assert "rotate_90" in msg and "pixel_permute" in msg


@pytest.mark.parametrize(
    "options, message",
    [
        ({"domains": ["blur", "noise", "blur"]}, "domains must be distinct, got ['blur', 'noise', 'blur']"),
        ({"domains": []}, "domains must name at least one domain"),
        ({"train_per_domain": 55}, "train_per_domain must be a positive multiple of 10 (class-balanced), got 55"),
        ({"train_per_domain": 0}, "train_per_domain must be a positive multiple of 10 (class-balanced), got 0"),
        ({"test_per_domain": 25}, "test_per_domain must be a positive multiple of 10 (class-balanced), got 25"),
        ({"test_fraction": 1.0}, "test_fraction must be in (0.0, 1.0), got 1.0"),
    ],
)
def test_domain_mnist_bad_options(options, message):
    with pytest.raises(ConfigError) as err:
        build_benchmark("domain_mnist", 0, **options)
    assert str(err.value) == f"domain_mnist: {message}"


def test_domain_mnist_pool_too_small():
    # the test pool holds 70 images per class (0.2 of 350): 800 per domain asks for 80
    with pytest.raises(ValueError, match=r"asked for 80 images of class 0 per domain but the pool has 70"):
        build_benchmark("domain_mnist", 0, domains=["identity"], test_per_domain=800)


# ----------------------------------------------------------------------------------------------- transforms


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", DOMAINS.names())
def test_every_domain_shape_range_determinism(name, batch):
    original = batch.clone()
    out = apply_domain(name, batch)
    assert torch.equal(batch, original), "the input must not be modified"
    assert out.shape == (4, 1, 28, 28)
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, apply_domain(name, batch))
    if name == "identity":
        assert torch.equal(out, batch)
    else:
        assert (out - batch).abs().max() > 0.05


def test_domain_registry_has_defaults():
    assert set(DEFAULT_DOMAINS) <= set(DOMAINS.names())
    assert len(DOMAINS.names()) == 16


def test_rotate_90_four_times_is_identity(batch):
    x = batch
    for _ in range(4):
        x = apply_domain("rotate_90", x)
    assert torch.equal(x, batch)
    # twice is rotate_180
    assert torch.equal(apply_domain("rotate_90", apply_domain("rotate_90", batch)), apply_domain("rotate_180", batch))


def test_flips_are_involutions(batch):
    assert torch.equal(apply_domain("flip_lr", apply_domain("flip_lr", batch)), batch)
    assert torch.equal(apply_domain("flip_ud", apply_domain("flip_ud", batch)), batch)
    assert torch.equal(apply_domain("flip_lr", batch)[..., 0], batch[..., -1])


def test_pixel_permute_preserves_pixel_multiset(batch):
    out = apply_domain("pixel_permute", batch)
    for a, b in zip(out.flatten(1), batch.flatten(1)):
        assert torch.equal(a.sort().values, b.sort().values)
    # the same permutation for every image in the batch and on every call
    single = apply_domain("pixel_permute", batch[2:3])
    assert torch.equal(single[0], out[2])


def test_patch_shuffle_preserves_pixel_multiset_and_tiles(batch):
    out = apply_domain("patch_shuffle", batch)
    assert torch.equal(out.flatten(1).sort(1).values, batch.flatten(1).sort(1).values)
    tiles_in = {batch[0, 0, i : i + 7, j : j + 7].numpy().tobytes() for i in range(0, 28, 7) for j in range(0, 28, 7)}
    tiles_out = {out[0, 0, i : i + 7, j : j + 7].numpy().tobytes() for i in range(0, 28, 7) for j in range(0, 28, 7)}
    assert tiles_in == tiles_out


def test_apply_domain_rejects_non_batch_and_unknown():
    with pytest.raises(ValueError, match=r"expected a batch \(N, C, H, W\), got shape \(1, 28, 28\)"):
        apply_domain("identity", torch.zeros(1, 28, 28))
    with pytest.raises(ValueError, match=r"unknown domain 'nope'; valid domains: blur, edges"):
        apply_domain("nope", torch.zeros(1, 1, 28, 28))


def test_invert_and_low_contrast_values(batch):
    assert torch.allclose(apply_domain("invert", batch), 1.0 - batch)
    lc = apply_domain("low_contrast", batch)
    # 0.4 + 0.25 x maps [0, 1] onto [0.4, 0.65]
    assert float(lc.min()) >= 0.4 and float(lc.max()) <= 0.65
    assert torch.allclose(lc, 0.4 + 0.25 * batch)


# ---------------------------------------------------------------------------------------------- split_digits


def test_split_digits_builds_from_sklearn_digits():
    b = build_benchmark("split_digits", 0)
    assert b.name == "split_digits" and b.scenario_type == "class_incremental"
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert b.n_experiences == 5
    train, test = _stream(b.train_stream), _stream(b.test_stream)
    total = sum(len(y) for _, y, _ in train) + sum(len(y) for _, y, _ in test)
    assert total == 1797
    for (x, y, _), (_, yt, _) in zip(train, test):
        assert x.shape[1:] == (1, 28, 28)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert len(set(y.tolist())) == 2 and set(y.tolist()) == set(yt.tolist())
        # 20x20 digit centred in the frame: a 4-pixel zero border
        assert float(x[..., :4, :].abs().sum()) == 0.0 and float(x[..., -4:].abs().sum()) == 0.0
    assert set().union(*(set(y.tolist()) for _, y, _ in train)) == set(range(10))
    assert b.info["source"] == "scikit-learn digits"
