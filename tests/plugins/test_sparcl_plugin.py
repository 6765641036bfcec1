"""SparCLPlugin on DER++: importance from the whole rehearsal loss, data removal stages, the runner's wiring."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from conftest import tiny_experiment
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.config import ConfigError
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.plugins.sparcl import SparCLPlugin
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.strategies import METHODS
from avalanche_merge.strategies.der import DERPP

RANDOM_VIT = {"name": "tiny_vit", "options": {"pretrained": False, "dim": 16, "depth": 1, "heads": 2}}
FAST = {"mask_update_every": 1, "gradient_every": 4, "removal_fraction": 0.0, "density": 0.3}


@pytest.fixture(scope="module")
def bench():
    return build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)


def _der(plugins, epochs=2, optimizer="adamw"):
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.05)
    )
    strategy = DERPP(
        model=model,
        optimizer=opt,
        mem_size=40,
        alpha=0.1,
        beta=0.5,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=epochs,
        device="cpu",
        evaluator=None,
        plugins=list(plugins),
    )
    return strategy, model


class _Probe(SupervisedPlugin):
    """Before SparCL's masking: the step's raw gradient, and the DER++ and current-only gradients recomputed."""

    def __init__(self):
        super().__init__()
        self.learner = None
        self.passed = []  # what each TDM update received
        self.last = None

    def before_training_exp(self, strategy, **kwargs):
        learner = self.learner = next(p for p in strategy.plugins if isinstance(p, SparCLPlugin)).learner
        if not hasattr(learner, "_probed"):
            original = learner.begin_epoch

            def begin_epoch(grads=None):
                self.passed.append({n: None if g is None else g.clone() for n, g in (grads or {}).items()})
                original(grads)

            learner.begin_epoch, learner._probed = begin_epoch, True

    def after_backward(self, strategy, **kwargs):
        if strategy.replay_loader is None:
            self.last = None
            return
        params = list(self.learner.params.values())
        m, x, y = strategy.batch_size_mem, strategy.mb_x, strategy.mb_y
        out = strategy.model(x)
        full = (
            F.cross_entropy(out[m:], y[m:])
            + strategy.alpha * F.mse_loss(out[:m], strategy.batch_logits)
            + strategy.beta * F.cross_entropy(out[:m], y[:m])
        )
        current = F.cross_entropy(strategy.model(x[m:]), y[m:])
        self.last = {
            "raw": [p.grad.clone() for p in params],
            "full": torch.autograd.grad(full, params),
            "current": torch.autograd.grad(current, params),
        }


class _After(SupervisedPlugin):
    """After SparCL's masking: the gradient each epoch's last step leaves behind, with the probe's record."""

    def __init__(self, probe):
        super().__init__()
        self.probe, self.masked, self.ends = probe, None, []

    def after_backward(self, strategy, **kwargs):
        self.masked = {n: p.grad.clone() for n, p in self.probe.learner.params.items()}

    def after_training_epoch(self, strategy, **kwargs):
        self.ends.append((self.probe.last, self.masked))


def test_tdm_importance_uses_the_whole_der_loss_gradient_current_and_buffer(bench):
    probe = _Probe()
    after = _After(probe)
    plugin = SparCLPlugin(options=FAST)
    strategy, _ = _der([probe, plugin, after], epochs=3)
    strategy.train(bench.scenario.train_stream[0])
    probe.passed.clear()
    after.ends.clear()
    strategy.train(bench.scenario.train_stream[1])  # the buffer is in use at every step
    assert len(probe.passed) == 3 and len(after.ends) == 3
    for epoch in (1, 2):  # the update at the start of an epoch sees the previous epoch's last step
        (last, masked), passed = after.ends[epoch - 1], probe.passed[epoch]
        for i, name in enumerate(plugin.learner.params):
            assert torch.equal(passed[name], masked[name])  # the step's own gradient, as DGM masked it
            assert torch.allclose(last["raw"][i], last["full"][i], atol=1e-6)  # = DER++'s, buffer terms included
            assert not torch.allclose(last["raw"][i], last["current"][i], atol=1e-4)  # not the current batch's
            assert masked[name].count_nonzero() > 0


def test_data_removal_follows_its_stages_and_the_next_experience_starts_full(bench):
    class Count(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.per_epoch = []

        def before_training_epoch(self, strategy, **kwargs):
            self.per_epoch.append(0)

        def after_training_iteration(self, strategy, **kwargs):
            self.per_epoch[-1] += len(strategy.mb_y) - (strategy.batch_size_mem if strategy.replay_loader else 0)

    count = Count()
    plugin = SparCLPlugin(options=dict(FAST, removal_fraction=0.4, removal_every=2, removal_until=4))
    strategy, model = _der([count, plugin], epochs=5)
    n0, n1 = (len(e.dataset) for e in bench.scenario.train_stream)
    strategy.train(bench.scenario.train_stream[0])
    k0 = int(0.4 * n0 / 2)
    assert count.per_epoch == [n0, n0, n0 - k0, n0 - k0, n0 - 2 * k0]
    assert plugin.passes == [4] and plugin.kept_fractions == [pytest.approx((n0 - 2 * k0) / n0)]
    removal = plugin.removal
    alive = torch.ones(n0, dtype=torch.bool)  # the examples each stage observed
    for removed, counts, learned in zip(removal.removed, removal.stage_counts, removal.stage_learned, strict=True):
        key = torch.where(learned, counts, torch.iinfo(torch.long).max)  # never learned: the most forgotten
        alive[removed] = False
        assert key[removed].max() <= key[alive].min()  # the least forgotten go first
        assert len(set(key[alive | torch.isin(torch.arange(n0), removed)].tolist())) > 1  # differences measured
    assert torch.equal(
        removal.active, torch.tensor(sorted(set(range(n0)) - {i for r in removal.removed for i in r.tolist()}))
    )
    for n, p in plugin.learner.params.items():
        assert (p.detach()[~plugin.learner.masks[n]] == 0).all()
    count.per_epoch.clear()
    strategy.train(bench.scenario.train_stream[1])
    k1 = int(0.4 * n1 / 2)
    assert count.per_epoch == [n1, n1, n1 - k1, n1 - k1, n1 - 2 * k1]


def test_with_every_sparsity_off_it_is_its_der_base(bench):
    off = {
        "density": 1.0,
        "regrow_fraction": 0.0,
        "gradient_sparsity": 0.0,
        "removal_fraction": 0.0,
        "mask_update_every": 1,
    }
    strategy, ours = _der([SparCLPlugin(options=off)], optimizer="sgd")
    base, theirs = _der([], optimizer="sgd")
    for s in (strategy, base):
        for exp in bench.scenario.train_stream:
            torch.manual_seed(1)
            s.train(exp)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(a, b), name


# -- the registered method in the runner -------------------------------------------------------------------------------
def test_registered_sparcl_declares_der_and_the_scripts_protocol():
    spec = METHODS.get("sparcl")
    assert spec.base == "der" and spec.kind == "plugin" and spec.protocol == "masked" and not spec.in_bench
    cfg = spec.config_cls()
    assert (cfg.mem_size, cfg.alpha, cfg.beta, cfg.density, cfg.gradient_sparsity) == (500, 0.1, 0.5, 0.25, 0.8)


def test_plan_refuses_a_schedule_that_measures_no_forgetting():
    with pytest.raises(ConfigError, match="mask_update_every=5 never adjusts"):
        plan_experiment(load_experiment(tiny_experiment(["sparcl"], train={"epochs": 2})))
    entry = {"name": "sparcl", "options": {"mask_update_every": 1}}
    with pytest.raises(ConfigError, match="removal_every=5 needs at least 6 epochs"):
        plan_experiment(load_experiment(tiny_experiment([entry], train={"epochs": 2})))
    entry["options"]["removal_fraction"] = 0.0
    assert len(plan_experiment(load_experiment(tiny_experiment([entry], train={"epochs": 2})))) == 1


def test_sparcl_runs_end_to_end_in_the_runner(tmp_path):
    from avalanche_merge.runner.run import execute_run

    options = {"lr": 1e-2, "mask_update_every": 2, "removal_every": 2, "removal_until": 2, "mem_size": 40}
    config = tiny_experiment(
        [{"name": "sparcl", "options": options}], model=RANDOM_VIT, train={"epochs": 3, "batch_size": 16, "lr": 2e-3}
    )
    (plan,) = plan_experiment(load_experiment(config))
    assert plan.protocol == "masked"
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
