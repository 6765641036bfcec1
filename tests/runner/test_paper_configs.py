"""The paper-protocol configs (experiments/configs/paper/) plan and pass ``--dry-run`` on stand-ins of the right layout;
missing paths fail before any work; ``${NAME}`` substitution and ``--set``."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_merge.benchmarks import classic
from avalanche_merge.cli import main
from avalanche_merge.config import ConfigError, parse_assignments, substitute_variables
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.runner.preflight import preflight

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "paper"
CONFIGS = sorted(PAPER.glob("*.json"))
TA8 = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _fake_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        labels = list(range(100))
        data = {"data": rng.integers(0, 255, (100, 3072), dtype=np.uint8), "fine_labels": labels,
                "coarse_labels": [0] * 100, "filenames": [f"{i}.png" for i in labels]}
        (folder / split).write_bytes(pickle.dumps(data))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i}" for i in range(100)]}))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """AM_DATA (CIFAR-100 pickles, ImageNet-R's 200 class folders), AM_TA8 (8 task folders, one with train/ and
    test/), a randomly initialised full-size ViT-B/16 timm-format checkpoint and CLIP checkpoint files."""
    from safetensors.torch import save_file

    from avalanche_merge.models.timm_vit import build_vit, expected_timm_shapes, vit_config

    root = tmp_path_factory.mktemp("stand_ins")
    data = root / "data"
    _fake_cifar100(data)
    for c in range(200):
        for i in range(2):
            _png(data / "imagenet-r" / f"n{c:08d}" / f"{i}.png", c * 2 + i)
    for t, task in enumerate(TA8):
        for c in range(3):
            if task == "MNIST":  # the official-split layout
                for split in ("train", "test"):
                    _png(root / "ta8" / task / split / str(c) / "0.png", t * 10 + c)
            else:
                for i in range(2):
                    _png(root / "ta8" / task / f"class_{c}" / f"{i}.png", t * 10 + c * 2 + i)
    torch.manual_seed(0)
    vit = build_vit(vit_config("vit_base_patch16_224", (3, 224, 224), 1000))
    state = vit.state_dict()
    timm_state = {}  # back to timm's names: q, k, v fused into qkv
    for key in expected_timm_shapes(vit):
        if ".attn.qkv." in key:
            prefix, kind = key.split(".attn.qkv.")
            timm_state[key] = torch.cat([state[f"{prefix}.attn.{n}.{kind}"] for n in "qkv"])
        else:
            ours = key.replace("patch_embed.proj.", "patch_embed.").replace(".mlp.fc", ".fc")
            timm_state[key] = state[ours]
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(root / "vit_b16.safetensors"))
    for name in ("clip_b32.pt", "clip_b16.pt"):  # the dry-run checks that open_clip weights exist
        torch.save({}, root / name)
    return {"AM_DATA": str(data), "AM_TA8": str(root / "ta8"), "AM_VIT_B16": str(root / "vit_b16.safetensors"),
            "AM_CLIP_B32": str(root / "clip_b32.pt"), "AM_CLIP_B16": str(root / "clip_b16.pt")}


@pytest.fixture
def official_cifar(monkeypatch):
    """The stand-in CIFAR files pass the MD5 checks (ours and torchvision's) as the official files would."""
    import torchvision.datasets.cifar as tv_cifar

    md5s = dict(classic._CIFAR["cifar100"]["files"])
    monkeypatch.setattr(classic, "_md5", lambda path: md5s[Path(path).name])
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)


def test_there_are_configs_for_every_protocol():
    names = {p.stem for p in CONFIGS}
    for bench in ("cifar100", "imagenet_r"):
        for method in ("inflora", "sdlora", "cllora", "olora", "prototypes", "baselines"):
            assert f"vitb16_{bench}_{method}" in names
    assert {"clip_vitb32_ta8_merging", "clip_vitb16_ta8_merging"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_passes_dry_run_on_stand_ins(path, stand_ins, official_cifar, capsys):
    args = ["run", str(path), "--dry-run"] + [a for k, v in stand_ins.items() for a in ("--set", f"{k}={v}")]
    assert main(args) == 0, capsys.readouterr().err
    assert "config OK" in capsys.readouterr().out
    plans = plan_experiment(load_experiment(path, stand_ins))
    assert plans and all(p.device in ("cpu", "cuda") for p in plans)
    if path.stem.startswith("clip"):
        assert all(p.protocol == "frozen" for p in plans)  # zero-shot heads frozen, as in the OPCM table
        assert plans[0].benchmark_options.task_names == list(TA8)
    else:
        assert plans[0].model_options.arch == "vit_base_patch16_224"
        assert plans[0].benchmark_options.image_size == 224 and plans[0].benchmark_options.n_experiences == 10


def test_inflora_configs_carry_the_papers_hyper_parameters(stand_ins):
    for bench, epochs, threshold in (("cifar100", 20, 0.95), ("imagenet_r", 50, 0.98)):
        (plan,) = plan_experiment(load_experiment(PAPER / f"vitb16_{bench}_inflora.json", stand_ins))[:1]
        assert (plan.train.epochs, plan.train.batch_size, plan.train.optimizer, plan.train.lr) == \
            (epochs, 128, "adam", 5e-4)
        opts = plan.method_options
        assert (opts.rank, tuple(opts.target_modules), opts.threshold, opts.threshold_end) == \
            (10, ("k", "v"), threshold, 1.0)


@pytest.mark.parametrize("missing", ["AM_DATA", "AM_VIT_B16"])
def test_unset_path_variable_is_named_before_any_work(missing, stand_ins, monkeypatch, capsys):
    monkeypatch.delenv(missing, raising=False)
    variables = {k: v for k, v in stand_ins.items() if k != missing}
    with pytest.raises(ConfigError, match=rf"\${{{missing}}} is not set; export {missing}="):
        load_experiment(PAPER / "vitb16_cifar100_inflora.json", variables)
    args = ["run", str(PAPER / "vitb16_cifar100_inflora.json"), "--dry-run"]
    args += [a for k, v in variables.items() for a in ("--set", f"{k}={v}")]
    assert main(args) == 2
    assert missing in capsys.readouterr().err


@pytest.mark.parametrize(("config", "variable", "message"), [
    ("vitb16_cifar100_inflora.json", "AM_DATA", "cifar100 files not found"),
    ("vitb16_imagenet_r_sdlora.json", "AM_DATA", "no class folders"),
    ("vitb16_cifar100_inflora.json", "AM_VIT_B16", "is not a file"),
    ("clip_vitb32_ta8_merging.json", "AM_TA8", "does not exist or is not a folder"),
    ("clip_vitb32_ta8_merging.json", "AM_CLIP_B32", "is not an existing file"),
])
def test_wrong_paths_fail_the_dry_run(config, variable, message, stand_ins, official_cifar, tmp_path):
    variables = dict(stand_ins, **{variable: str(tmp_path / "nowhere")})
    if variable == "AM_DATA":
        (tmp_path / "nowhere").mkdir()
    plans = plan_experiment(load_experiment(PAPER / config, variables))
    with pytest.raises(ConfigError, match=message):
        preflight(plans)


def test_substitution_rules(monkeypatch):
    monkeypatch.setenv("AM_X", "/env")
    raw = {"a": "${AM_X}/data", "b": ["${AM_Y:-fallback}", 3, True], "c": "${AM_X}${AM_X}", "${AM_X}": "key kept"}
    assert substitute_variables(raw) == {"a": "/env/data", "b": ["fallback", 3, True], "c": "/env/env",
                                         "${AM_X}": "key kept"}
    assert substitute_variables(raw, {"AM_X": "/cli"})["a"] == "/cli/data"  # --set wins over the environment
    with pytest.raises(ConfigError, match=r"b\[0\]: \$\{AM_Z\} is not set"):
        substitute_variables({"b": ["${AM_Z}"]})
    assert parse_assignments(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("A", "=1", "1A=2", "A-B=3"):
        with pytest.raises(ConfigError, match="--set: expected NAME=VALUE"):
            parse_assignments([bad])


def test_configs_are_plain_json_with_documented_variables():
    used = set()
    for path in CONFIGS:
        text = path.read_text()
        json.loads(text)
        used |= set(__import__("re").findall(r"\$\{([A-Z0-9_]+)", text))
    assert used == {"AM_DATA", "AM_TA8", "AM_VIT_B16", "AM_CLIP_B32", "AM_CLIP_B16"}
    doc = (PAPER.parents[2] / "docs" / "guide" / "paper_configs.md").read_text()
    assert all(f"`{v}`" in doc for v in used)
