"""CL-LoRA (He et al., CVPR 2025): losses against direct computations, gradient reassignment, freezing, state."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_experiment

from avalanche_merge.lora import make_learner
from avalanche_merge.lora.cllora import SHARED, CLLoRA, CLLoRAConfig, reassignment_weights
from avalanche_merge.models.vit import TinyViT, TinyViTConfig

X = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(2))


def tiny(depth=2, seed=0):
    torch.manual_seed(seed)
    return TinyViT(TinyViTConfig(dim=16, depth=depth, heads=2, num_classes=4))


def train_task(learner, steps=3, lr=0.2):
    params = learner.begin_task(None)
    optimizer = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(learner.model(X), Y)
        penalty = learner.penalty()
        loss = loss if penalty is None else loss + penalty
        optimizer.zero_grad()
        loss.backward()
        learner.after_backward()
        optimizer.step()
    learner.end_task(None)


def perturb_shared(learner, scale=0.3):
    with torch.no_grad():
        for t in learner.shared_targets:
            b = learner.layers()[t].lora_B[SHARED].weight
            b.add_(scale * torch.randn_like(b))


def test_split_and_init():
    learner = make_learner("cllora", tiny())
    assert learner.shared_targets == ["blocks.0.attn.q", "blocks.0.attn.v"]
    assert learner.specific_targets == ["blocks.1.attn.q", "blocks.1.attn.v"]
    params = learner.begin_task(None)
    layers = learner.layers()
    for t in learner.shared_targets:
        a = layers[t].lora_A[SHARED].weight
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)  # orthonormal rows
        assert not a.requires_grad and layers[t].lora_B[SHARED].weight.requires_grad
        assert "task0" not in layers[t].lora_A
    assert learner.block_weights["task0"].requires_grad and any(p is learner.block_weights["task0"] for p in params)
    assert ((learner.block_weights["task0"] >= 0.5) & (learner.block_weights["task0"] <= 1.5)).all()


def test_block_weight_scales_the_adapter_output():
    learner = make_learner("cllora", tiny(), shared_blocks=0)
    learner.begin_task(None)
    layer = learner.layers()["blocks.1.attn.v"]
    with torch.no_grad():
        layer.lora_B["task0"].weight.normal_()
        learner.block_weights["task0"][3] = 2.5
    x = torch.randn(5, 16)
    a, b = layer.lora_A["task0"].weight, layer.lora_B["task0"].weight
    expected = layer.base_layer(x) + 2.5 * layer.scaling["task0"] * x @ a.T @ b.T  # layer index 3: blocks.1.v
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_orthogonality_loss_equals_direct_computation():
    learner = make_learner("cllora", tiny(), kd_weight=0.0, orth_weight=0.3)
    for _ in range(2):
        train_task(learner, steps=1)
    learner.begin_task(None)
    learner.model(X)
    beta = learner.block_weights
    cos = [F.cosine_similarity(beta[f"task{i}"].detach(), beta["task2"], dim=0).abs() for i in range(2)]
    torch.testing.assert_close(learner.penalty(), 0.3 * torch.stack(cos).mean())


def test_feature_kd_equals_direct_computation():
    learner = make_learner("cllora", tiny(), orth_weight=0.0, kd_weight=2.0)
    train_task(learner)
    learner.begin_task(None)
    assert learner.penalty() is None  # nothing captured yet
    perturb_shared(learner)
    inputs = {}
    layers = learner.layers()
    for t in learner.shared_targets:
        layers[t].register_forward_pre_hook(lambda m, args, t=t: inputs.__setitem__(t, args[0]))
    learner.model(X)
    terms = []
    for t in learner.shared_targets:
        layer = layers[t]
        z = inputs[t] @ layer.lora_A[SHARED].weight.T
        new, old = layer.lora_B[SHARED].weight, learner.old_shared[t]
        terms.append(((z @ new.T - z @ old.T) * layer.scaling[SHARED]).pow(2).sum(-1).mean())
    torch.testing.assert_close(learner.penalty(), 2.0 * torch.stack(terms).mean())


def test_logit_kd_equals_direct_computation():
    learner = make_learner("cllora", tiny(), kd_target="logits", orth_weight=0.0, temperature=3.0)
    train_task(learner)
    learner.begin_task(None)
    teacher_model = copy.deepcopy(learner.model)  # shared B == old B here
    perturb_shared(learner)
    student = learner.model(X)
    with torch.no_grad():
        teacher = teacher_model(X)
    expected = -(torch.softmax(teacher / 3, 1) * torch.log_softmax(student / 3, 1)).sum(1).mean()
    torch.testing.assert_close(learner.penalty(), 5.0 * expected)


def test_reassignment_weights_hand_built():
    old = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])  # row norms 5, 0, 1
    torch.testing.assert_close(reassignment_weights(old), torch.tensor([2.5, 0.0, 0.5]))
    torch.testing.assert_close(reassignment_weights(torch.zeros(3, 2)), torch.ones(3))


@pytest.mark.parametrize("kd_target", ["features", "logits"])
def test_only_the_kd_gradient_is_reassigned(kd_target):
    learner = make_learner("cllora", tiny(), kd_target=kd_target, orth_weight=0.0)
    train_task(learner)
    layers = learner.layers()
    with torch.no_grad():  # hand-built old shared B: row i of layer q is (i, 0, 0, 0), layer v random
        q = layers["blocks.0.attn.q"].lora_B[SHARED].weight
        q.zero_()
        q[:, 0] = torch.arange(16.0)
    learner.begin_task(None)
    expected_w = 16 * torch.arange(16.0) / torch.arange(16.0).sum()  # d_out * ||B_i|| / sum_j ||B_j||
    torch.testing.assert_close(learner._w["blocks.0.attn.q"], expected_w)
    perturb_shared(learner)
    head = learner.model.head.weight

    def grads(with_ce, with_penalty, reassign):
        learner.config.reassign = reassign
        learner.model.zero_grad()
        out = learner.model(X)
        loss = F.cross_entropy(out, Y) if with_ce else out.sum() * 0
        penalty = learner.penalty()
        (loss + penalty if with_penalty else loss).backward()
        return ({t: layers[t].lora_B[SHARED].weight.grad.clone() for t in learner.shared_targets},
                head.grad.clone())

    kd_plain, kd_head = grads(False, True, False)
    kd_re, kd_head_re = grads(False, True, True)
    ce, _ = grads(True, False, True)
    total, _ = grads(True, True, True)
    for t in learner.shared_targets:
        w = learner._w[t][:, None]
        assert kd_plain[t].abs().sum() > 0
        torch.testing.assert_close(kd_re[t], w * kd_plain[t], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(total[t], ce[t] + w * kd_plain[t], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kd_head_re, kd_head, atol=1e-6, rtol=1e-5)  # other parameters: untouched


def test_earlier_specific_adapters_frozen_shared_keeps_training():
    learner = make_learner("cllora", tiny())
    train_task(learner)
    layers = learner.layers()
    frozen = {k: v.clone() for k, v in learner.extra_state().items() if k == "block::task0"}
    frozen |= {f"{t}.{p}": getattr(layers[t], p)["task0"].weight.detach().clone()
               for t in learner.specific_targets for p in ("lora_A", "lora_B")}
    shared_a = {t: layers[t].lora_A[SHARED].weight.detach().clone() for t in learner.shared_targets}
    shared_b = [{t: layers[t].lora_B[SHARED].weight.detach().clone() for t in learner.shared_targets}]
    for _ in range(2):
        train_task(learner)
        shared_b.append({t: layers[t].lora_B[SHARED].weight.detach().clone() for t in learner.shared_targets})
        assert torch.equal(learner.block_weights["task0"], frozen["block::task0"])
        for t in learner.specific_targets:
            for p in ("lora_A", "lora_B"):
                assert torch.equal(getattr(layers[t], p)["task0"].weight, frozen[f"{t}.{p}"])
        for t in learner.shared_targets:
            assert torch.equal(layers[t].lora_A[SHARED].weight, shared_a[t])
            assert not torch.equal(shared_b[-1][t], shared_b[-2][t])
    assert learner.adapters == [SHARED, "task0", "task1", "task2"]


def test_save_load_round_trip(tmp_path):
    learner = make_learner("cllora", tiny(), kd_target="logits")
    for _ in range(2):
        train_task(learner)
    learner.save(tmp_path / "cl.safetensors")
    learner.model.eval()
    with torch.no_grad():
        expected = learner.model(X)
    other = make_learner("cllora", tiny(), kd_target="logits")
    other.load(tmp_path / "cl.safetensors")
    other.model.eval()
    assert other.task == 1 and other.adapters == learner.adapters
    with torch.no_grad():
        torch.testing.assert_close(other.model(X), expected, atol=0, rtol=0)
    mine, theirs = learner.extra_state(), other.extra_state()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert [n for n, b in other.block_weights.items() if b.requires_grad] == ["task1"]
    other.model.train()
    train_task(other)  # continues with task 2
    with pytest.raises(ValueError, match="config"):
        make_learner("cllora", tiny(), kd_weight=1.0).load(tmp_path / "cl.safetensors")


def test_deterministic_under_seed():
    states = []
    for _ in range(2):
        learner = make_learner("cllora", tiny())
        for _ in range(2):
            train_task(learner)
        states.append({k: v.clone() for k, v in learner.model.state_dict().items()} | learner.extra_state())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize(("options", "match"), [
    ({"shared_blocks": -1}, "shared_blocks must be None or an int >= 0, got -1"),
    ({"shared_blocks": 1.5}, "shared_blocks must be None or an int"),
    ({"kd_target": "hidden"}, "kd_target must be 'features' or 'logits', got 'hidden'"),
    ({"kd_weight": -1.0}, r"kd_weight must be in \[0.0, inf\], got -1.0"),
    ({"temperature": 0.0}, r"temperature must be in \(0.0, inf\], got 0.0"),
    ({"orth_weight": -0.1}, r"orth_weight must be in \[0.0, inf\], got -0.1"),
    ({"block_pattern": "blocks"}, "block_pattern must capture the block index"),
    ({"block_pattern": "("}, "block_pattern must be a valid regex"),
])
def test_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        CLLoRAConfig(**options)


@pytest.mark.parametrize(("options", "match"), [
    ({"shared_blocks": 3}, r"shared_blocks must be in \[0, 2\] for this model \(2 blocks\), got 3"),
    ({"block_pattern": r"layer\.(\d+)\."}, "cannot find the block index of target layer 'blocks.0.attn.q'"),
    ({"rank": 17}, "rank must be <= the input width 16"),
])
def test_bad_config_for_the_model(options, match):
    with pytest.raises(ValueError, match=match):
        make_learner("cllora", tiny(), **options)


def test_one_block_model():
    default = make_learner("cllora", tiny(depth=1))
    assert default.shared_targets == [] and len(default.specific_targets) == 2
    shared_only = make_learner("cllora", tiny(depth=1), shared_blocks=1)
    assert shared_only.specific_targets == []
    for learner in (default, shared_only):
        for _ in range(2):
            train_task(learner, steps=1)
    assert shared_only.adapters == [SHARED] and shared_only.block_weights == {}
    assert default.adapters == ["task0", "task1"]
    assert isinstance(default, CLLoRA)


@pytest.mark.parametrize("options", [{}, {"shared_blocks": 1, "kd_target": "logits"}])
def test_runs_inside_avalanche(options, tmp_path, monkeypatch):
    """Default options (depth 1: task-specific adapters only), and a shared adapter with logit KD."""
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run

    penalties = []
    original = CLLoRA.penalty

    def spy(self):
        penalties.append(original(self))
        return penalties[-1]

    monkeypatch.setattr(CLLoRA, "penalty", spy)
    # LoRA learns slowly at the matrix's lr 2e-3 over 30 steps (plain LoRA and O-LoRA stay near chance too)
    train = {"epochs": 3, "batch_size": 16, "eval_batch_size": 128, "lr": 1e-2}
    experiment = tiny_experiment([{"name": "cllora", "options": options}], train=train)
    (plan,) = plan_experiment(load_experiment(experiment))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    assert np.diag(R).max() > 0.25, R.tolist()
    active = [p for p in penalties if p is not None]  # task 1: orthogonality (default) or distillation + KD
    assert active and all(torch.isfinite(p) and p > 0 for p in active)
