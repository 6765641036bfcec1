"""Every config error surfaces at plan time (``--dry-run`` included), before any pretraining or training (issue 15):
model shapes against the benchmark, every path a run will read, LoRA targets, analysis layers, and combinations
that cannot run. Each case also checks that nothing was pretrained or trained."""

import json
import os
import warnings

import pytest
import torch
from conftest import TINY_MODEL, tiny_experiment

import avalanche_merge.models.pretrain as pretrain_module
from avalanche_merge.cli import main
from avalanche_merge.config import ConfigError
from avalanche_merge.models.pretrain import PretrainConfig, pretrained_tiny_vit, save_checkpoint
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.runner import load_experiment, plan_experiment, run_experiment
from avalanche_merge.runner.preflight import preflight

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 14, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def model(**options):
    return {"name": "tiny_vit", "options": {**TINY_MODEL["options"], **options}}


def check(config: dict) -> None:
    preflight(plan_experiment(load_experiment(config)))


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything is pretrained or a run starts."""
    def boom(*args, **kwargs):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(pretrain_module, "pretrain_tiny_vit", boom)
    monkeypatch.setattr("avalanche_merge.runner.suite.execute_run", boom)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"model": model(heads=3)}, r"model\.options \(tiny_vit.*heads must divide dim, got heads=3, dim=16"),
    ({"model": model(patch_size=5)}, r"patch_size 5 does not divide the benchmark's image size 28"),
    ({"model": model(dim=0)}, r"dim must be >= 1, got 0"),
    ({"model": model(checkpoint="/no/such/file.safetensors")}, r"checkpoint not found: /no/such/file"),
    ({"model": model(cache_dir="/proc/version")}, r"cache_dir /proc/version exists and is not a folder"),
    ({"methods": [{"name": "lora", "options": {"target_modules": ["query"]}}]},
     r"methods \(lora\)\.options\.target_modules.*'query' matches no nn\.Linear.*valid names: \['fc1', 'fc2', 'k'"),
    ({"methods": [{"name": "inflora", "options": {"target_modules": ["head"]}}]}, r"'head' matches no nn\.Linear"),
    ({"analysis": {"layers": ["blocks.7"]}}, r"analysis\.layers: 'blocks\.7' is not a module of tiny_vit"),
    ({"methods": ["color"], "analysis": {}}, r"analysis\.drift: 'color' routes each input"),
    ({"benchmarks": [{"name": "split_cifar10", "options": {"dataset_root": "/no/such/root"}}]},
     r"benchmark 'split_cifar10': cifar10 files not found"),
    ({"model": {"name": "open_clip", "options": {"model_name": "tiny", "model_cfg": TINY_CLIP,
                                                 "pretrained": "/no/such/clip.pt"}}},
     r"model\.options \(open_clip.*pretrained='/no/such/clip\.pt' is not an existing file"),
])
def test_config_errors_are_found_before_any_work(overrides, match, no_training, tmp_path):
    config = {**tiny_experiment(["naive"]), **overrides}
    with pytest.raises(ConfigError, match=match):
        check(config)
    with pytest.raises(ConfigError, match=match):
        run_experiment(load_experiment(config), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_a_model_error_in_one_line(tmp_path, capsys, no_training):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_experiment(["naive"], model=model(heads=3))))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "heads must divide dim" in err and "Traceback" not in err


def test_lora_targets_are_resolved_on_open_clip_architecture(no_training):
    clip = {"name": "open_clip", "options": {"model_name": "tiny", "model_cfg": TINY_CLIP}}
    with pytest.raises(ConfigError, match=r"'query' matches no nn\.Linear.* of ZeroShotClassifier.*c_fc.*open_clip"):
        check(tiny_experiment([{"name": "lora", "options": {"target_modules": ["query"]}}], model=clip))
    check(tiny_experiment([{"name": "lora", "options": {"target_modules": ["c_fc", "c_proj"]}}], model=clip))
    # the learners' defaults (roles q, v) and "auto" reach open_clip's attention, split into Linear layers (issue 16)
    check(tiny_experiment(["lora", {"name": "inflora", "options": {"target_modules": ["auto"]}}], model=clip))


def test_valid_configs_pass_without_loading_weights(no_training, tmp_path):
    check(tiny_experiment(["naive", "lora", {"name": "inflora", "options": {"target_modules": ["k", "v"]}}],
                          analysis={"layers": ["blocks.0"]}))
    check(tiny_experiment(["color"], analysis={"drift": False}))
    check(tiny_experiment(["naive"], model=model(cache_dir=str(tmp_path / "new" / "cache"))))


def tiny_vit(num_classes=10, dim=16):
    return TinyViT(TinyViTConfig(image_size=28, patch_size=7, in_chans=1, dim=dim, depth=1, heads=2,
                                 num_classes=num_classes))


def test_a_checkpoint_is_checked_against_the_architecture_from_its_header(tmp_path, no_training):
    good, wrong = tmp_path / "good.safetensors", tmp_path / "wrong.safetensors"
    save_checkpoint(tiny_vit(), good, {})
    save_checkpoint(tiny_vit(dim=32), wrong, {})
    check(tiny_experiment(["naive"], model=model(checkpoint=str(good))))
    with pytest.raises(ConfigError, match=r"wrong\.safetensors does not fit tiny_vit.*wrong shapes"):
        check(tiny_experiment(["naive"], model=model(checkpoint=str(wrong))))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ConfigError, match=r"garbage\.safetensors is not a readable safetensors checkpoint"):
        check(tiny_experiment(["naive"], model=model(checkpoint=str(garbage))))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_cache_folder_that_cannot_be_written_is_refused(tmp_path, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"cache_dir .*locked.* cannot be written"):
            check(tiny_experiment(["naive"], model=model(cache_dir=str(locked / "cache"))))
    finally:
        locked.chmod(0o700)


def test_a_corrupt_cache_entry_is_named_moved_aside_and_rebuilt(tmp_path, monkeypatch):
    config = PretrainConfig(vit=TinyViTConfig(dim=16, depth=1, heads=2), epochs=1)
    calls = []

    def fake_pretrain(cfg, progress=True):
        calls.append(cfg)
        torch.manual_seed(0)
        return TinyViT(cfg.vit), {"train_acc_clean": 0.5}

    monkeypatch.setattr(pretrain_module, "pretrain_tiny_vit", fake_pretrain)
    model_a, meta = pretrained_tiny_vit(config, cache_dir=tmp_path)
    path = tmp_path / f"tiny_vit-{config.fingerprint()}.safetensors"
    assert meta["path"] == str(path) and len(calls) == 1
    pretrained_tiny_vit(config, cache_dir=tmp_path)
    assert len(calls) == 1  # a good entry is reused
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash or a full disk
    with pytest.warns(UserWarning, match=r"cached checkpoint .*tiny_vit-.*\.safetensors is corrupt"):
        model_b, _ = pretrained_tiny_vit(config, cache_dir=tmp_path)
    assert len(calls) == 2 and (tmp_path / (path.name + ".corrupt")).is_file()
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pretrained_tiny_vit(config, cache_dir=tmp_path)  # rebuilt entry: read back silently


def test_geometry_include_must_match_a_weight(no_training):
    with pytest.raises(ConfigError, match=r"analysis\.geometry_include: 'nothing\\\\d' matches no weight"):
        check(tiny_experiment(["naive"], analysis={"geometry_include": r"nothing\d"}))
    with pytest.raises(ConfigError, match=r"geometry_storage must be one of \['memory', 'disk'\], got 'cloud'"):
        check(tiny_experiment(["naive"], analysis={"geometry_storage": "cloud"}))
    check(tiny_experiment(["naive"], analysis={"geometry_include": r"blocks\.0\.", "geometry_dtype": "float16"}))


@pytest.mark.parametrize("name", ["ViT-B-16", "convnext_base"])
def test_open_clip_skeletons_of_full_size_towers_cost_nothing(name):
    """A full-size architecture (a timm tower too: no ``output_dim``) is built on the meta device, with no memory."""
    from avalanche_merge.models.backbones import OpenCLIPOptions, open_clip_skeleton

    model = open_clip_skeleton(OpenCLIPOptions(model_name=name), (3, 224, 224), 7)
    assert model.head.weight.shape[0] == 7 and model.head.weight.is_meta
    assert all(p.is_meta for p in model.parameters())
