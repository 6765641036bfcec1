"""SparCL as published: magnitude pruning, TDM (importance prune, random regrowth, schedule), DGM, the config."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_merge.sparse import make_sparse_learner
from avalanche_merge.sparse.sparcl import SparCLConfig, gradient_mask, importance, tdm_densities

NO_DDR = {"removal_fraction": 0.0}


def _mlp(seed=0):
    torch.manual_seed(seed)  # tanh: no dead units, so gradients have no exact ties
    return nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _learner(model=None, **options):
    return make_sparse_learner("sparcl", model if model is not None else _mlp(), **{**NO_DDR, **options})


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


def _ids(mask):
    return set(torch.nonzero(mask.flatten()).flatten().tolist())


# -- importance and schedule -----------------------------------------------------------------------------------------
def test_importance_is_weight_magnitude_plus_lambda_gradient_magnitude():
    w = torch.tensor([[0.5, -2.0], [0.0, 1.0]])
    g = torch.tensor([[-4.0, 1.0], [3.0, -0.5]])
    assert torch.equal(importance(w, g, 0.5), torch.tensor([[2.5, 2.5], [1.5, 1.25]]))
    assert torch.equal(importance(w, None, 0.5), w.abs())
    assert torch.equal(importance(w, g, 0.0), w.abs())


def test_tdm_schedule_of_the_authors_script():
    # sparsity 0.75, bounds 0.75/0.74 then 0.76/0.75 from epoch 5, 0.75/0.75 from epoch 45, every 5 epochs
    sched = {e: tdm_densities(e, density=0.25, regrow_fraction=0.01, every=5, fixed_from=45) for e in range(50)}
    assert sched[0] == (0.25, 0.26)  # a new task: room to grow
    assert all(sched[e] == pytest.approx((0.24, 0.25)) for e in range(5, 45, 5))
    assert sched[45] == (0.25, 0.25)  # fixed: prune to the density, no regrowth
    assert [e for e, s in sched.items() if s is not None] == list(range(0, 50, 5))


# -- the first mask --------------------------------------------------------------------------------------------------
def test_first_task_magnitude_prunes_each_tensor_and_zeroes_the_rest():
    model = _mlp()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = _learner(model, density=0.3)
    assert sorted(learner.params) == ["0.weight", "2.weight"]  # the head ("4") trains densely
    learner.begin_task()
    for n, p in learner.params.items():
        k = round(0.3 * p.numel())
        assert _ids(learner.masks[n]) == set(weights[n].abs().flatten().topk(k).indices.tolist())
        assert torch.equal(p.detach()[learner.masks[n]], weights[n][learner.masks[n]])
        assert (p.detach()[~learner.masks[n]] == 0).all()
    assert torch.equal(model[4].weight, weights["4.weight"]) and model[0].bias.requires_grad


# -- TDM ---------------------------------------------------------------------------------------------------------------
def _grads_like(learner, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in learner.params.items()}


def test_tdm_prunes_by_weight_plus_gradient_importance_and_zeroes_the_pruned():
    learner = _learner(density=0.3, regrow_fraction=0.05, mask_update_every=2, importance_lambda=0.5)
    learner.begin_task()
    learner.begin_epoch()  # epoch 0: prune to 0.30 (nothing to prune), grow to 0.35
    opt = torch.optim.SGD(learner.model.parameters(), lr=0.1)
    for batch in _batches():
        _step(learner, opt, batch)
    learner.begin_epoch()  # epoch 1: no update
    assert [u[0] for u in learner.updates] == [0]
    before = {n: m.clone() for n, m in learner.masks.items()}
    weights = _snapshot(learner)
    grads = _grads_like(learner, 1)
    learner.begin_epoch(grads)  # epoch 2: prune to 0.25 by |w| + 0.5 |g|, grow to 0.30 at random
    assert [u[0] for u in learner.updates] == [0, 2]
    for n, p in learner.params.items():
        keep = round(0.25 * p.numel())
        score = (weights[n].abs() + 0.5 * grads[n].abs()).masked_fill(~before[n], -1.0).flatten()
        kept = set(score.topk(keep).indices.tolist())
        by_weight = set(weights[n].abs().masked_fill(~before[n], -1.0).flatten().topk(keep).indices.tolist())
        assert kept != by_weight  # the gradient term changes the choice here
        pruned = _ids(before[n]) - kept
        assert len(pruned) == int(before[n].sum()) - keep and kept <= _ids(learner.masks[n])
        assert int(learner.masks[n].sum()) == round(0.3 * p.numel())
        flat = p.detach().flatten()
        assert (flat[sorted(_ids(learner.masks[n]) - kept)] == 0).all()  # regrown weights start at zero
        assert (flat[sorted(pruned - _ids(learner.masks[n]))] == 0).all()  # pruned weights are zero
        assert torch.equal(flat[sorted(kept)], weights[n].flatten()[sorted(kept)])
        assert (p.detach()[~learner.masks[n]] == 0).all()


def test_tdm_regrows_at_random_not_by_gradient():
    def update(grads, seed=0):
        learner = _learner(density=0.3, regrow_fraction=0.1, seed=seed)
        learner.begin_task()
        active = {n: m.clone() for n, m in learner.masks.items()}
        learner.begin_epoch(grads(learner))
        return active, learner.masks

    def small(lr):
        return {n: torch.zeros_like(p) for n, p in lr.params.items()}

    def large_on_inactive(lr):  # huge gradients on the inactive weights: a gradient rule would grow exactly there
        return {
            n: torch.where(lr.masks[n], 0.0, 1.0 + torch.arange(p.numel()).view_as(p).float())
            for n, p in lr.params.items()
        }

    active, grown_small = update(small)
    _, grown_large = update(large_on_inactive)
    for n in active:
        new = grown_small[n] & ~active[n]
        assert int(new.sum()) == round(0.1 * new.numel())
        assert torch.equal(new, grown_large[n] & ~active[n])  # the gradient does not choose the regrown weights
        by_gradient = set(
            torch.arange(new.numel()).masked_fill(active[n].flatten(), -1).topk(int(new.sum())).indices.tolist()
        )
        assert _ids(new) != by_gradient
    # and over seeds every inactive weight is regrown about equally often (uniform draws)
    counts = sum((update(small, seed)[1]["2.weight"] & ~active["2.weight"]).float() for seed in range(60))
    free = ~active["2.weight"]
    rate = 0.1 * free.numel() / int(free.sum())
    assert counts[free].mean().item() == pytest.approx(60 * rate, rel=1e-6)
    assert counts[free].max().item() < 60 * rate + 5 * (60 * rate) ** 0.5


def test_density_expands_at_task_start_and_is_fixed_late():
    learner = _learner(density=0.2, regrow_fraction=0.05, mask_update_every=2, mask_fixed_from=4)
    total = sum(p.numel() for p in learner.params.values())

    def density():
        return sum(int(m.sum()) for m in learner.masks.values()) / total

    for _task in range(2):
        learner.begin_task()
        seen = []
        for _epoch in range(6):
            learner.begin_epoch(_grads_like(learner, _epoch))
            seen.append(round(density(), 2))
        assert seen == [0.25, 0.25, 0.2, 0.2, 0.2, 0.2]  # +0.05 at the task start; back at epoch 2; fixed from 4
        assert [u[0] for u in learner.updates] == [0, 2, 4] and learner.updates[-1][2] == 0  # no regrowth at 4
        learner.end_task()
    first, second = learner.history[0]["2.weight"], learner.history[1]["2.weight"]
    assert (first & second).any() and not torch.equal(first, second)  # one shared, moving mask: no ownership


# -- DGM ---------------------------------------------------------------------------------------------------------------
def test_gradient_mask_keeps_the_top_fraction_of_each_tensor_among_active_nonzero_entries():
    masks = {"w": torch.tensor([True, True, True, False, True, True, False, False, True, True])}
    grads = {"w": torch.tensor([0.1, -0.9, 0.3, 5.0, 0.0, -0.2, 4.0, 3.0, 0.5, 0.05])}
    assert _ids(gradient_mask(grads, masks, {"w": 3})["w"]) == {1, 2, 8}
    assert _ids(gradient_mask(grads, masks, {"w": 9})["w"]) == {0, 1, 2, 5, 8, 9}  # a zero gradient is left out


def test_dgm_refreshes_every_n_iterations_of_an_epoch_and_only_its_entries_move():
    learner = _learner(
        density=0.5,
        regrow_fraction=0.0,
        gradient_sparsity=0.8,
        gradient_every=3,
        mask_update_every=1,
        mask_fixed_from=1,
    )
    learner.begin_task()
    opt = torch.optim.SGD(learner.model.parameters(), lr=0.1)
    batches = _batches(n=5)
    previous, seen = None, {}
    for _epoch in range(2):
        learner.begin_epoch()
        for i in range(5):
            before = _snapshot(learner)
            _step(
                learner,
                opt,
                batches[i],
                on_grad=lambda: seen.update({n: p.grad.detach().clone() for n, p in learner.params.items()}),
            )
            current = {n: m.clone() for n, m in learner.grad_masks.items()}
            for n, m in learner.masks.items():
                k = round(0.2 * m.numel())  # 20% of the tensor = 40% of its active half
                changed = learner.params[n].detach() != before[n]
                if i % 3 == 0:
                    top = seen[n].abs().masked_fill(~m, -1.0).flatten().topk(k).indices
                    assert _ids(current[n]) == set(top.tolist())
                else:
                    assert torch.equal(current[n], previous[n])  # the stored mask is applied in between
                assert torch.equal(changed, current[n])  # SGD: exactly the gradient-mask entries move
            previous = current
    assert learner.refreshes == [(0, 0), (0, 3), (1, 0), (1, 3)]  # the count restarts each epoch
    assert learner.gradient_fraction() == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_inactive_weights_stay_zero_and_dgm_holds_under_any_optimizer(optimizer):
    learner = _learner(density=0.3, regrow_fraction=0.05, mask_update_every=2, gradient_sparsity=0.85, gradient_every=2)
    batches = _batches()
    for _task in range(2):
        params = learner.begin_task()
        opt = (
            torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
            if optimizer == "adamw"
            else torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
        )
        for _epoch in range(4):
            learner.begin_epoch({n: p.grad for n, p in learner.params.items()})
            for i in range(4):
                before = _snapshot(learner)
                _step(learner, opt, batches[i])
                for n, p in learner.params.items():
                    assert (p.detach()[~learner.masks[n]] == 0).all()
                    frozen = ~(learner.masks[n] & learner.grad_masks[n])
                    assert torch.equal(p.detach()[frozen], before[n][frozen])  # momentum and decay cannot leak
        learner.end_task()


def test_deterministic():
    def run():
        learner = _learner(_mlp(3), density=0.2, mask_update_every=1, gradient_every=2, seed=5)
        opt = torch.optim.AdamW(learner.begin_task(), lr=0.05)
        for _epoch in range(3):
            learner.begin_epoch({n: p.grad for n, p in learner.params.items()})
            for batch in _batches(seed=1):
                _step(learner, opt, batch)
        return {n: m.clone() for n, m in learner.masks.items()}, _snapshot(learner)

    (m1, w1), (m2, w2) = run(), run()
    assert all(torch.equal(m1[n], m2[n]) and torch.equal(w1[n], w2[n]) for n in m1)


# -- config ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, match",
    [
        ({"density": 0.0}, "density"),
        ({"ownership": True}, "ownership"),
        ({"regrow_fraction": 0.25}, "regrow_fraction"),
        ({"density": 0.995, "regrow_fraction": 0.01}, "density \\+ regrow_fraction"),
        ({"mask_update_every": 0}, "mask_update_every"),
        ({"mask_fixed_from": 0}, "mask_fixed_from"),
        ({"importance_lambda": -1.0}, "importance_lambda"),
        ({"gradient_sparsity": 1.0}, "gradient_sparsity"),
        ({"gradient_every": 0}, "gradient_every"),
        ({"removal_fraction": 1.0}, "removal_fraction"),
        ({"removal_every": 1}, "removal_every"),
        ({"removal_until": 4}, "removal_until"),
    ],
)
def test_bad_config_raises(options, match):
    with pytest.raises(ValueError, match=match):
        SparCLConfig(**options)


def test_check_epochs_refuses_schedules_that_never_run():
    cfg = SparCLConfig()  # the authors' script: updates every 5 epochs, removal stages of 5 epochs
    cfg.check_epochs(6)
    with pytest.raises(ValueError, match="mask_update_every=5 never adjusts the mask"):
        cfg.check_epochs(5)
    with pytest.raises(ValueError, match="removal_every=5 needs at least 6 epochs"):
        SparCLConfig(mask_update_every=1).check_epochs(5)
    SparCLConfig(mask_update_every=1, removal_fraction=0.0).check_epochs(2)
