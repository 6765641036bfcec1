"""RoutedLoRA (CoLoR, Proteus): isolation of tasks, batched routing, penalties, pretrained signatures, Avalanche."""

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_merge.lora.adapters import adapter_state, lora_layers
from avalanche_merge.models import TinyViT, TinyViTConfig
from avalanche_merge.retrieval.routed import CoLoRConfig, ProteusConfig, RoutedLoRA
from avalanche_merge.retrieval.router import Router

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_TRAIN, tiny_experiment  # noqa: E402


def _backbone() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(TinyViTConfig(image_size=8, patch_size=4, dim=8, depth=1, heads=2, num_classes=4))


def _task_data(t: int, n: int = 24):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(n, 1, 8, 8, generator=g) + 3.0 * t  # tasks far apart in input space
    y = torch.tensor([2 * t + i % 2 for i in range(n)])
    return x, y


def _train_task(model: RoutedLoRA, t: int, steps: int = 5) -> None:
    x, y = _task_data(t)
    params = model.begin_task([2 * t, 2 * t + 1])
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        penalty = model.penalty()
        if penalty is not None:
            loss = loss + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.end_task([x[:12], x[12:]], [y[:12], y[12:]])
    model.eval()


@pytest.mark.parametrize("cfg", [CoLoRConfig(router="oracle", n_components=2),
                                 ProteusConfig(router="oracle", n_components=2, head_type="linear")])
def test_oracle_task_outputs_unaffected_by_later_tasks(cfg):
    model = RoutedLoRA(_backbone(), config=cfg)
    _train_task(model, 0)
    x0, _ = _task_data(0)
    with torch.no_grad():
        before = model(x0, task_ids=torch.zeros(len(x0), dtype=torch.long))
    adapter0 = adapter_state(model.backbone, "task0")
    head0 = {k: v.clone() for k, v in model.heads[0].state_dict().items()}
    _train_task(model, 1)
    assert model.num_tasks == 2
    for k, v in adapter_state(model.backbone, "task0").items():
        assert torch.equal(v, adapter0[k]), k
    for k, v in model.heads[0].state_dict().items():
        assert torch.equal(v, head0[k]), k
    with torch.no_grad():
        after = model(x0, task_ids=torch.zeros(len(x0), dtype=torch.long))
    assert torch.equal(before, after)
    assert torch.all(after[:, 2:] == -1e9)  # task 0's head writes only its classes' columns
    if cfg.transfer:  # the task-1 module gates task 0's adapter; gates were trained
        assert model.gates[1].numel() == 1 and model.gates[0].numel() == 0


@pytest.mark.parametrize("cfg", [CoLoRConfig(n_components=2), ProteusConfig(n_components=2)])
def test_route_batched_equals_per_sample(cfg):
    model = RoutedLoRA(_backbone(), config=cfg)
    _train_task(model, 0)
    _train_task(model, 1)
    assert isinstance(model, Router)
    x = torch.cat([_task_data(0)[0][:6], _task_data(1)[0][:6]])
    routed = model.route(x)
    assert routed.dtype == torch.long and torch.equal(model.last_routed, routed)
    assert torch.equal(routed, torch.cat([model.route(x[i:i + 1]) for i in range(len(x))]))
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_signatures_use_pretrained_features():
    backbone = _backbone()
    reference = copy.deepcopy(backbone).eval()
    model = RoutedLoRA(backbone, config=CoLoRConfig(n_components=2))
    _train_task(model, 0, steps=10)
    _train_task(model, 1, steps=10)
    x = _task_data(1)[0]
    assert any(bool(layer.lora_B["task0"].weight.abs().sum() > 0) for layer in lora_layers(model.backbone).values())
    with torch.no_grad():
        expected = reference.features(x)
        torch.testing.assert_close(model.embed(x), expected, rtol=0, atol=0)
        adapted = model._task_features(x, 1)
    assert not torch.allclose(adapted, expected)  # the adapter does change the features


def test_proteus_penalty_equals_direct_computation():
    cfg = ProteusConfig(lambda_orth=0.3, lambda_l1=0.2, lambda_l2=0.1, n_components=2)
    model = RoutedLoRA(_backbone(), config=cfg)
    _train_task(model, 0)
    model.begin_task([2, 3])
    with torch.no_grad():
        model.gates[1].fill_(-0.7)
        for layer in lora_layers(model.backbone).values():
            layer.lora_B["task1"].weight.normal_()
    expected = torch.tensor(0.2 * 0.7)
    for layer in lora_layers(model.backbone).values():
        a0, a1, b1 = layer.lora_A["task0"].weight, layer.lora_A["task1"].weight, layer.lora_B["task1"].weight
        expected = expected + 0.3 * (a0 @ a1.T).abs().sum() + 0.1 * (a1.pow(2).sum() + b1.pow(2).sum())
    penalty = model.penalty()
    torch.testing.assert_close(penalty, expected)
    model.zero_grad(set_to_none=True)
    penalty.backward()
    assert model.gates[1].grad is not None and layer.lora_A["task0"].weight.grad is None
    assert CoLoRConfig().lambda_orth == 0 and RoutedLoRA(_backbone(), config=CoLoRConfig()).penalty() is None


def _lda_task(n_per_class: int = 24):
    """Three classes whose inputs carry a class-specific pattern (labels informative), balanced."""
    g = torch.Generator().manual_seed(5)
    patterns = 1.5 * torch.randn(3, 1, 8, 8, generator=g)
    y = torch.arange(3).repeat(n_per_class)
    return torch.randn(len(y), 1, 8, 8, generator=g) + patterns[y], y


@pytest.mark.parametrize("shrinkage", [1e-2, 0.5])  # 1e-2: the default; the features are rank d - 1 (LayerNorm)
def test_lda_head_equals_sklearn_lda_on_the_adapted_features(shrinkage):
    """The LDA head against scikit-learn's LinearDiscriminantAnalysis (an independent implementation).

    Ours: pooled within-class covariance ``S = sum (x - mu_y)(x - mu_y)^T / (N - 1)`` plus ``s * mean(diag S)`` on
    the diagonal, logits ``x^T Sigma^-1 mu_c - mu_c^T Sigma^-1 mu_c / 2``. scikit-learn (``lsqr``, uniform priors,
    shrinkage ``s' = s / (1 + s)``, balanced classes) uses ``Sigma' = (1 - s') S_b + s' mean(diag S_b) I`` with the
    biased ``S_b = S (N - 1) / N``, i.e. ``Sigma = c Sigma'`` with ``c = N (1 + s) / (N - 1)``, and adds the log prior:
    ``c * ours = sklearn - log(1/3)``. Kills a flipped bias sign, a dropped or mis-scaled shrinkage, a wrong
    normaliser and an LDA fitted on the pretrained instead of the adapted features.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y = _lda_task()
    model = RoutedLoRA(_backbone(), config=ProteusConfig(n_components=1, lda_shrinkage=shrinkage), num_classes=6)
    opt = torch.optim.SGD(model.begin_task([0, 1, 2]), lr=0.5)
    model.train()
    for _ in range(3):  # move the adapter so that adapted and pretrained features differ
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.end_task([x[:40], x[40:]], [y[:40], y[40:]])
    model.eval()
    with torch.no_grad():
        feats = model._task_features(x, 0).double()
        assert not torch.allclose(feats, model.embed(x).double(), atol=1e-3)
        ours = model(x)[:, :3].double()
    n = len(y)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage / (1 + shrinkage),
                                     priors=[1 / 3] * 3).fit(feats.numpy(), y.numpy())
    expected = (lda.decision_function(feats.numpy()) - np.log(1 / 3)) * (n - 1) / (n * (1 + shrinkage))
    torch.testing.assert_close(ours, torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(1), torch.from_numpy(lda.predict(feats.numpy())))
    assert (ours.argmax(1) == y).double().mean() >= 0.9  # informative labels: the head does separate them


def test_proteus_gates_scale_earlier_adapters_and_change_outputs():
    """While task 1 runs, the earlier adapter's contribution to every LoRA layer is multiplied by its gate:
    ``layer(x; g) = layer(x; 0) + g * (layer_task0_only(x) - base(x))``; the gate changes the task's logits and
    receives the gradient of its loss (finite differences). Kills ignored, mis-wired or detached gates."""
    model = RoutedLoRA(_backbone(), config=ProteusConfig(router="oracle", n_components=1, head_type="linear"))
    _train_task(model, 0)
    model.begin_task([2, 3])
    model.eval()
    name, layer = next(iter(lora_layers(model.backbone).items()))
    assert layer.lora_B["task0"].weight.abs().sum() > 0, name  # trained: the earlier adapter does something
    with torch.no_grad():
        for lay in lora_layers(model.backbone).values():
            lay.lora_B["task1"].weight.normal_(std=0.1)
    h = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))

    def layer_out(active, gates):
        model._set_active(active, gates)
        try:
            with torch.no_grad():
                return layer(h)
        finally:
            model._set_active([], {})

    delta0 = layer_out(["task0"], {}) - layer_out([], {})
    assert delta0.abs().max() > 1e-4
    at0 = layer_out(["task0", "task1"], {"task0": torch.tensor(0.0)})
    torch.testing.assert_close(at0, layer_out(["task1"], {}))  # gate 0 = no transfer
    for g in (0.5, -2.0):
        torch.testing.assert_close(layer_out(["task0", "task1"], {"task0": torch.tensor(g)}), at0 + g * delta0)

    x, y = _task_data(1)
    y = y - 2

    def loss_at(g):
        with torch.no_grad():
            model.gates[1].fill_(g)
        return torch.nn.functional.cross_entropy(model.heads[1](model._task_features(x, 1)), y)

    with torch.no_grad():
        model.gates[1].fill_(0.0)
        without = model.task_logits(x, 1)
        model.gates[1].fill_(1.5)
        assert (model.task_logits(x, 1) - without)[:, 2:].abs().max() > 1e-3
    model.zero_grad(set_to_none=True)
    loss_at(0.3).backward()
    eps = 1e-2
    with torch.no_grad():
        numeric = (loss_at(0.3 + eps) - loss_at(0.3 - eps)) / (2 * eps)
    assert model.gates[1].grad is not None and abs(float(model.gates[1].grad)) > 1e-5
    torch.testing.assert_close(model.gates[1].grad.reshape(()), numeric, rtol=2e-2, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="router.*'nearest'"):
        CoLoRConfig(router="nearest")
    with pytest.raises(ValueError, match="head_type"):
        ProteusConfig(head_type="mlp")
    with pytest.raises(ValueError, match="lambda_l1"):
        ProteusConfig(lambda_l1=-1.0)
    with pytest.raises(ValueError, match="signature_method"):
        CoLoRConfig(signature_method="knn")
    with pytest.raises(TypeError, match="feature_fn must be callable"):  # no features(x) is needed any more
        RoutedLoRA(torch.nn.Linear(3, 3), feature_fn=3)


def test_routed_signature_defaults_are_lossless_and_options_validated():
    from avalanche_merge.retrieval.signatures import SignatureConfig

    for cfg, method in ((CoLoRConfig(), "centroid"), (ProteusConfig(), "dpgmm")):
        assert cfg.signature_config() == SignatureConfig(method=method, covariance_type="oas", reduce=None)
    cfg = ProteusConfig(covariance_type="ledoit_wolf", reduce="pca", dim=16, n_components=3)
    assert cfg.signature_config() == SignatureConfig(method="dpgmm", n_components=3, covariance_type="ledoit_wolf",
                                                     reduce="pca", dim=16)
    with pytest.raises(ValueError, match=r"covariance_type must be one of \['oas', 'ledoit_wolf', 'full', 'diag'\], "
                                         r"got 'tied'"):
        ProteusConfig(covariance_type="tied")
    with pytest.raises(ValueError, match=r"reduce must be one of \[None, 'pca', 'whiten'\], got 'umap'"):
        CoLoRConfig(reduce="umap")


@pytest.mark.parametrize("method", ["color", "proteus"])
def test_tiny_avalanche_run(method, tmp_path):
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run

    entry = {"name": method, "options": {"lr": 1e-2, "max_samples": 64}}
    (plan,) = plan_experiment(load_experiment(tiny_experiment([entry], train=dict(TINY_TRAIN, epochs=1))))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
    assert math.isclose(result["metrics"]["final_acc"], R[-1].mean())
    assert result["trainable_params"] > 0


def _routed_benchmark():
    from torch.utils.data import TensorDataset

    from avalanche_merge.benchmarks.base import as_classification_dataset, make_scenario

    def dataset(t):
        x, y = _task_data(t)
        return as_classification_dataset(TensorDataset(x, y), y, 0)

    return make_scenario([dataset(0), dataset(1)], [dataset(0), dataset(1)])


def _strategy(cls, model, plugins, **kwargs):
    from avalanche_merge.plugins.routed import RoutedPlugin

    return cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=8, train_epochs=1,
               eval_mb_size=24, criterion=torch.nn.CrossEntropyLoss(), evaluator=None,
               plugins=[*plugins, RoutedPlugin(model=model)], **kwargs)


@pytest.mark.parametrize("kind", ["replay", "cumulative"])
def test_routed_methods_refuse_strategies_that_mix_old_samples_before_training(kind):
    """Issue 14: replayed old-class samples used to train against placeholder logits (loss ~5e8), silently."""
    from avalanche.training import Cumulative, Naive
    from avalanche.training.plugins import ReplayPlugin

    model = RoutedLoRA(_backbone(), config=CoLoRConfig(n_components=2), num_classes=4)
    strategy = (_strategy(Naive, model, [ReplayPlugin(mem_size=8)]) if kind == "replay"
                else _strategy(Cumulative, model, []))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot train with earlier experiences' samples mixed in"):
        strategy.train(_routed_benchmark().train_stream[0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before any step


def test_routed_methods_refuse_a_batch_with_another_experiences_classes():
    from avalanche.core import SupervisedPlugin
    from avalanche.training import Naive

    class Inject(SupervisedPlugin):  # a user's plugin that mixes in a sample of another task
        def before_forward(self, strategy, **kwargs):
            strategy.mbatch[1][0] = 3

    model = RoutedLoRA(_backbone(), config=CoLoRConfig(n_components=2), num_classes=4)
    strategy = _strategy(Naive, model, [Inject()])
    with pytest.raises(ValueError, match=r"holds classes \[3\] that are not in the current experience \(\[0, 1\]\)"):
        strategy.train(_routed_benchmark().train_stream[0])
