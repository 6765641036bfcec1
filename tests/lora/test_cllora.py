"""CL-LoRA (He et al., CVPR 2025): per-task paths, losses against direct computations, gradient reassignment,
block weights as a parametrization, freezing, state."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_experiment

from avalanche_merge.lora import make_learner
from avalanche_merge.lora.adapters import activate, delta_weight
from avalanche_merge.lora.cllora import SHARED, CLLoRA, CLLoRAConfig, reassignment_weights
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.protocol import PerTaskHead, class_means, replace_module

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


TASKS = ([0, 1], [2, 3], [4, 5])


def with_head(depth=2, seed=0, prototypes=True):
    """A tiny ViT whose head is a PerTaskHead (the per_task protocol; prototypes as CL-LoRA evaluates)."""
    model = tiny(depth, seed)
    head = PerTaskHead(16, 4, initial=model.head, prototypes=prototypes)
    replace_module(model, "head", head)
    return model, head


def train_head_task(learner, head, classes, steps=3, lr=0.2):
    """One task as the per_task protocol runs it: add its head, masked CE (+ penalty), then its prototypes."""
    head.add_task(classes)
    params = learner.begin_task(None)
    held = {id(p) for p in params}
    params = params + [p for p in head.heads[-1].parameters() if id(p) not in held]  # train_head=False
    optimizer = torch.optim.SGD(params, lr=lr)
    target = torch.arange(len(X)) % len(classes)
    learner.model.train()
    for _ in range(steps):
        loss = F.cross_entropy(learner.model(X)[:, classes], target)
        penalty = learner.penalty()
        loss = loss if penalty is None else loss + penalty
        optimizer.zero_grad()
        loss.backward()
        learner.after_backward()
        optimizer.step()
    learner.end_task(None)
    learner.model.eval()
    if head.use_prototypes:  # as HeadProtocolPlugin: class means of the features, recorded in eval mode
        with torch.no_grad(), head.recording() as features:
            learner.model(X)
        head.set_prototypes(classes, class_means(torch.cat(features), torch.tensor(classes)[target], classes))


def shared_bs(learner):
    return {t: learner.layers()[t].lora_B[SHARED].weight.detach().clone() for t in learner.shared_targets}


def raw_b(layer, name):
    """Task-specific ``B`` before its block-weight parametrization."""
    return layer.lora_B[name].parametrizations.weight.original


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
    learner = make_learner("cllora", tiny(), kd_target="features", orth_weight=0.0, kd_weight=2.0)
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


@pytest.mark.parametrize(("kd_weight", "temperature"), [(5.0, 2.0), (2.0, 3.0)])
def test_logit_kd_equals_hand_formula(kd_weight, temperature):
    """Default KD: soft-target CE of the full model's logits against the model with the old shared B, * weight."""
    model, head = with_head()
    options = {} if kd_weight == 5.0 else {"kd_weight": kd_weight, "temperature": temperature}
    learner = make_learner("cllora", model, orth_weight=0.0, **options)
    assert learner.config.kd_target == "logits" and (learner.config.kd_weight, learner.config.temperature) == (
        kd_weight, temperature)  # (5, 2): the defaults
    train_head_task(learner, head, TASKS[0])
    head.add_task(TASKS[1])
    learner.begin_task(None)
    assert learner.penalty() is None  # nothing captured yet
    perturb_shared(learner)
    layers = learner.layers()
    with torch.no_grad():
        for t in learner.specific_targets:  # the current adapter, active in student and teacher alike
            raw_b(layers[t], "task1").normal_()
    model.train()
    with torch.no_grad():  # the teacher by hand: the same model with the shared B of the end of task 0
        current = shared_bs(learner)
        for t in learner.shared_targets:
            layers[t].lora_B[SHARED].weight.copy_(learner.old_shared[t])
        teacher = model(X)
        for t in learner.shared_targets:
            layers[t].lora_B[SHARED].weight.copy_(current[t])
    student = model(X)
    assert not torch.allclose(student, teacher)
    expected = -(torch.softmax(teacher / temperature, 1) * torch.log_softmax(student / temperature, 1)).sum(1).mean()
    torch.testing.assert_close(learner.penalty(), kd_weight * expected)


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


@pytest.mark.parametrize("inference", ["paths", "sum"])
def test_save_load_round_trip(inference, tmp_path):
    def build():
        model, head = with_head()
        # train_head=False: the PerTaskHead travels with its own state_dict (see the report on save)
        return make_learner("cllora", model, inference=inference, train_head=False), head

    learner, head = build()
    for classes in TASKS:
        train_head_task(learner, head, classes)
    learner.save(tmp_path / "cl.safetensors")
    learner.model.eval()
    with torch.no_grad():
        expected = learner.model(X)
    other, other_head = build()
    other_head.load_state_dict(head.state_dict())
    other.load(tmp_path / "cl.safetensors")
    other.model.eval()
    assert other.task == 2 and other.adapters == learner.adapters
    with torch.no_grad():
        torch.testing.assert_close(other.model(X), expected, atol=0, rtol=0)
    mine, theirs = learner.model.state_dict(), other.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) if isinstance(v, torch.Tensor) else v == theirs[k] for k, v in mine.items())
    mine, theirs = learner.extra_state(), other.extra_state()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "cl.safetensors"))  # the raw B, not beta * B
    layer = learner.layers()["blocks.1.attn.q"]
    assert torch.equal(saved["task0::blocks.1.attn.q.lora_B"], raw_b(layer, "task0"))
    assert [n for n, b in other.block_weights.items() if b.requires_grad] == ["task2"]
    assert all(m.beta is other.block_weights[n] for n, ms in other._blocks.items() for m in ms.values())
    other_head.add_task([6, 7])
    other.begin_task(None)  # continues with task 3
    assert [n for n, b in other.block_weights.items() if b.requires_grad] == ["task3"]
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
    ({"kd_target": "hidden"}, r"kd_target must be one of \['logits', 'features'\], got 'hidden'"),
    ({"inference": "x"}, r"inference must be one of \['auto', 'paths', 'sum'\], got 'x'"),
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


# -- per-task paths (official inference) ----------------------------------------------------------------------
def test_defaults_are_the_official_code():
    cfg = CLLoRAConfig()
    assert (cfg.inference, cfg.kd_target, cfg.kd_weight, cfg.temperature, cfg.orth_weight, cfg.rank) == (
        "auto", "logits", 5.0, 2.0, 1e-4, 8)
    assert tuple(cfg.target_modules) == ("q", "v")


@pytest.mark.parametrize(("per_task_head", "expected"), [(True, "paths"), (False, "sum")])
def test_auto_inference_takes_paths_with_a_per_task_head_and_sums_without(per_task_head, expected):
    """On a domain-incremental stream (no per-task head) no path can be chosen for a sample: the adapters sum."""
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=2, heads=2, num_classes=4))
    if per_task_head:
        head = PerTaskHead(16, 4, initial=model.head)
        replace_module(model, "head", head)
        head.add_task([0, 1])
    learner = make_learner("cllora", model, rank=2)
    learner.begin_task()
    assert learner.inference == expected
    if per_task_head:
        model.head.add_task([2, 3])
    learner.end_task()
    learner.begin_task()
    active = set(learner.active_adapters())
    assert ("task0" in active) == (expected == "sum") and "task1" in active


@pytest.mark.parametrize("inference", ["paths", "sum"])
def test_later_adapters_leave_path_0_unchanged(inference):
    """Path 0 (task 0's classes) is exactly the model of task 0's end once the shared adapter is held fixed."""
    model, head = with_head(prototypes=False)  # linear heads: head 0 alone makes task 0's columns (bit-exact)
    learner = make_learner("cllora", model, inference=inference)
    train_head_task(learner, head, TASKS[0])
    shared = shared_bs(learner)
    with torch.no_grad():
        before = model(X)[:, TASKS[0]]
    for classes in TASKS[1:]:
        train_head_task(learner, head, classes)
    layers = learner.layers()
    assert all(raw_b(layers[t], f"task{i}").abs().sum() > 0 for t in learner.specific_targets for i in (1, 2))
    with torch.no_grad():
        for t in learner.shared_targets:
            layers[t].lora_B[SHARED].weight.copy_(shared[t])
        after = model(X)[:, TASKS[0]]
    if inference == "paths":
        assert torch.equal(after, before)
    else:  # every task-specific adapter in every forward
        assert not torch.allclose(after, before, atol=1e-4, rtol=0)


def test_eval_logits_are_assembled_from_single_paths():
    model, head = with_head()
    learner = make_learner("cllora", model)
    for classes in TASKS:
        train_head_task(learner, head, classes)
    model.eval()
    layers = learner.layers()
    active = {n: list(layer.active_adapters) for n, layer in layers.items()}
    assert {tuple(a) for a in active.values()} == {(SHARED,), ("task2",)}  # default: shared + newest
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    expected = torch.full((len(X), head.out_features), float("nan"))
    paths = []
    for i, classes in enumerate(TASKS):  # by hand: path i alone (shared + task i); recording passes it through
        activate(model, [SHARED, f"task{i}"])
        with torch.no_grad(), head.recording():
            paths.append(model(X))
        expected[:, classes] = paths[-1][:, classes]
    learner._activate()
    with torch.no_grad():
        got = model(X)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(paths[2][:, TASKS[0]], paths[0][:, TASKS[0]], atol=1e-4, rtol=0)  # paths differ
    assert {n: list(layer.active_adapters) for n, layer in layers.items()} == active  # state restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    model.train()  # training: one forward, no assembly (the newest path's linear heads)
    with torch.no_grad():
        train_out = model(X)
    activate(model, [SHARED, "task0"])
    with torch.no_grad():
        assert not torch.equal(model(X)[:, TASKS[0]], train_out[:, TASKS[0]])


def test_paths_need_a_per_task_head_with_one_task_per_adapter():
    learner = make_learner("cllora", tiny(), inference="paths")
    for _ in range(2):
        train_task(learner, steps=1)
    learner.model.train()
    learner.model(X)  # training: the current path, any head
    learner.model.eval()
    with pytest.raises(RuntimeError, match=r"needs the per_task head protocol \(avalanche_merge.protocol.PerTaskHead"):
        learner.model(X)
    summed = make_learner("cllora", tiny(), inference="sum")
    for _ in range(2):
        train_task(summed, steps=1)
    summed.model.eval()
    summed.model(X)
    model, head = with_head()
    learner = make_learner("cllora", model)
    train_head_task(learner, head, TASKS[0], steps=1)
    learner.begin_task(None)  # a second adapter without its head task
    model.eval()
    with pytest.raises(RuntimeError, match="one PerTaskHead task per task-specific adapter"):
        model(X)


@pytest.mark.parametrize("inference", ["paths", "sum"])
def test_training_forward_uses_only_the_current_specific_adapter(inference):
    model, head = with_head()
    learner = make_learner("cllora", model, inference=inference)
    for classes in TASKS[:2]:
        train_head_task(learner, head, classes, steps=1)
    head.add_task(TASKS[2])
    learner.begin_task(None)
    model.train()
    layers = learner.layers()
    with torch.no_grad():
        for t in learner.specific_targets:
            raw_b(layers[t], "task2").normal_()
    before = model(X)
    with torch.no_grad():  # large changes to the old task-specific adapters
        for t in learner.specific_targets:
            for name in ("task0", "task1"):
                raw_b(layers[t], name).add_(torch.randn_like(raw_b(layers[t], name)))
    after = model(X)
    if inference == "sum":
        assert not torch.allclose(after, before, atol=1e-4, rtol=0)
        return
    assert torch.equal(after, before)
    assert all(list(layers[t].active_adapters) == ["task2"] for t in learner.specific_targets)
    assert all(list(layers[t].active_adapters) == [SHARED] for t in learner.shared_targets)
    model.zero_grad(set_to_none=True)
    after.sum().backward()
    for t in learner.specific_targets:
        assert raw_b(layers[t], "task2").grad.abs().sum() > 0
        assert all(raw_b(layers[t], n).grad is None for n in ("task0", "task1"))
    with torch.no_grad():  # and the current one does count
        for t in learner.specific_targets:
            raw_b(layers[t], "task2").zero_()
        assert not torch.allclose(model(X), before, atol=1e-4, rtol=0)


def test_teacher_is_refreshed_every_task():
    model, head = with_head()
    learner = make_learner("cllora", model)
    train_head_task(learner, head, TASKS[0])
    end0 = shared_bs(learner)
    train_head_task(learner, head, TASKS[1])
    end1 = shared_bs(learner)
    assert all(torch.equal(learner.old_shared[t], end0[t]) for t in learner.shared_targets)  # task 1's teacher
    head.add_task(TASKS[2])
    learner.begin_task(None)
    for t in learner.shared_targets:
        assert not torch.equal(end1[t], end0[t])
        assert torch.equal(learner.old_shared[t], end1[t])  # the end of task 1, not of task 0
    perturb_shared(learner)
    assert all(torch.equal(learner.old_shared[t], end1[t]) for t in learner.shared_targets)  # a copy


# -- block weights as a parametrization ----------------------------------------------------------------------
def test_delta_weight_and_merge_include_the_block_weight():
    learner = make_learner("cllora", tiny(), rank=4, alpha=6.0)  # s = 1.5
    learner.begin_task(None)
    model = learner.model.to(torch.float64)
    beta = learner.block_weights["task0"]
    assert beta.dtype == torch.float64
    assert all(m.beta is beta for m in learner._blocks["task0"].values())
    assert sum(p is beta for p in model.parameters()) == 1
    assert sum(p is beta for p in learner.trainable_parameters()) == 1
    assert any(k.endswith("lora_B.task0.parametrizations.weight.0.beta") for k in model.state_dict())
    layers = learner.layers()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        beta.copy_(torch.rand(len(beta), generator=g, dtype=torch.float64) + 0.5)
        for t in learner.specific_targets:
            layers[t].lora_A["task0"].weight.copy_(torch.randn(4, 16, generator=g, dtype=torch.float64))
            raw_b(layers[t], "task0").copy_(torch.randn(16, 4, generator=g, dtype=torch.float64))
    for j, t in enumerate(learner.specific_targets):
        layer = layers[t]
        hand = beta[j].item() * 1.5 * raw_b(layer, "task0").detach() @ layer.lora_A["task0"].weight.detach()
        torch.testing.assert_close(delta_weight(layer, "task0"), hand, atol=1e-12, rtol=0)
        w0 = layer.base_layer.weight.detach().clone()
        x = torch.randn(3, 16, generator=g, dtype=torch.float64)
        with torch.no_grad():
            unmerged = layer(x)
            layer.merge(adapter_names=["task0"])
            torch.testing.assert_close(layer.base_layer.weight - w0, hand, atol=1e-12, rtol=0)
            activate(model, [SHARED])
            torch.testing.assert_close(layer(x), unmerged, atol=1e-12, rtol=0)
            layer.unmerge()
            learner._activate()


def test_block_weights_follow_model_conversions():
    learner = make_learner("cllora", tiny())
    learner.begin_task(None)
    learner.model.double()
    assert learner.block_weights["task0"].dtype == torch.float64
    learner.model.float()
    params = learner.begin_task(None)
    betas = learner.block_weights
    assert betas["task1"].dtype == torch.float32 and betas["task1"].requires_grad
    assert not betas["task0"].requires_grad
    assert len({id(p) for p in params}) == len(params) and any(p is betas["task1"] for p in params)
