"""SD-LoRA (Wu et al., ICLR 2025): normalised frozen directions, learnable magnitudes, a new LoRA per task."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_experiment

from avalanche_merge.lora import delta_weight, list_learners, make_learner
from avalanche_merge.lora.sdlora import SDLoRA, SDLoRAConfig, raw_weights
from avalanche_merge.models.vit import TinyViT, TinyViTConfig

TARGETS = ("q", "v", "fc1")


def make(seed=0, **options):
    torch.manual_seed(seed)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))
    config = SDLoRAConfig(rank=2, alpha=4.0, target_modules=TARGETS, **options)  # peft scaling 2
    return SDLoRA(model, config=config)


def data(task, n=16):
    g = torch.Generator().manual_seed(100 + task)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g)


def train(learner, task, steps=5, *, finish=True):
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


def probe():
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def expected_delta(learner, layer_name):
    """sum_i alpha_i B_i A_i / ||B_i A_i||_F over frozen components + alpha_t s B_t A_t, from the raw weights."""
    layer = learner.layers()[layer_name]
    total = torch.zeros_like(layer.base_layer.weight)
    for i, name in enumerate(learner.adapters):
        a, b = raw_weights(layer, name)
        alpha = learner.magnitudes()[name][layer_name]
        if i < learner.frozen:
            total += alpha * (b @ a) / torch.linalg.matrix_norm(b @ a)
        else:
            total += alpha * layer.scaling[name] * (b @ a)
    return total


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


def test_trainable_parameters_are_magnitudes_new_adapter_and_head():
    learner = make()
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
    learner = make()
    train(learner, 0)
    train(learner, 1)
    train(learner, 2, finish=False)  # the current component is trained, not yet normalised
    assert learner.frozen == 2
    g = torch.Generator().manual_seed(3)
    for layer_name, layer in learner.layers().items():
        x_in = torch.randn(5, layer.base_layer.in_features, generator=g)
        expected = expected_delta(learner, layer_name)
        assert expected.abs().max() > 0
        by_adapter = sum(delta_weight(layer, name) for name in learner.adapters)  # peft's view, parametrized B
        torch.testing.assert_close(by_adapter, expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(layer(x_in) - layer.base_layer(x_in), x_in @ expected.T, rtol=1e-4,
                                       atol=1e-5)


def test_normalised_directions_have_unit_norm_and_end_task_keeps_the_function():
    learner = make()
    train(learner, 0, finish=False)
    with torch.no_grad():
        before = learner.model(probe())
    learner.end_task(None)
    with torch.no_grad():
        torch.testing.assert_close(learner.model(probe()), before, rtol=1e-5, atol=1e-6)
    train(learner, 1)
    learner.begin_task(None)
    for name in learner.adapters[:-1]:
        for layer_name, layer in learner.layers().items():
            module = learner._magnitudes[name][layer_name]
            direction = (delta_weight(layer, name) / module.magnitude).detach()
            assert math.isclose(float(torch.linalg.matrix_norm(direction)), 1.0, rel_tol=1e-5)
            assert not any(w.requires_grad for w in raw_weights(layer, name))  # frozen
            assert module.magnitude.requires_grad


def test_old_directions_bit_identical_and_old_magnitudes_learn():
    learner = make()
    train(learner, 0)
    raw0 = {n: [w.detach().clone() for w in raw_weights(layer, "task0")] for n, layer in learner.layers().items()}
    mag0 = learner.magnitudes()["task0"]
    train(learner, 1)
    mag1 = learner.magnitudes()["task1"]
    train(learner, 2)
    for layer_name, layer in learner.layers().items():
        a, b = raw_weights(layer, "task0")
        assert torch.equal(a, raw0[layer_name][0]) and torch.equal(b, raw0[layer_name][1])
    changed0 = [abs(learner.magnitudes()["task0"][n] - mag0[n]) for n in mag0]
    changed1 = [abs(learner.magnitudes()["task1"][n] - mag1[n]) for n in mag1]
    assert max(changed0) > 1e-6 and max(changed1) > 1e-6


def test_save_load_round_trip(tmp_path):
    learner = make()
    train(learner, 0)
    train(learner, 1)
    params = [id(p) for p in learner.trainable_parameters()]
    learner.save(tmp_path / "done.safetensors")
    assert [id(p) for p in learner.trainable_parameters()] == params  # same objects: an optimizer keeps working
    train(learner, 2, finish=False)
    learner.save(tmp_path / "mid.safetensors")  # mid-task: the current component is still raw and trainable
    with torch.no_grad():
        out = learner.model(probe())

    fresh = make()  # same seed: the same base weights
    fresh.load(tmp_path / "mid.safetensors")
    assert fresh.frozen == 2 and fresh.adapters == learner.adapters and fresh.task == 2
    assert fresh.magnitudes() == learner.magnitudes()
    with torch.no_grad():
        assert torch.equal(fresh.model(probe()), out)
    assert len(fresh.trainable_parameters()) == len(learner.trainable_parameters())
    fresh.end_task(None)  # finishing the loaded task works as on the original
    learner.end_task(None)
    with torch.no_grad():
        assert torch.equal(fresh.model(probe()), learner.model(probe()))

    again = make()
    again.load(tmp_path / "done.safetensors")
    assert again.frozen == 2 and again.trainable_adapters() == []
    again.load(tmp_path / "done.safetensors")  # loading into a learner that already has the adapters
    assert again.frozen == 2

    other = make(magnitude_init=0.5)
    with pytest.raises(ValueError, match="config"):
        other.load(tmp_path / "done.safetensors")


def test_deterministic_under_a_seed():
    runs = []
    for _ in range(2):
        learner = make(seed=3)
        train(learner, 0)
        train(learner, 1)
        with torch.no_grad():
            runs.append((learner.model(probe()), learner.magnitudes()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


def test_runs_inside_the_avalanche_plugin(tmp_path):
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run

    (plan,) = plan_experiment(load_experiment(tiny_experiment(["sdlora"])))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    assert np.diag(R).max() > 0.25, R.tolist()
