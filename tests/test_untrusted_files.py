"""Untrusted data and checkpoints never run code (part of issue 15): each path gets a harmless payload that would
create a marker file if it ran."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))

from avalanche_merge.benchmarks import classic  # noqa: E402
from avalanche_merge.safe_load import load_weights, safe_unpickle  # noqa: E402


class Payload:
    """Pickles to a call of ``os.system('touch <marker>')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _fake_cifar100(root: Path, *, meta_payload=None, train_payload=None) -> None:
    spec = classic._CIFAR["cifar100"]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    labels = [c for c in range(100) for _ in range(2)]
    data = np.random.default_rng(0).integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    for name in ("train", "test"):
        record = {"data": data, "fine_labels": labels}
        if name == "train" and train_payload is not None:
            record["extra"] = train_payload
        with open(folder / name, "wb") as f:
            pickle.dump(record, f)
    names = [f"c{i:02d}" for i in range(100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": meta_payload if meta_payload is not None else names}, f)


@pytest.mark.parametrize("where", ["meta", "train"])
def test_a_crafted_cifar_folder_cannot_run_code(where, tmp_path):
    marker = tmp_path / "ran"
    payload = Payload(marker)
    _fake_cifar100(tmp_path / "data", meta_payload=payload if where == "meta" else None,
                   train_payload=payload if where == "train" else None)
    with pytest.raises(ValueError, match=r"refusing to load global (posix|os|nt)\.system"):
        classic.split_cifar100(dataset_root=str(tmp_path / "data"), verify_checksums=False)
    assert not marker.exists()


def test_safe_unpickle_loads_plain_data_and_numpy_arrays_only_when_allowed(tmp_path):
    path = tmp_path / "data.pkl"
    with open(path, "wb") as f:
        pickle.dump({"a": [1, "x", b"y"], "arr": np.arange(3)}, f)
    with pytest.raises(ValueError, match="refusing to load global"):
        safe_unpickle(path)
    from avalanche_merge.safe_load import NUMPY_ARRAY_GLOBALS

    out = safe_unpickle(path, allowed=NUMPY_ARRAY_GLOBALS)
    assert out["a"] == [1, "x", b"y"] and out["arr"].tolist() == [0, 1, 2]


def test_a_crafted_checkpoint_cannot_run_code_even_with_torchs_override(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2), "evil": Payload(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's switch for old checkpoints
    with pytest.raises(ValueError, match="cannot be loaded as model weights without executing code"):
        load_weights(path)
    from test_clip import CLASSES, TINY_CFG

    from avalanche_merge.models.clip import zero_shot_classifier

    with pytest.raises(ValueError, match="cannot be loaded as model weights without executing code"):
        zero_shot_classifier("tiny-clip", CLASSES, model_cfg=TINY_CFG, pretrained=str(path))
    assert not marker.exists()


def test_load_weights_unwraps_state_dict_and_module_prefix(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"module.a": torch.ones(2)}}, path)
    assert list(load_weights(path)) == ["a"]
    torch.save({"a": "not a tensor"}, path)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        load_weights(path)
