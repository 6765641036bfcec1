"""SparCL: TDM prune/regrow, DGM top-k gradients and refresh schedule, forgetting events, data removal, Avalanche."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_experiment
from torch import nn

from avalanche_merge.sparse import make_sparse_learner
from avalanche_merge.sparse.sparcl import ForgettingTracker, SparCLConfig, removal_schedule

NO_DDR = {"removal_fraction": 0.0}


def _mlp(seed=0):
    torch.manual_seed(seed)  # tanh: no dead units, so gradients and weight changes have no exact ties
    return nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _step(learner, opt, batch, on_grad=None):
    x, y = batch
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(learner.model(x), y).backward()
    if on_grad is not None:
        on_grad()
    learner.after_backward()
    learner.before_step()
    opt.step()
    learner.after_step()


def _snapshot(learner):
    return {n: p.detach().clone() for n, p in learner.params.items()}


def _grads(learner):
    return {n: p.grad.detach().clone() for n, p in learner.params.items()}


def _learner(model=None, **options):
    return make_sparse_learner("sparcl", model if model is not None else _mlp(), **{**NO_DDR, **options})


# -- weights outside the mask ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_masked_out_weights_stay_bit_identical_across_tasks(optimizer):
    learner = _learner(density=0.2, update_interval=3, prune_fraction=0.3, gradient_density=0.5,
                       gradient_interval=2)
    batches = _batches()
    snapshots = []
    for task in range(2):
        before = _snapshot(learner)
        params = learner.begin_task(batches)
        if optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
        elif optimizer == "adam":
            opt = torch.optim.Adam(params, lr=0.05, weight_decay=0.1)
        else:
            opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
        for i in range(13):
            _step(learner, opt, batches[i % len(batches)])
        assert learner.updates == [3, 6, 9, 12]
        learner.end_task()
        final = learner.history[-1]
        for n, p in learner.params.items():
            assert torch.equal(p[~final[n]], before[n][~final[n]]), (task, n)  # includes pruned-and-reverted
            assert not torch.equal(p, before[n]), (task, n)  # the mask did train
        snapshots.append(_snapshot(learner))
    first = learner.history[0]
    for n, p in learner.params.items():  # task 0's weights are owned: task 1 never touched them
        assert torch.equal(p[first[n]], snapshots[0][n][first[n]])
        assert not (learner.history[0][n] & learner.history[1][n]).any()


# -- weight density and TDM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_weight_density_is_kept_at_every_update_and_task(scope):
    learner = _learner(density=0.15, scope=scope, update_interval=2, prune_fraction=0.4)
    batches = _batches()
    for _task in range(3):
        opt = torch.optim.AdamW(learner.begin_task(batches), lr=0.05)
        for i in range(9):
            _step(learner, opt, batches[i % len(batches)])
            if scope == "tensor":
                for n, m in learner.masks.items():
                    assert int(m.sum()) == round(0.15 * m.numel()), n
            else:
                total = sum(m.numel() for m in learner.masks.values())
                assert sum(int(m.sum()) for m in learner.masks.values()) == round(0.15 * total)
        assert learner.updates == [2, 4, 6, 8] and learner.regrown and all(r > 0 for r in learner.regrown)
        learner.end_task()
    assert learner.updated_fraction() == pytest.approx([0.15] * 3, abs=0.01)


def test_tdm_prunes_smallest_delta_and_regrows_largest_free_gradient():
    learner = _learner(density=0.25, update_interval=4, prune_fraction=0.25, gradient_density=1.0)
    batches = _batches()
    opt = torch.optim.SGD(learner.begin_task(batches), lr=0.1)
    start = _snapshot(learner)
    for i in range(4):
        _step(learner, opt, batches[i % len(batches)])
    old = {n: m.clone() for n, m in learner.masks.items()}
    weights = _snapshot(learner)
    seen = {}
    _step(learner, opt, batches[0], on_grad=lambda: seen.update(_grads(learner)))  # step 4: an update
    assert learner.updates == [4]
    for n, new in learner.masks.items():
        k = round(0.25 * int(old[n].sum()))
        pruned, grown = old[n] & ~new, new & ~old[n]
        assert int(pruned.sum()) == int(grown.sum()) == k
        delta = (weights[n] - start[n]).abs().masked_fill(~old[n], float("inf")).flatten()
        assert set(torch.nonzero(pruned.flatten()).flatten().tolist()) == set(delta.topk(k, largest=False).indices
                                                                               .tolist())
        grad = seen[n].abs().masked_fill(old[n], -float("inf")).flatten()
        assert set(torch.nonzero(grown.flatten()).flatten().tolist()) == set(grad.topk(k).indices.tolist())
        p = learner.params[n].detach()
        assert torch.equal(p[pruned], start[n][pruned])  # pruned: back to the task-start value, kept there
        assert (p[grown] != start[n][grown]).all()  # regrown: trained in the very step of the update


def test_weight_criterion_prunes_smallest_magnitude():
    learner = _learner(density=0.3, update_interval=2, prune_fraction=0.5, prune_criterion="weight",
                       gradient_density=1.0)
    batches = _batches()
    opt = torch.optim.SGD(learner.begin_task(batches), lr=0.1)
    for i in range(2):
        _step(learner, opt, batches[i])
    old = {n: m.clone() for n, m in learner.masks.items()}
    weights = _snapshot(learner)
    _step(learner, opt, batches[2])
    for n, new in learner.masks.items():
        k = round(0.5 * int(old[n].sum()))
        pruned = (old[n] & ~new).flatten()
        mag = weights[n].abs().masked_fill(~old[n], float("inf")).flatten()
        assert set(torch.nonzero(pruned).flatten().tolist()) == set(mag.topk(k, largest=False).indices.tolist())


def test_ownership_never_prunes_or_regrows_earlier_tasks_weights():
    learner = _learner(density=0.4, update_interval=1, prune_fraction=0.5)
    batches = _batches()
    for _task in range(2):
        opt = torch.optim.AdamW(learner.begin_task(batches), lr=0.05)
        for i in range(6):
            _step(learner, opt, batches[i % len(batches)])
            for n, m in learner.masks.items():
                assert not (m & learner.owned[n]).any()
        learner.end_task()
    # task 2 can find only 20% free weights: it takes all of them and keeps them (nothing free to regrow into)
    opt = torch.optim.AdamW(learner.begin_task(batches), lr=0.05)
    for i in range(3):
        _step(learner, opt, batches[i])
    for n, m in learner.masks.items():
        assert torch.equal(m, ~learner.owned[n])
    assert learner.regrown == [0, 0]


# -- DGM -----------------------------------------------------------------------------------------------------------
def test_gradient_mask_refreshes_exactly_every_n_steps_and_applies_only_the_top_fraction():
    learner = _learner(density=0.5, update_interval=0, gradient_density=0.3, gradient_interval=3)
    batches = _batches(n=5)
    opt = torch.optim.SGD(learner.begin_task(batches), lr=0.1)
    previous, seen = None, {}
    for s in range(11):
        seen.clear()
        before = _snapshot(learner)
        _step(learner, opt, batches[s % len(batches)], on_grad=lambda: seen.update(_grads(learner)))
        current = {n: m.clone() for n, m in learner.grad_masks.items()}
        for n, m in learner.masks.items():
            k = round(0.3 * int(m.sum()))
            assert int(current[n].sum()) == k and not (current[n] & ~m).any()
            changed = learner.params[n].detach() != before[n]
            assert not (changed & ~current[n]).any(), (s, n)  # only gradient-mask entries move
            if s % 3 == 0:  # refresh: the mask is this step's top-k |grad| over the active weights
                top = seen[n].abs().masked_fill(~m, -float("inf")).flatten().topk(k).indices
                assert set(torch.nonzero(current[n].flatten()).flatten().tolist()) == set(top.tolist())
                assert torch.equal(changed, current[n])  # SGD, no momentum: exactly those entries move
            else:
                assert torch.equal(current[n], previous[n]), (s, n)  # no refresh in between
        previous = current
    assert learner.refreshes == [0, 3, 6, 9]
    assert learner.gradient_fraction() == pytest.approx(0.3, abs=0.01)


def test_dgm_with_adamw_keeps_entries_outside_the_gradient_mask_fixed():
    learner = _learner(density=0.5, update_interval=0, gradient_density=0.2, gradient_interval=2)
    batches = _batches()
    opt = torch.optim.AdamW(learner.begin_task(batches), lr=0.05, weight_decay=0.5)
    for s in range(8):
        before = _snapshot(learner)
        _step(learner, opt, batches[s % len(batches)])
        for n, p in learner.params.items():
            keep = ~(learner.masks[n] & learner.grad_masks[n])
            assert torch.equal(p.detach()[keep], before[n][keep])  # Adam momentum and decay cannot leak


def test_head_trains_densely():
    learner = _learner(density=0.1, gradient_density=0.1)
    assert learner.head_name == "4" and "4.weight" not in learner.params
    batches = _batches()
    head = learner.model[4].weight.detach().clone()
    opt = torch.optim.SGD(learner.begin_task(batches), lr=0.1)
    _step(learner, opt, batches[0])
    assert (learner.model[4].weight.detach() != head).all()


# -- determinism -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["gradient", "random"])
def test_deterministic(init):
    def run():
        learner = _learner(_mlp(3), init=init, density=0.2, update_interval=2, gradient_interval=3, seed=5)
        batches = _batches(seed=1)
        opt = torch.optim.AdamW(learner.begin_task(batches), lr=0.05, weight_decay=0.1)
        for i in range(9):
            _step(learner, opt, batches[i % len(batches)])
        learner.end_task()
        return learner.history[0], _snapshot(learner)

    (m1, w1), (m2, w2) = run(), run()
    assert all(torch.equal(m1[n], m2[n]) and torch.equal(w1[n], w2[n]) for n in m1)


# -- forgetting events and data removal ------------------------------------------------------------------------------
def test_forgetting_events_match_a_hand_computed_sequence():
    t = ForgettingTracker(5)
    t.update([0, 1, 2, 3], torch.tensor([True, False, True, False]))
    t.update([0, 1, 2, 3], torch.tensor([False, False, True, True]))  # 0 forgotten
    t.update([0, 1, 2, 3], torch.tensor([True, False, False, True]))  # 2 forgotten
    t.update([3, 0], [False, False])  # 3 and 0 forgotten (any order of indices)
    t.update([4], [False])  # a first observation is never an event
    assert t.counts.tolist() == [2, 0, 1, 1, 0]
    assert t.learned.tolist() == [True, False, True, True, False]
    assert t.observations.tolist() == [4, 3, 3, 4, 1]
    with pytest.raises(ValueError, match="repeat"):
        t.update([1, 1], [True, True])
    with pytest.raises(ValueError, match="indices must be in"):
        t.update([5], [True])
    with pytest.raises(ValueError, match="same length"):
        t.update([0, 1], [True])


def _tracker_with(counts, never_learned=()):
    """A tracker whose examples have the given forgetting counts (learned, except ``never_learned``)."""
    t = ForgettingTracker(len(counts))
    idx = list(range(len(counts)))
    for r in range(max(counts)):
        t.update(idx, [i not in never_learned for i in idx])
        t.update(idx, [i not in never_learned and counts[i] <= r for i in idx])
    if not max(counts):
        t.update(idx, [i not in never_learned for i in idx])
    assert t.counts.tolist() == counts
    return t


def test_data_removal_keeps_never_learned_and_most_forgotten_examples():
    t = _tracker_with([2, 0, 0, 1, 3, 0], never_learned=(1,))
    assert not t.learned[1]
    assert t.keep(0.5).tolist() == [0, 1, 4]  # never learned, 3 events, 2 events; the unforgettable ones go
    assert t.keep(4 / 6).tolist() == [0, 1, 3, 4]
    assert t.keep(1.0).tolist() == list(range(6)) and t.keep(0.0).tolist() == []
    assert t.keep(0.5, among=[2, 3, 5, 1]).tolist() == [1, 3]
    assert t.ranking()[:4].tolist() == [1, 4, 0, 3]


def test_data_removal_breaks_ties_by_a_seeded_order():
    t = _tracker_with([1, 0, 0, 0, 0, 2])
    picks = {tuple(t.keep(0.5, seed=s).tolist()) for s in range(30)}
    assert all(p[:1] == (0,) and p[-1] == 5 and len(p) == 3 for p in picks)  # 0 and 5 always, one tied example
    assert len(picks) > 1  # the tied one depends on the seed...
    assert t.keep(0.5, seed=4).tolist() == t.keep(0.5, seed=4).tolist()  # ...deterministically


def test_removal_schedule_splits_the_fraction_over_stages():
    assert removal_schedule(10, 0.3, (1, 3)) == {1: 8, 3: 7}
    assert removal_schedule(150, 0.5, (2,)) == {2: 75}
    assert removal_schedule(7, 0.0, (1,)) == {1: 7}


# -- config ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"density": 0.0}, "density"),
    ({"update_interval": -1}, "update_interval"),
    ({"update_interval": 2.5}, "update_interval"),
    ({"prune_fraction": 1.0}, "prune_fraction"),
    ({"prune_criterion": "random"}, "prune_criterion"),
    ({"gradient_density": 0.0}, "gradient_density"),
    ({"gradient_density": 1.5}, "gradient_density"),
    ({"gradient_interval": 0}, "gradient_interval"),
    ({"removal_fraction": 1.0}, "removal_fraction"),
    ({"removal_fraction": -0.1}, "removal_fraction"),
    ({"removal_epochs": (2, 1)}, "strictly increasing"),
    ({"removal_epochs": (0,)}, "removal_epochs"),
    ({"removal_epochs": 1}, "removal_epochs"),
    ({"removal_epochs": ()}, "removal_fraction"),
    ({"init": "fisher"}, "init"),
])
def test_bad_config_raises(options, match):
    with pytest.raises(ValueError, match=match):
        SparCLConfig(**options)


def test_config_accepts_a_list_of_epochs():
    assert SparCLConfig(removal_epochs=[1, 3]).removal_epochs == (1, 3)
    assert SparCLConfig(removal_fraction=0.0, removal_epochs=()).removal_epochs == ()


# -- Avalanche -------------------------------------------------------------------------------------------------------
RANDOM_VIT = {"name": "tiny_vit", "options": {"pretrained": False, "dim": 16, "depth": 1, "heads": 2}}


def _strategy(options, epochs=3):
    from avalanche.core import SupervisedPlugin

    from avalanche_merge.benchmarks import BENCHMARKS
    from avalanche_merge.models import BACKBONES
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import make_evaluator, seed_everything
    from avalanche_merge.strategies import METHODS
    from avalanche_merge.strategies.registry import BuildContext, TrainConfig

    class Seen(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.per_epoch = []

        def before_training_epoch(self, strategy, **kwargs):
            self.per_epoch.append(0)

        def after_training_iteration(self, strategy, **kwargs):
            self.per_epoch[-1] += len(strategy.mb_y)

    (plan,) = plan_experiment(load_experiment(tiny_experiment(["sparcl"], model=RANDOM_VIT)))
    bench = BENCHMARKS.get(plan.benchmark).build(plan.benchmark_options, 0)
    seed_everything(0)
    model = BACKBONES.get("tiny_vit").build(plan.model_options, bench, 0)
    seen = Seen()
    ctx = BuildContext(model=model, benchmark=bench, train=TrainConfig(epochs=epochs, batch_size=16, lr=1e-2),
                       evaluator=make_evaluator([]), plugins=[seen])
    strategy = METHODS.get("sparcl").build(ctx, SparCLConfig(**options))
    plugin = next(p for p in strategy.plugins if type(p).__name__ == "SparCLPlugin")
    return strategy, plugin, seen, bench


def test_plugin_removes_the_least_forgotten_examples_and_keeps_masked_weights():
    strategy, plugin, seen, bench = _strategy({"removal_fraction": 0.5, "removal_epochs": (1,), "density": 0.2})
    before = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
    strategy.train(bench.train_stream[0])
    n = len(bench.train_stream[0].dataset)
    assert seen.per_epoch == [n, n // 2, n // 2]  # epochs 2 and 3 train on the kept half only
    assert plugin.passes == [2] and plugin.kept_fractions == [0.5]  # before epoch 1, after epoch 1; none later
    assert plugin.tracker.observations.tolist() == [2] * n
    expected = plugin.tracker.keep(0.5, seed=plugin.config.seed)
    assert torch.equal(plugin.active, expected)
    learner = plugin.learner
    for name, p in learner.params.items():
        mask = learner.history[0][name]
        assert torch.equal(p.detach()[~mask], before[name][~mask]), name
    # the next experience starts again from its full dataset, and stage 1 at the last epoch is skipped
    strategy.train_epochs = 1
    seen.per_epoch.clear()
    strategy.train(bench.train_stream[1])
    assert seen.per_epoch == [len(bench.train_stream[1].dataset)] and plugin.passes == [2, 0]


def test_plugin_without_removal_makes_no_extra_pass():
    strategy, plugin, seen, bench = _strategy({"removal_fraction": 0.0}, epochs=2)
    strategy.train(bench.train_stream[0])
    n = len(bench.train_stream[0].dataset)
    assert seen.per_epoch == [n, n] and plugin.passes == [0] and plugin.kept_fractions == [1.0]


def test_sparcl_method_runs_end_to_end(tmp_path):
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run

    entry = {"name": "sparcl", "options": {"lr": 1e-2, "removal_epochs": [1]}}
    config = tiny_experiment([entry], model=RANDOM_VIT, train={"epochs": 2, "batch_size": 16, "lr": 2e-3})
    (plan,) = plan_experiment(load_experiment(config))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
