"""The continual LoRA foundation: peft adapters per task, O-LoRA's penalty, save/load, errors."""

import pytest
import torch
import torch.nn.functional as F

from avalanche_merge.lora import ContinualLoRA, LoRAConfig, OLoRA, OLoRAConfig, make_learner
from avalanche_merge.lora.adapters import adapter_state
from avalanche_merge.models.vit import TinyViT, TinyViTConfig


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))


def task_data(task, n=32, seed=0):
    g = torch.Generator().manual_seed(100 * task + seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_task(learner, task, steps=5, lr=1e-2):
    x, y = task_data(task)
    params = learner.begin_task([x])
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(learner.model(x), y)
        penalty = learner.penalty()
        if penalty is not None:
            loss = loss + penalty
        loss.backward()
        learner.after_backward()
        opt.step()
        learner.after_step()
    learner.end_task([x])


def test_new_adapter_changes_nothing_and_base_stays_frozen():
    model = tiny_model()
    x, _ = task_data(0)
    before = model(x).detach()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    learner = OLoRA(model, config=OLoRAConfig(rank=2))
    params = learner.begin_task()
    assert torch.equal(model(x), before)  # peft inits B = 0
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n and ".task0." in n or n.startswith("head.") for n in names)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    train_task(learner, 0, steps=3)
    after = model.state_dict()
    for k, v in base.items():
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if not k.startswith("head."):
            assert torch.equal(after[key], v), k


def test_frozen_adapters_stay_bit_identical_and_all_stay_active():
    learner = OLoRA(tiny_model(), config=OLoRAConfig(rank=2))
    train_task(learner, 0)
    first = adapter_state(learner.model, "task0")
    assert any(v.abs().sum() > 0 for k, v in first.items() if k.endswith("lora_B"))
    train_task(learner, 1)
    train_task(learner, 2)
    for k, v in adapter_state(learner.model, "task0").items():
        assert torch.equal(v, first[k]), k
    layer = learner.layers()["blocks.0.attn.q"]
    assert layer.active_adapters == ["task0", "task1", "task2"]
    assert learner.adapters == ["task0", "task1", "task2"]


def test_olora_penalty_equals_direct_computation():
    cfg = OLoRAConfig(rank=3, lambda1=0.7, lambda2=0.05, target_modules=("q", "k", "v"))
    learner = OLoRA(tiny_model(), config=cfg)
    train_task(learner, 0)
    train_task(learner, 1)
    learner.begin_task()
    with torch.no_grad():  # give the new adapter non-zero B so that lambda2 sees both factors
        for layer in learner.layers().values():
            layer.lora_B["task2"].weight.normal_()
    params = dict(learner.model.named_parameters())
    expected = torch.zeros(())
    for layer in ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"):
        a_new = params[f"{layer}.lora_A.task2.weight"]
        for old in ("task0", "task1"):
            a_old = params[f"{layer}.lora_A.{old}.weight"]
            expected = expected + cfg.lambda1 * sum(abs(float(a_old[i] @ a_new[j])) for i in range(3)
                                                    for j in range(3))
        expected = expected + cfg.lambda2 * (a_new.pow(2).sum() + params[f"{layer}.lora_B.task2.weight"].pow(2).sum())
    assert torch.allclose(learner.penalty(), expected, rtol=1e-5)


def test_olora_penalty_gradient_reaches_only_the_new_adapter():
    learner = OLoRA(tiny_model(), config=OLoRAConfig(rank=2))
    train_task(learner, 0)
    learner.begin_task()
    learner.model.zero_grad(set_to_none=True)
    learner.penalty().backward()
    params = dict(learner.model.named_parameters())
    assert params["blocks.0.attn.q.lora_A.task1.weight"].grad.abs().sum() > 0
    assert params["blocks.0.attn.q.lora_A.task0.weight"].grad is None


def test_plain_lora_keeps_one_shared_adapter():
    learner = ContinualLoRA(tiny_model(), config=LoRAConfig(rank=2))
    train_task(learner, 0)
    after0 = adapter_state(learner.model, "task0")
    train_task(learner, 1)
    assert learner.adapters == ["task0"]
    assert not torch.equal(adapter_state(learner.model, "task0")["blocks.0.attn.q.lora_B"],
                           after0["blocks.0.attn.q.lora_B"])


def test_save_load_round_trip(tmp_path):
    learner = make_learner("olora", tiny_model(), rank=2, lambda1=0.3)
    train_task(learner, 0)
    train_task(learner, 1)
    path = tmp_path / "olora.safetensors"
    learner.save(path)
    x, _ = task_data(5)
    learner.model.eval()  # O-LoRA's default adapter dropout (0.1) is off in evaluation
    expected = learner.model(x).detach()
    fresh = make_learner("olora", tiny_model(), rank=2, lambda1=0.3)
    fresh.load(path)
    fresh.model.eval()
    assert fresh.adapters == ["task0", "task1"] and fresh.task == 1
    assert torch.equal(fresh.model(x), expected)
    with pytest.raises(ValueError, match="config"):
        make_learner("olora", tiny_model(), rank=2, lambda1=0.9).load(path)
    with pytest.raises(ValueError, match="'olora' learner, not 'lora'"):
        make_learner("lora", tiny_model(), rank=2).load(path)


def test_same_seed_same_adapters():
    states = []
    for _ in range(2):
        learner = make_learner("olora", tiny_model(seed=3), rank=2)
        torch.manual_seed(0)
        train_task(learner, 0)
        train_task(learner, 1)
        states.append(adapter_state(learner.model, "task1"))
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


@pytest.mark.parametrize("options, match", [
    ({"rank": 0}, r"rank must be >= 1, got 0"),
    ({"rank": 2.5}, r"rank must be an int"),
    ({"alpha": -1.0}, r"alpha must be in \(0.0"),
    ({"dropout": 1.0}, r"dropout must be in \[0.0, 1.0\)"),
    ({"target_modules": []}, r"target_modules must be a non-empty list"),
    ({"lambda1": -0.1}, r"lambda1 must be in \[0.0"),
    ({"lr": 0.0}, r"lr must be in \(0.0"),
    ({"ranks": 2}, r"unknown option 'ranks' for LoRA learner 'olora'"),
])
def test_bad_configs_raise(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_learner("olora", tiny_model(), **options)


def test_unknown_target_module_and_learner():
    with pytest.raises(ValueError, match=r"target module 'query' matches no nn.Linear.*'fc1'"):
        make_learner("lora", tiny_model(), target_modules=["query"])
    with pytest.raises(ValueError, match="unknown LoRA learner 'nope'.*olora"):
        make_learner("nope", tiny_model())
    with pytest.raises(RuntimeError, match="before begin_task"):
        ContinualLoRA(tiny_model()).end_task()


def test_multihead_attention_out_proj_is_refused():
    model = torch.nn.Sequential()
    model.add_module("attn", torch.nn.MultiheadAttention(8, 2))
    model.add_module("head", torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        make_learner("lora", model, target_modules=["out_proj"])
