"""The registered prompt strategies inside Avalanche: set-typed classes, pull sign, schedule, selection report."""

import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin
from conftest import tiny_experiment

import avalanche_merge.models.pretrain as pretrain_module
from avalanche_merge.config import ConfigError
from avalanche_merge.plugins.prompts import PromptPlugin
from avalanche_merge.plugins.protocol import HeadProtocolPlugin
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.runner.preflight import preflight
from avalanche_merge.strategies import METHODS
from avalanche_merge.strategies.registry import BuildContext, TrainConfig

OPTIONS = {"l2p": {"pool_size": 4, "prompt_length": 2, "top_n": 2, "lr": 0.05, "scale_lr_by_batch": False},
           "dualprompt": {"g_length": 2, "e_length": 2, "lr": 0.05, "scale_lr_by_batch": False},
           "coda_prompt": {"components_per_task": 3, "length": 4, "lr": 0.05}}


def _setup(method, n_experiences=2):
    from avalanche_merge.benchmarks import BENCHMARKS
    from avalanche_merge.models import BACKBONES
    from avalanche_merge.runner.run import make_evaluator

    bspec = BENCHMARKS.get("split_digits")
    bench = bspec.build(bspec.config_cls(n_experiences=n_experiences, max_train_per_class=10), 0)
    mspec = BACKBONES.get("tiny_vit")
    backbone = mspec.build(mspec.config_cls(pretrained=False, dim=16, depth=2, heads=2), bench, 0)
    ctx = BuildContext(model=backbone, benchmark=bench, train=TrainConfig(epochs=1, batch_size=16),
                       evaluator=make_evaluator([]), plugins=[HeadProtocolPlugin(protocol="masked")])
    spec = METHODS.get(method)
    return spec.build(ctx, spec.config_cls(**OPTIONS[method])), bench, backbone


class Record(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.losses, self.head_grads = [], []

    def after_backward(self, strategy, **kwargs):
        self.losses.append(float(strategy.loss))
        self.head_grads.append(strategy.model.head.weight.grad.abs().sum(dim=1).clone())


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_set_typed_classes_train_with_finite_loss_and_backbone_stays_bit_identical(method):
    strategy, bench, backbone = _setup(method)
    exp = bench.train_stream[0]
    assert isinstance(exp.classes_in_this_experience, set)  # what breaks Avalanche 0.6's L2P
    rec = Record()
    strategy.plugins.append(rec)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    strategy.train(exp)
    assert rec.losses and all(math.isfinite(v) for v in rec.losses)
    mine, others = sorted(exp.classes_in_this_experience), sorted(set(range(10)) - exp.classes_in_this_experience)
    # the task's head rows get a gradient, the others none (masked protocol)
    assert all(bool((g[mine] > 0).all()) and float(g[others].sum()) == 0 for g in rec.head_grads)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    opt_params = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in backbone.parameters()}


def test_dualprompt_reports_prompt_selection_accuracy():
    strategy, bench, _ = _setup("dualprompt")
    plugin = strategy.prompt_plugin
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream)
    info = plugin.method_info()
    assert len(info["prompt_selection"]) == 2 and len(info["prompt_selection"][0]) == 2
    assert 0.0 <= info["final_prompt_selection_acc"] <= 1.0
    assert info["final_prompt_selection_acc"] == pytest.approx(sum(info["prompt_selection"][1]) / 2)


def test_selection_accuracy_counts_inputs_whose_selection_is_their_task():
    plugin = PromptPlugin(lr=0.1, selection=True)
    plugin.trained = 2
    model = SimpleNamespace(last_selection=torch.tensor([[1], [1], [0], [1]]))
    strategy = SimpleNamespace(model=model, experience=SimpleNamespace(current_experience=1))
    plugin.before_eval_exp(strategy)
    plugin.after_eval_iteration(strategy)
    plugin.after_eval_exp(strategy)
    model.last_selection = torch.tensor([[0], [1]])
    strategy.experience.current_experience = 0
    plugin.before_eval_exp(strategy)
    plugin.after_eval_iteration(strategy)
    plugin.after_eval_exp(strategy)
    plugin.after_eval(strategy)
    assert plugin.rows == [{1: 0.75, 0: 0.5}]
    assert plugin.method_info()["final_prompt_selection_acc"] == pytest.approx(0.625)


def test_pull_term_is_subtracted_with_its_weight_and_cosine_schedule():
    plugin = PromptPlugin(lr=0.1, pull_weight=0.5, cosine=True)
    strategy = SimpleNamespace(model=SimpleNamespace(last_pull=torch.tensor(0.8)), loss=torch.tensor(2.0))
    plugin.before_backward(strategy)
    assert float(strategy.loss) == pytest.approx(2.0 - 0.5 * 0.8)
    group = {"lr": 0.1}
    strategy = SimpleNamespace(train_epochs=5, clock=SimpleNamespace(train_exp_epochs=0),
                               optimizer=SimpleNamespace(param_groups=[group]))
    lrs = []
    for e in range(5):
        strategy.clock.train_exp_epochs = e
        plugin.before_training_epoch(strategy)
        lrs.append(group["lr"])
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1 * math.cos(99 * math.pi / 200))
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_fresh_optimizer_state_per_task():
    strategy, bench, _ = _setup("coda_prompt")
    strategy.train(bench.train_stream[0])
    assert strategy.optimizer.state
    seen = {}

    class Peek(SupervisedPlugin):
        def before_training_epoch(self, s, **kwargs):
            seen.setdefault("state", len(s.optimizer.state))
            seen.setdefault("params", [p for g in s.optimizer.param_groups for p in g["params"]])

    strategy.plugins.append(Peek())
    strategy.train(bench.train_stream[1])
    assert seen["state"] == 0
    layer = strategy.model.coda.layers[0]
    ids = {id(p) for p in seen["params"]}
    assert id(layer.P[1]) in ids and id(layer.P[0]) not in ids


@pytest.mark.parametrize("entry, match", [
    ({"name": "dualprompt", "options": {"e_layers": [0, 3]}}, "e_layers index 3 is outside the model"),
    ({"name": "coda_prompt", "options": {"layers": [1]}}, "layers index 1 is outside the model"),
    ({"name": "coda_prompt", "options": {"components_per_task": 9}}, "orthogonal components"),
    ({"name": "l2p", "options": {"pool_size": 3, "top_n": 4}}, "smaller than top-N"),
])
def test_bad_prompt_options_fail_at_plan_time_before_any_pretraining(entry, match, monkeypatch):
    """The registered methods' bad input is refused by the runner's pre-flight on the meta-device skeleton."""
    monkeypatch.setattr(pretrain_module, "pretrain_tiny_vit", lambda *a, **k: pytest.fail("pretraining started"))
    with pytest.raises((ConfigError, ValueError), match=match):
        preflight(plan_experiment(load_experiment(tiny_experiment([entry]))))
