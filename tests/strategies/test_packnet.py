"""Avalanche's PackNet as the registered baseline ``packnet``: capabilities, model wrapping, parameter isolation."""

import warnings

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from conftest import tiny_experiment
from torch import nn

from avalanche_merge.benchmarks import BENCHMARKS
from avalanche_merge.config import ConfigError
from avalanche_merge.models import BACKBONES
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.runner.run import make_evaluator, seed_everything
from avalanche_merge.strategies import METHODS, list_methods
from avalanche_merge.strategies.packnet import FirstTaskParams, PackNetConfig, packnet_model
from avalanche_merge.strategies.registry import BuildContext, TrainConfig

TASK_BENCH = {"name": "split_digits", "options": {"n_experiences": 2, "max_train_per_class": 30, "task_labels": True}}


def test_registration_is_task_incremental_only():
    spec = METHODS.get("packnet")
    assert spec.needs_task_labels  # check_compatible: task-incremental benchmarks only
    assert not spec.in_bench and "packnet" not in list_methods(bench_only=True)
    assert spec.family == "baseline"
    with pytest.raises(ConfigError, match="task labels"):  # class-incremental split_digits is refused up front
        plan_experiment(load_experiment(tiny_experiment(["packnet"])))
    (plan,) = plan_experiment(load_experiment(tiny_experiment(["packnet"], benchmark=TASK_BENCH)))
    assert plan.method == "packnet"


def test_config_validation():
    with pytest.raises(ValueError, match="prune_proportion"):
        PackNetConfig(prune_proportion=1.5)
    with pytest.raises(ValueError, match="post_prune_epochs"):
        PackNetConfig(post_prune_epochs=0)


def test_packnet_model_wraps_tiny_vit():
    from avalanche.models.packnet import PackNetModel, PackNetModule

    vit = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2))
    names = {n for n, _ in vit.named_parameters()}
    model = packnet_model(vit)
    assert isinstance(model, PackNetModel) and packnet_model(model) is model
    # every Linear / Conv is Avalanche's masked wrapper; nothing else is
    wrapped = [m for m in model.modules() if isinstance(m, PackNetModule) and m is not model]
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in vit.modules())
    assert n_layers == 4 + 2 + 1 + 1  # q k v proj, fc1 fc2, patch_embed, head
    assert sum(type(m).__name__ in ("_PnLinear", "_PnConvNd") for m in wrapped) == n_layers
    # the parameters Avalanche cannot mask: norms, class token, position embeddings
    shared = {id(p) for p in model.first_task_params.params_}
    expected = {n for n in names if "norm" in n or n in ("cls_token", "pos_embed")}
    assert {n for n, p in vit.named_parameters() if id(p) in shared} == expected
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in vit.parameters())  # no duplicates
    x = torch.randn(3, 1, 28, 28)
    out = model(x, torch.zeros(3, dtype=torch.long))
    assert out.shape == (3, 10)
    with pytest.raises(ValueError, match="running statistics"):
        packnet_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def test_first_task_params_freeze_with_the_first_experience():
    p = nn.Parameter(torch.ones(3))
    m = FirstTaskParams([p])
    m.prune(0.5)
    assert p.requires_grad
    m.freeze_pruned()
    assert not p.requires_grad and m.task_count == 1


class _Calls(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.exps = []

    def after_training_exp(self, strategy, **kwargs):
        self.exps.append(strategy.experience.current_experience)


def _build(train: TrainConfig, cfg: PackNetConfig | None = None, plugins=()):
    (plan,) = plan_experiment(load_experiment(tiny_experiment(["packnet"], benchmark=TASK_BENCH)))
    bench = BENCHMARKS.get("split_digits").build(plan.benchmark_options, 0)
    seed_everything(0)
    model = BACKBONES.get("tiny_vit").build(plan.model_options, bench, 0)
    ctx = BuildContext(model=model, benchmark=bench, train=train, evaluator=make_evaluator([]), plugins=list(plugins))
    return bench, METHODS.get("packnet").build(ctx, cfg or PackNetConfig())


def _logits(strategy, exp):
    x = torch.stack([exp.dataset.eval()[i][0] for i in range(min(40, len(exp.dataset)))])
    strategy.model.eval()
    with torch.no_grad():
        return strategy.model(x, torch.full((len(x),), exp.task_label, dtype=torch.long))


def test_isolation_earlier_task_is_bit_identical():
    """Task 0's outputs (with task label 0) are unchanged by training task 1, even with weight decay requested."""
    calls = _Calls()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        bench, strategy = _build(TrainConfig(epochs=2, batch_size=16, lr=2e-3, weight_decay=0.1), plugins=[calls])
    assert any("weight_decay" in str(x.message) for x in w)
    assert all(g["weight_decay"] == 0.0 for g in strategy.optimizer.param_groups)
    train, test = bench.train_stream, bench.test_stream
    strategy.train(train[0])
    before = _logits(strategy, test[0])
    state0 = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    strategy.train(train[1])
    after = _logits(strategy, test[0])
    assert torch.equal(before, after)
    assert calls.exps == [0, 1]  # extra plugins are called (Avalanche's PackNet class would drop them)
    # task 1 did train: some weights changed, none of task 0's
    changed = [k for k, v in strategy.model.state_dict().items()
               if k.endswith("weight") and not torch.equal(v, state0[k])]
    assert changed
    n_wrapped = 0
    for name, mod in strategy.model.named_modules():
        if type(mod).__name__ in ("_PnLinear", "_PnConvNd"):
            n_wrapped += 1
            task0 = mod.task_index.eq(0)
            assert task0.any() and not task0.all()
            assert torch.equal(mod.wrappee.weight[task0], state0[f"{name}.wrappee.weight"][task0])
    assert n_wrapped == 8


def test_post_prune_epochs_must_leave_training_epochs():
    with pytest.raises(ValueError, match="post_prune_epochs"):
        _build(TrainConfig(epochs=1), PackNetConfig(post_prune_epochs=1))
