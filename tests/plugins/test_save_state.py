"""save_state / load_state: interrupting after experience k and resuming gives bit-identical results to an
uninterrupted run, per family (issue 16; Avalanche's own save_checkpoint cannot pickle a strategy on torch 2.14)."""

import pytest
import torch
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from user_setup import TARGETS, digits_benchmark, user_model

from avalanche_merge.plugins import LoRAPlugin, MergePlugin, SparsePlugin, load_state, save_state

PLUGINS = {
    "merge_opcm": lambda: MergePlugin(merger="opcm"),
    "merge_magmax": lambda: MergePlugin(merger="magmax"),
    "merge_ties": lambda: MergePlugin(merger="ties"),
    "lora_olora": lambda: LoRAPlugin(method="olora", options={"target_modules": TARGETS["mlp"], "rank": 2}),
    "lora_inflora": lambda: LoRAPlugin(method="inflora", options={"target_modules": TARGETS["mlp"], "rank": 2}),
    "sparse_masked": lambda: SparsePlugin(method="masked", options={"density": 0.2, "max_samples": 32}),
    "sparse_rigl": lambda: SparsePlugin(method="rigl", options={"density": 0.2, "update_every": 2}),
}


@pytest.fixture(scope="module")
def bench():
    return digits_benchmark()


def build(name, incremental=True, cls=Naive, **extra):
    model = user_model("mlp", incremental)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    plugin = PLUGINS[name]()
    strategy = cls(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1,
                   eval_mb_size=100, plugins=[plugin], evaluator=EvaluationPlugin(), **extra)
    return strategy


def outputs(strategy, bench):
    x = torch.stack([s[0] for s in bench.test_stream[0].dataset])
    strategy.model.eval()
    with torch.no_grad():
        return strategy.model(x)


@pytest.mark.parametrize("name", list(PLUGINS))
def test_resume_after_experience_k_is_bit_identical(bench, name, tmp_path):
    k = 1
    full = build(name)
    for i in range(4):
        full.train(bench.train_stream[i])
    expected = {n: v.clone() for n, v in full.model.state_dict().items()}

    first = build(name)
    for i in range(k + 1):
        first.train(bench.train_stream[i])
    save_state(first, tmp_path / "state")
    resumed = build(name)
    load_state(resumed, tmp_path / "state", experiences=[bench.train_stream[i] for i in range(k + 1)])
    for i in range(k + 1, 4):
        resumed.train(bench.train_stream[i])
    got = resumed.model.state_dict()
    assert sorted(got) == sorted(expected)
    for n, v in expected.items():
        assert torch.equal(got[n], v), n
    assert torch.equal(outputs(resumed, bench), outputs(full, bench))
    assert resumed.clock.train_exp_counter == full.clock.train_exp_counter


def test_resume_without_the_state_differs(bench, tmp_path):
    """The check above has teeth: resuming without load_state (or with the optimizer state dropped) differs."""
    full = build("lora_olora")
    for i in range(4):
        full.train(bench.train_stream[i])
    cold = build("lora_olora")
    for i in range(2, 4):
        cold.train(bench.train_stream[i])
    assert not torch.equal(outputs(cold, bench), outputs(full, bench))


def test_save_state_refuses_plugins_it_cannot_save(bench, tmp_path):
    strategy = build("merge_opcm", cls=Replay, mem_size=10)
    strategy.train(bench.train_stream[0])
    with pytest.raises(ValueError, match="ReplayPlugin"):
        save_state(strategy, tmp_path / "s")
    save_state(strategy, tmp_path / "s", strict=False)
    assert (tmp_path / "s" / "tensors.safetensors").exists()


def test_load_state_refuses_another_setup(bench, tmp_path):
    strategy = build("merge_opcm")
    strategy.train(bench.train_stream[0])
    save_state(strategy, tmp_path / "s")
    with pytest.raises(ValueError, match="plugins"):
        load_state(build("lora_olora"), tmp_path / "s")
