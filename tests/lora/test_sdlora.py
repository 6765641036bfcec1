"""SD-LoRA (Wu et al., ICLR 2025): normalised frozen directions, learnable magnitudes, a new LoRA per task."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_experiment

from avalanche_merge.lora import delta_weight, list_learners, make_learner
from avalanche_merge.lora.fold import folding
from avalanche_merge.lora.sdlora import SDLoRA, SDLoRAConfig, raw_weights
from avalanche_merge.models.vit import TinyViT, TinyViTConfig

TARGETS = ("q", "v", "fc1")
S = 2.0  # peft scaling alpha / rank of make()
LEGACY = {"magnitudes": "layer", "norm": "product", "reset_magnitudes": False}  # the learner before the options
COMBOS = [{"magnitudes": m, "norm": n, "reset_magnitudes": r}
          for m in ("component", "layer") for n in ("factors", "product") for r in (True, False)]
PAIRWISE = [{"magnitudes": m, "norm": n, "reset_magnitudes": r}  # every pair of option values, in 4 runs
            for m, n, r in (("component", "factors", True), ("component", "product", False),
                            ("layer", "factors", False), ("layer", "product", True))]


def combo_id(options):
    return "-".join(str(v) for v in options.values())


def make(seed=0, **options):
    torch.manual_seed(seed)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))
    config = SDLoRAConfig(rank=2, alpha=4.0, target_modules=TARGETS, **options)  # peft scaling 2
    return SDLoRA(model, config=config)


def data(task, n=8):
    g = torch.Generator().manual_seed(100 + task)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(learner, task, steps=3, *, finish=True):
    x, y = data(task)
    params = learner.begin_task(None)
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(learner.model(x), y)
        penalty = learner.penalty()
        (loss + (penalty if penalty is not None else 0)).backward()
        learner.after_backward()
        optimizer.step()
    if finish:
        learner.end_task(None)
    return params


def probe(dtype=torch.float32):
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(7)).to(dtype)


def output(learner, dtype=torch.float32):
    """The model's output through peft's own per-adapter path: bitwise comparisons across save/load and task
    switches must not see the rounding of the folded frozen adapters (tests/lora/test_fold.py checks those)."""
    with torch.no_grad(), folding(False):
        return learner.model(probe(dtype))


def hand_norm(layer, name, norm):
    """The normaliser by hand, float64: ||s B||_F ||A||_F ("factors") or ||s B A||_F ("product")."""
    a, b = (w.detach().double() for w in raw_weights(layer, name))
    s = float(layer.scaling[name])
    if norm == "factors":
        return float(torch.linalg.matrix_norm(s * b) * torch.linalg.matrix_norm(a))
    return float(torch.linalg.matrix_norm(s * b @ a))


def expected_delta(learner, layer_name):
    """sum_i alpha_i s B_i A_i / norm_i over normalised components + alpha_t s B_t A_t, float64, raw weights."""
    layer = learner.layers()[layer_name]
    total = torch.zeros_like(layer.base_layer.weight, dtype=torch.float64)
    for i, name in enumerate(learner.adapters):
        a, b = (w.detach().double() for w in raw_weights(layer, name))
        alpha = learner.magnitudes()[name][layer_name]
        update = alpha * layer.scaling[name] * (b @ a)
        total += update / hand_norm(layer, name, learner.config.norm) if i < learner.normalised else update
    return total


def randomise(learner, name, seed):
    """Dense, non-axis-aligned random raw A and B for adapter ``name`` in every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in learner.layers().values():
            for w in raw_weights(layer, name):
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)


def set_magnitudes(learner, name, values):
    """Set adapter ``name``'s magnitude(s): the shared one to values[0], or layer k's to values[k]."""
    with torch.no_grad():
        if learner.shared:
            learner._shared[name].fill_(values[0])
        else:
            for k, module in enumerate(learner._magnitudes[name].values()):
                module.magnitude.fill_(values[k])


def test_registered_and_config_validated():
    assert "sdlora" in list_learners()
    torch.manual_seed(0)
    learner = make_learner("sdlora", TinyViT(TinyViTConfig(dim=16, depth=1, heads=2)), magnitude_init=0.5)
    assert isinstance(learner, SDLoRA) and learner.config.magnitude_init == 0.5 and learner.per_task
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="magnitude_init"):
            SDLoRAConfig(magnitude_init=bad)
    with pytest.raises(ValueError, match="rank"):
        SDLoRAConfig(rank=0)


def test_defaults_are_the_reference_codes():
    config = SDLoRAConfig()
    assert config.rank == 10 and config.target_modules == ("q", "v") and config.magnitude_init == 0.8
    assert config.magnitudes == "component" and config.norm == "factors" and config.reset_magnitudes is True
    assert config.scaling == 1.0  # alpha defaults to rank: no peft scaling, as the reference
    torch.manual_seed(0)
    learner = make_learner("sdlora", TinyViT(TinyViTConfig(dim=16, depth=2, heads=2)))
    assert sorted(t.rsplit(".", 1)[-1] for t in learner.targets) == ["q", "q", "v", "v"]
    learner.begin_task(None)
    assert {layer.lora_A["task0"].weight.shape[0] for layer in learner.layers().values()} == {10}


@pytest.mark.parametrize(("field", "bad", "pattern"), [
    ("magnitudes", "block", r"magnitudes must be one of \['component', 'layer'\], got 'block'"),
    ("norm", "spectral", r"norm must be one of \['factors', 'product'\], got 'spectral'"),
    ("reset_magnitudes", "yes", r"reset_magnitudes must be one of \[True, False\], got 'yes'"),
    ("reset_magnitudes", 1, r"reset_magnitudes must be one of \[True, False\], got 1"),
])
def test_bad_options_raise(field, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        SDLoRAConfig(**{field: bad})
    with pytest.raises(ValueError, match=pattern):
        make_learner("sdlora", TinyViT(TinyViTConfig(dim=16, depth=1, heads=2)), **{field: bad})


@pytest.mark.parametrize("magnitudes", ["component", "layer"])
@pytest.mark.parametrize("norm", ["factors", "product"])
def test_frozen_delta_equals_the_hand_formula(magnitudes, norm):
    """Frozen: alpha s B A / (||s B|| ||A||) or / ||s B A||; current: alpha s B A, against float64 by hand."""
    learner = make(magnitudes=magnitudes, norm=norm)
    learner.begin_task(None)
    randomise(learner, "task0", seed=1)
    set_magnitudes(learner, "task0", [1.7, 1.1, 0.6])
    learner.end_task(None)
    raw0 = {n: [w.detach().double().clone() for w in raw_weights(layer, "task0")]
            for n, layer in learner.layers().items()}
    learner.begin_task(None)
    randomise(learner, "task1", seed=2)
    set_magnitudes(learner, "task0", [1.3, 0.4, 2.1])
    set_magnitudes(learner, "task1", [0.9, 1.6, 0.7])
    g = torch.Generator().manual_seed(3)
    for k, (layer_name, layer) in enumerate(learner.layers().items()):
        a, b = raw0[layer_name]
        alpha0 = 1.3 if magnitudes == "component" else [1.3, 0.4, 2.1][k]
        if norm == "factors":  # by hand: s cancels, the reference's alpha B A / (||B|| ||A||)
            expected0 = alpha0 * (b @ a) / (torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a))
            other = alpha0 * (b @ a) / torch.linalg.matrix_norm(b @ a)
        else:
            expected0 = alpha0 * (b @ a) / torch.linalg.matrix_norm(b @ a)
            other = alpha0 * (b @ a) / (torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a))
        assert (expected0 - other).abs().max() > 1e-2 * expected0.abs().max()  # the two norms differ here
        got0 = delta_weight(layer, "task0").detach().double()
        torch.testing.assert_close(got0, expected0, rtol=1e-5, atol=1e-7)
        a1, b1 = (w.detach().double() for w in raw_weights(layer, "task1"))
        alpha1 = 0.9 if magnitudes == "component" else [0.9, 1.6, 0.7][k]
        expected1 = alpha1 * S * (b1 @ a1)  # the current component is not normalised
        torch.testing.assert_close(delta_weight(layer, "task1").detach().double(), expected1, rtol=1e-5, atol=1e-7)
        x_in = torch.randn(5, layer.base_layer.in_features, generator=g)
        with torch.no_grad():
            got = (layer(x_in) - layer.base_layer(x_in)).double()
        torch.testing.assert_close(got, x_in.double() @ (expected0 + expected1).T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", PAIRWISE, ids=combo_id)
def test_current_component_is_unnormalised_while_it_trains(options):
    learner = make(**options)
    train(learner, 0, steps=1)
    train(learner, 1, steps=2, finish=False)
    assert learner.normalised == learner.frozen == 1
    for layer_name, layer in learner.layers().items():
        a, b = (w.detach().double() for w in raw_weights(layer, "task1"))
        alpha = learner.magnitudes()["task1"][layer_name]
        assert alpha != torch.tensor(0.8).item()  # trained (the first step moves only B: B starts at 0)
        torch.testing.assert_close(delta_weight(layer, "task1").detach().double(), alpha * S * (b @ a),
                                   rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(sum(delta_weight(layer, n) for n in learner.adapters).detach().double(),
                                   expected_delta(learner, layer_name), rtol=1e-5, atol=1e-7)


def test_component_magnitude_is_one_shared_parameter_whose_gradient_sums_the_layers():
    learner = make()  # magnitudes="component"
    train(learner, 0, steps=1)
    params = learner.begin_task(None)
    randomise(learner, "task1", seed=4)
    layers = learner.layers()
    assert len(layers) == 3
    for name in ("task0", "task1"):
        (shared,) = {id(m.magnitude) for m in learner._magnitudes[name].values()}
        assert shared == id(learner._shared[name])
        assert sum(p is learner._shared[name] for p in learner.model.parameters()) == 1  # listed once
        assert sum(p is learner._shared[name] for p in params) == 1
    assert len(learner.magnitude_parameters()) == 2
    assert len(params) == len(layers) * 2 + 2 + 2  # A1, B1 per layer; two magnitudes; head weight and bias
    keys = [k for k in learner.model.state_dict() if k.endswith(".magnitude")]
    assert len(keys) == 2 * len(layers)  # the state_dict names it under every layer (same tensor)

    learner.model.double()  # .to() converts the one shared parameter in place: still shared
    for name in ("task0", "task1"):
        assert all(m.magnitude is learner._shared[name] for m in learner._magnitudes[name].values())
        assert learner._shared[name].dtype == torch.float64
    x = probe(torch.float64)
    weights = torch.randn(8, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def loss():
        with torch.no_grad():
            return float((learner.model(x) * weights).sum())

    learner.model.zero_grad()
    (learner.model(x) * weights).sum().backward()
    eps = 1e-6
    for name in ("task0", "task1"):
        alpha = learner._shared[name]
        grad = float(alpha.grad)
        contributions = []  # layer l's part: d loss / d alpha through layer l only (scale that layer's inv_norm)
        for module in learner._magnitudes[name].values():
            inv = module.inv_norm.clone()
            with torch.no_grad():
                module.inv_norm.copy_(inv * (1 + eps))
                up = loss()
                module.inv_norm.copy_(inv * (1 - eps))
                down = loss()
                module.inv_norm.copy_(inv)
            contributions.append((up - down) / (2 * eps * alpha.item()))
        assert math.isclose(grad, sum(contributions), rel_tol=1e-6, abs_tol=1e-9)
        assert all(abs(c) > 1e-4 for c in contributions)
        assert all(abs(c - grad) > 1e-4 for c in contributions)  # no single layer carries the whole gradient
        with torch.no_grad():
            alpha += eps
            up = loss()
            alpha -= 2 * eps
            down = loss()
            alpha += eps
        assert math.isclose(grad, (up - down) / (2 * eps), rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("magnitudes", ["component", "layer"])
def test_reset_puts_every_magnitude_back_to_init_and_keeps_old_directions(magnitudes):
    learner = make(magnitudes=magnitudes, magnitude_init=0.6)
    train(learner, 0, steps=2)
    raw0 = {n: [w.detach().clone() for w in raw_weights(layer, "task0")] for n, layer in learner.layers().items()}
    train(learner, 1, steps=2)
    raw1 = {n: [w.detach().clone() for w in raw_weights(layer, "task1")] for n, layer in learner.layers().items()}
    trained = learner.magnitudes()
    assert all(abs(v - 0.6) > 1e-6 for layers in trained.values() for v in layers.values())  # all trained
    learner.begin_task(None)
    init = torch.tensor(0.6).item()  # 0.6 in float32, exactly
    assert all(v == init for layers in learner.magnitudes().values() for v in layers.values())
    assert set(learner.magnitudes()) == {"task0", "task1", "task2"}
    for layer_name, layer in learner.layers().items():
        for name, raw in (("task0", raw0), ("task1", raw1)):
            a, b = raw_weights(layer, name)
            assert torch.equal(a, raw[layer_name][0]) and torch.equal(b, raw[layer_name][1])
            assert not a.requires_grad and not b.requires_grad


@pytest.mark.parametrize("options", COMBOS, ids=combo_id)
def test_end_task_keeps_the_trained_function(options):
    learner = make(**options)
    train(learner, 0, steps=1)
    train(learner, 1, steps=1, finish=False)
    before = output(learner)
    trained = learner.magnitudes()
    learner.end_task(None)
    after = output(learner)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    learner.begin_task(None)  # the switch: normalisation in effect (component), reset (reset_magnitudes)
    assert learner.normalised == learner.frozen == 2
    switched = output(learner)
    if options["magnitudes"] == "layer" and not options["reset_magnitudes"]:
        torch.testing.assert_close(switched, after, rtol=0, atol=1e-6)  # carry-over: nothing jumps
    else:
        assert (switched - after).abs().max() > 1e-4  # the reference's rebuild changes the function
    if not options["reset_magnitudes"] and options["magnitudes"] == "component":
        assert {k: v for k, v in learner.magnitudes().items() if k != "task2"} == trained  # carried, not reset
    for layer_name in learner.layers():
        torch.testing.assert_close(sum(delta_weight(learner.layers()[layer_name], n) for n in learner.adapters)
                                   .detach().double(), expected_delta(learner, layer_name), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", PAIRWISE, ids=combo_id)
def test_norm_is_recorded_once_at_the_end_of_its_own_task(options):
    learner = make(**options)
    train(learner, 0, steps=1, finish=False)
    norms = {n: hand_norm(layer, "task0", options["norm"]) for n, layer in learner.layers().items()}
    learner.end_task(None)
    modules = learner._magnitudes["task0"]
    for layer_name, module in modules.items():
        assert float(module.norm) == pytest.approx(norms[layer_name], rel=1e-6)
        in_effect = options["magnitudes"] == "layer"  # else from the next begin_task on
        assert float(module.inv_norm) == (pytest.approx(1 / norms[layer_name], rel=1e-6) if in_effect else 1.0)
    learner.begin_task(None)
    state = {n: (m.norm.clone(), m.inv_norm.clone()) for n, m in modules.items()}
    for layer_name, (norm, inv_norm) in state.items():
        assert float(norm) == pytest.approx(norms[layer_name], rel=1e-6)
        assert float(inv_norm) == pytest.approx(1 / norms[layer_name], rel=1e-6)
    learner.end_task(None)
    train(learner, 2, steps=1)  # later tasks train the old magnitudes, never renormalise the old directions
    learner.begin_task(None)
    for layer_name, module in modules.items():
        assert torch.equal(module.norm, state[layer_name][0]) and torch.equal(module.inv_norm, state[layer_name][1])
        assert hand_norm(learner.layers()[layer_name], "task0", options["norm"]) == norms[layer_name]


@pytest.mark.parametrize("options", COMBOS, ids=combo_id)
def test_save_load_round_trip_every_option(tmp_path, options):
    learner = make(**options)
    train(learner, 0, steps=1)
    train(learner, 1, steps=1)
    learner.save(tmp_path / "done.safetensors")  # between end_task and begin_task: normalisation maybe pending
    done = output(learner)
    train(learner, 2, steps=1, finish=False)
    learner.save(tmp_path / "mid.safetensors")
    mid = output(learner)

    for path, out in (("done", done), ("mid", mid)):
        fresh = make(**options)
        fresh.load(tmp_path / f"{path}.safetensors")
        assert torch.equal(output(fresh), out)
        if options["magnitudes"] == "component":
            assert set(fresh._shared) == set(fresh.adapters)
            for name in fresh.adapters:
                assert all(m.magnitude is fresh._shared[name] for m in fresh._magnitudes[name].values())
            assert len(fresh.magnitude_parameters()) == len(fresh.adapters)
        assert (fresh.frozen, fresh.normalised) == ((2, 2 if options["magnitudes"] == "layer" else 1) if path == "done"
                                                     else (2, 2))
    fresh = make(**options)
    fresh.load(tmp_path / "done.safetensors")
    fresh.load(tmp_path / "done.safetensors")  # into a learner that already has the adapters and magnitudes
    params = fresh.begin_task(None)  # the recorded norms take effect (and the reset) as on the original
    again = make(**options)
    again.load(tmp_path / "done.safetensors")
    again.begin_task(None)
    assert torch.equal(output(fresh), output(again))
    assert fresh.magnitudes() == again.magnitudes()
    n_magnitudes = 3 if options["magnitudes"] == "component" else 3 * len(fresh.layers())
    assert len(params) == len(fresh.layers()) * 2 + n_magnitudes + 2
    learner_keys = set(learner.extra_state())
    if options["magnitudes"] == "component":  # a shared magnitude is saved once per component
        assert {k for k in learner_keys if k.endswith("magnitude")} == {"task0.magnitude", "task1.magnitude",
                                                                        "task2.magnitude"}


# -- the learner before the options (per-layer magnitudes, ||s B A|| norm, carry-over) ------------------------
def test_trainable_parameters_are_magnitudes_new_adapter_and_head():
    learner = make(**LEGACY)
    train(learner, 0)
    params = {id(p) for p in learner.begin_task(None)}
    layers = learner.layers()
    for layer_name, layer in layers.items():
        a0, b0 = raw_weights(layer, "task0")
        a1, b1 = raw_weights(layer, "task1")
        assert id(a0) not in params and id(b0) not in params
        assert id(a1) in params and id(b1) in params
        assert id(layer.base_layer.weight) not in params
        for name in ("task0", "task1"):
            assert id(learner._magnitudes[name][layer_name].magnitude) in params
    assert {id(p) for p in learner.model.head.parameters()} <= params
    n_expected = len(layers) * 4 + 2  # per layer: A1, B1 and two magnitudes; head weight and bias
    assert len(params) == n_expected


def test_effective_delta_is_sum_of_magnitudes_times_normalised_directions():
    learner = make(**LEGACY)
    train(learner, 0)
    train(learner, 1)
    train(learner, 2, finish=False)  # the current component is trained, not yet normalised
    assert learner.frozen == learner.normalised == 2
    g = torch.Generator().manual_seed(3)
    for layer_name, layer in learner.layers().items():
        x_in = torch.randn(5, layer.base_layer.in_features, generator=g)
        expected = expected_delta(learner, layer_name).float()
        assert expected.abs().max() > 0
        by_adapter = sum(delta_weight(layer, name) for name in learner.adapters)  # peft's view, parametrized B
        torch.testing.assert_close(by_adapter, expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(layer(x_in) - layer.base_layer(x_in), x_in @ expected.T, rtol=1e-4,
                                       atol=1e-5)


def test_normalised_directions_have_unit_norm_and_end_task_keeps_the_function():
    learner = make(**LEGACY)
    train(learner, 0, finish=False)
    before = output(learner)
    learner.end_task(None)
    torch.testing.assert_close(output(learner), before, rtol=1e-5, atol=1e-6)
    train(learner, 1)
    learner.begin_task(None)
    for name in learner.adapters[:-1]:
        for layer_name, layer in learner.layers().items():
            module = learner._magnitudes[name][layer_name]
            direction = (delta_weight(layer, name) / module.magnitude).detach()
            assert math.isclose(float(torch.linalg.matrix_norm(direction)), 1.0, rel_tol=1e-5)
            assert not any(w.requires_grad for w in raw_weights(layer, name))  # frozen
            assert module.magnitude.requires_grad


@pytest.mark.parametrize("options", [LEGACY, {}], ids=["legacy", "default"])
def test_old_directions_bit_identical_and_old_magnitudes_learn(options):
    learner = make(**options)
    train(learner, 0)
    raw0 = {n: [w.detach().clone() for w in raw_weights(layer, "task0")] for n, layer in learner.layers().items()}
    train(learner, 1, finish=False)
    mag0 = learner.magnitudes()["task0"]  # task 1 trained the old magnitude too
    learner.end_task(None)
    mag1 = learner.magnitudes()["task1"]
    learner.begin_task(None)
    start0, start1 = learner.magnitudes()["task0"], learner.magnitudes()["task1"]
    learner.end_task(None)
    train(learner, 3)
    for layer_name, layer in learner.layers().items():
        a, b = raw_weights(layer, "task0")
        assert torch.equal(a, raw0[layer_name][0]) and torch.equal(b, raw0[layer_name][1])
    if options:  # carried over
        assert start0 == mag0 and start1 == mag1
    else:  # reset
        assert set(start0.values()) == set(start1.values()) == {torch.tensor(0.8).item()}
    changed0 = [abs(learner.magnitudes()["task0"][n] - start0[n]) for n in mag0]
    changed1 = [abs(learner.magnitudes()["task1"][n] - start1[n]) for n in mag1]
    assert max(changed0) > 1e-6 and max(changed1) > 1e-6


def test_save_load_round_trip(tmp_path):
    learner = make(**LEGACY)
    train(learner, 0)
    train(learner, 1)
    params = [id(p) for p in learner.trainable_parameters()]
    learner.save(tmp_path / "done.safetensors")
    assert [id(p) for p in learner.trainable_parameters()] == params  # same objects: an optimizer keeps working
    train(learner, 2, finish=False)
    learner.save(tmp_path / "mid.safetensors")  # mid-task: the current component is still raw and trainable
    out = output(learner)

    fresh = make(**LEGACY)  # same seed: the same base weights
    fresh.load(tmp_path / "mid.safetensors")
    assert fresh.frozen == 2 and fresh.adapters == learner.adapters and fresh.task == 2
    assert fresh.magnitudes() == learner.magnitudes()
    assert torch.equal(output(fresh), out)
    assert len(fresh.trainable_parameters()) == len(learner.trainable_parameters())
    fresh.end_task(None)  # finishing the loaded task works as on the original
    learner.end_task(None)
    assert torch.equal(output(fresh), output(learner))

    again = make(**LEGACY)
    again.load(tmp_path / "done.safetensors")
    assert again.frozen == 2 and again.trainable_adapters() == []
    again.load(tmp_path / "done.safetensors")  # loading into a learner that already has the adapters
    assert again.frozen == 2

    for other in (make(**LEGACY, magnitude_init=0.5), make()):
        with pytest.raises(ValueError, match="config"):
            other.load(tmp_path / "done.safetensors")


def test_deterministic_under_a_seed():
    runs = []
    for _ in range(2):
        learner = make(seed=3)
        train(learner, 0)
        train(learner, 1)
        runs.append((output(learner), learner.magnitudes()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_runs_inside_the_avalanche_plugin(tmp_path):
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run

    (plan,) = plan_experiment(load_experiment(tiny_experiment(["sdlora"])))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    assert np.diag(R).max() > 0.25, R.tolist()
