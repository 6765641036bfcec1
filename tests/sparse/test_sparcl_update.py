"""``sparcl_update``: prune/regrow of the task update, top-k gradient masks and their refresh schedule, ownership."""

import numpy as np
import pytest
import torch
from conftest import tiny_experiment
from test_sparcl import _snapshot, _step
from torch import nn

from avalanche_merge.sparse import make_sparse_learner
from avalanche_merge.sparse.sparcl_update import SparCLUpdateConfig


def _mlp(seed=0):
    torch.manual_seed(seed)  # tanh: no dead units, so gradients and weight changes have no exact ties
    return nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _grads(learner):
    return {n: p.grad.detach().clone() for n, p in learner.params.items()}


def _learner(model=None, **options):
    return make_sparse_learner("sparcl_update", model if model is not None else _mlp(), **options)


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
    ({"init": "fisher"}, "init"),
])
def test_bad_config_raises(options, match):
    with pytest.raises(ValueError, match=match):
        SparCLUpdateConfig(**options)


# -- Avalanche -------------------------------------------------------------------------------------------------------
RANDOM_VIT = {"name": "tiny_vit", "options": {"pretrained": False, "dim": 16, "depth": 1, "heads": 2}}


def test_sparcl_update_method_runs_end_to_end_and_keeps_unmasked_weights(tmp_path):
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run
    from avalanche_merge.strategies import METHODS

    spec = METHODS.get("sparcl_update")
    assert spec.base == "naive" and spec.in_bench and spec.protocol == "shared"
    entry = {"name": "sparcl_update", "options": {"lr": 1e-2}}
    config = tiny_experiment([entry], model=RANDOM_VIT, train={"epochs": 2, "batch_size": 16, "lr": 2e-3})
    (plan,) = plan_experiment(load_experiment(config))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))
