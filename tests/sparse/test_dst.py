"""Dynamic sparse training (SET, RigL): ERK counts, update schedule, constant density, frozen weights, regrowth."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_experiment
from torch import nn

from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.sparse import make_sparse_learner
from avalanche_merge.sparse.dst import (
    PAPER_SCHEDULES,
    DSTConfig,
    cosine_drop_fraction,
    erk_densities,
    layer_counts,
)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))


def _batches(n=4, seed=0, d=12, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, d, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)]


def _train(learner, batches, steps, opt):
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(learner.model(x), y).backward()
        learner.after_backward()
        learner.before_step()
        opt.step()
        learner.after_step()


def _task(learner, batches, steps, *, lr=0.05, wd=0.0, adamw=True):
    params = learner.begin_task(batches)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd) if adamw else torch.optim.SGD(params, lr=lr)
    _train(learner, batches, steps, opt)
    return opt


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- ERK ------------------------------------------------------------------------------------------------------------
def test_erk_densities_follow_the_formula_and_the_global_density():
    shapes = {"a": (16, 16), "b": (32, 16), "c": (100, 3)}
    dens = erk_densities(shapes, 0.1)
    n = {k: math.prod(s) for k, s in shapes.items()}
    eps = 0.1 * sum(n.values()) / sum(sum(s) for s in shapes.values())  # sum_l eps * (n_in + n_out) = density * N
    for k, s in shapes.items():
        assert dens[k] == pytest.approx(eps * sum(s) / math.prod(s))
    assert sum(dens[k] * n[k] for k in shapes) == pytest.approx(0.1 * sum(n.values()))
    counts = layer_counts(shapes, 0.1)
    assert sum(counts.values()) == round(0.1 * sum(n.values()))  # exact after largest-remainder rounding
    assert all(abs(counts[k] - dens[k] * n[k]) < 1 for k in shapes)


def test_erk_caps_small_layers_at_one_and_redistributes():
    shapes = {"small": (4, 4), "big": (1000, 1000)}
    dens = erk_densities(shapes, 0.1)
    assert dens["small"] == 1.0  # eps * 8 / 16 would exceed 1
    assert dens["big"] == pytest.approx((0.1 * 1_000_016 - 16) / 1_000_000)
    assert layer_counts(shapes, 0.1) == {"small": 16, "big": round(0.1 * 1_000_016) - 16}
    # caps below 1 (ownership) are respected and the rest is redistributed
    counts = layer_counts({"a": (10, 10), "b": (10, 10)}, 0.5, free={"a": 20, "b": 100})
    assert counts == {"a": 20, "b": 80}
    assert layer_counts({"a": (10, 10)}, 0.5, free={"a": 30}) == {"a": 30}  # fewer free than asked: all free ones
    assert layer_counts({"a": (10, 10), "b": (20, 5)}, 0.25, "uniform") == {"a": 25, "b": 25}


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 0.3, 100) == pytest.approx(0.0)
    assert cosine_drop_fraction(150, 0.3, 100) == pytest.approx(0.0)


def test_cosine_drop_fraction_at_several_steps_exactly():
    # RigL (minimum 0): alpha * (1 + cos(pi * t / T)) / 2 with T = 400; cos(pi/4) = sqrt(2)/2, cos(3 pi/4) = -sqrt(2)/2
    r2 = math.sqrt(2) / 2
    assert [cosine_drop_fraction(t, 0.3, 400) for t in (0, 100, 200, 300, 400, 401, 800)] == pytest.approx(
        [0.3, 0.15 * (1 + r2), 0.15, 0.15 * (1 - r2), 0.0, 0.0, 0.0], abs=1e-15)
    # Yildirim et al.'s floor: 0.005 + 0.495 * (1 + cos(pi * t / T)) / 2; cos(2 pi / 5) = (sqrt(5) - 1) / 4
    c = (math.sqrt(5) - 1) / 4
    assert [cosine_drop_fraction(t, 0.5, 1000, 0.005) for t in (0, 400, 500, 600, 1000)] == pytest.approx(
        [0.5, 0.005 + 0.2475 * (1 + c), 0.2525, 0.005 + 0.2475 * (1 - c), 0.005], abs=1e-15)


def test_cosine_drop_fraction_equals_torch_cosine_annealing_as_in_the_papers_code():
    """Yildirim et al.'s code anneals the death rate with torch's CosineAnnealingLR(0.5, T_max, eta_min=0.005),
    stepped once per batch; after t steps its rate is our schedule at step t."""
    T = 60
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T, eta_min=0.005)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(T):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert [cosine_drop_fraction(t, 0.5, T, 0.005) for t in range(T + 1)] == pytest.approx(rates, abs=1e-9)


def test_learner_uses_the_schedule_at_the_update_step_and_stops_at_end_fraction():
    learner = make_sparse_learner("set", _mlp(), density=0.2, update_every=4, drop_fraction=0.5,
                                  drop_fraction_min=0.1, drop_schedule="cosine", end_fraction=0.75, train_head=False)
    learner.set_task_steps(20)  # end = floor(0.75 * 20) = 15: updates at steps 4, 8, 12 (16 is past the end)
    _task(learner, _batches(), 20)
    assert learner.end_step == 15
    assert [u["step"] for u in learner.updates] == [4, 8, 12]
    expected = [0.1 + 0.4 * (1 + math.cos(math.pi * t / 15)) / 2 for t in (4, 8, 12)]
    assert [u["drop_fraction"] for u in learner.updates] == pytest.approx(expected, abs=1e-12)
    learner.end_task()
    learner.set_task_steps(8)  # the next task is shorter: end = 6, one update at step 4
    _task(learner, _batches(seed=1), 8)
    assert learner.end_step == 6 and [u["step"] for u in learner.updates] == [4]
    assert learner.updates[0]["drop_fraction"] == pytest.approx(0.1 + 0.4 * (1 + math.cos(math.pi * 4 / 6)) / 2)


def test_constant_schedule_keeps_the_fraction_and_end_fraction_needs_the_task_length():
    learner = make_sparse_learner("rigl", _mlp(), density=0.2, update_every=3, drop_fraction=0.3, train_head=False,
                                  end_fraction=0.5)
    learner.set_task_steps(13)  # end = floor(6.5) = 6
    _task(learner, _batches(), 13)
    assert learner.end_step == 6
    assert [(u["step"], u["drop_fraction"]) for u in learner.updates] == [(3, 0.3), (6, 0.3)]
    learner.end_task()
    learner.set_task_steps(11)  # end = floor(5.5) = 5: step 6 is past it
    _task(learner, _batches(seed=1), 11)
    assert learner.end_step == 5 and [u["step"] for u in learner.updates] == [3]
    learner.end_task()
    learner.set_task_steps(None)
    with pytest.raises(RuntimeError, match=r"end_fraction needs the task's length: call set_task_steps"):
        learner.begin_task(_batches())
    with pytest.raises(ValueError, match="n_steps must be an int >= 1 or None"):
        learner.set_task_steps(0)


def test_paper_schedules_are_the_papers_values_and_valid():
    assert PAPER_SCHEDULES["yildirim2024"] == {"drop_schedule": "cosine", "drop_fraction": 0.5,
                                               "drop_fraction_min": 0.005, "update_every": 400, "end_fraction": 1.0}
    assert PAPER_SCHEDULES["rigl2020"] == {"drop_schedule": "cosine", "drop_fraction": 0.3, "update_every": 100,
                                           "end_fraction": 0.75}
    for options in PAPER_SCHEDULES.values():
        DSTConfig(**options)
    default = DSTConfig()
    assert (default.drop_schedule, default.drop_fraction, default.update_every, default.end_step,
            default.end_fraction, default.drop_fraction_min) == ("constant", 0.3, 100, None, None, 0.0)


def test_sparse_plugin_passes_the_task_length_for_end_fraction():
    from avalanche.training import Naive

    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.plugins.sparse import SparsePlugin

    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=10)
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    plugin = SparsePlugin(method="set", options={"density": 0.1, "update_every": 1, "drop_schedule": "cosine",
                                                 "end_fraction": 0.5})
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=2, device="cpu",
                     evaluator=None, plugins=[plugin])
    strategy.train(bench.scenario.train_stream[0])
    learner = plugin.learner
    steps_per_epoch = math.ceil(len(bench.scenario.train_stream[0].dataset) / 16)
    assert learner.task_steps == 2 * steps_per_epoch == learner.step
    assert learner.end_step == learner.task_steps // 2
    assert [u["step"] for u in learner.updates] == list(range(1, learner.end_step + 1))
    assert learner.updates[-1]["drop_fraction"] == pytest.approx(0.0, abs=1e-12)


# -- schedule and density -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_masks_change_exactly_every_update_every_steps_at_constant_density(method):
    model = _mlp()
    learner = make_sparse_learner(method, model, density=0.2, update_every=3, drop_fraction=0.3, train_head=False)
    batches = _batches()
    params = learner.begin_task(batches)
    counts = {n: int(m.sum()) for n, m in learner.masks.items()}
    assert counts == learner.counts
    assert sum(counts.values()) == round(0.2 * sum(p.numel() for p in learner.params.values()))
    opt = torch.optim.AdamW(params, lr=0.05)
    previous = {n: m.clone() for n, m in learner.masks.items()}
    for step in range(1, 11):
        _train(learner, batches[step % 4:] + batches[:step % 4], 1, opt)
        changed = any(not torch.equal(previous[n], m) for n, m in learner.masks.items())
        assert changed == (step % 3 == 0), step
        assert {n: int(m.sum()) for n, m in learner.masks.items()} == counts  # exactly constant per layer
        assert all(torch.equal(learner.guard.masks[n], m) for n, m in learner.masks.items())
        previous = {n: m.clone() for n, m in learner.masks.items()}
    assert [u["step"] for u in learner.updates] == [3, 6, 9]
    assert all(u["moved"] > 0 for u in learner.updates)


def test_end_step_and_cosine_schedule_stop_updates():
    learner = make_sparse_learner("set", _mlp(), density=0.2, update_every=2, drop_fraction=0.5,
                                  drop_schedule="cosine", end_step=6, train_head=False)
    _task(learner, _batches(), 10)
    assert [u["step"] for u in learner.updates] == [2, 4, 6]
    assert [u["drop_fraction"] for u in learner.updates] == pytest.approx([0.375, 0.125, 0.0])
    assert learner.updates[-1]["moved"] == 0


# -- frozen entries -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_entries_outside_the_final_mask_and_owned_weights_stay_bit_identical(method):
    model = _mlp()
    learner = make_sparse_learner(method, model, density=0.15, update_every=2, drop_fraction=0.4, train_head=False)
    start = _snapshot(model)
    _task(learner, _batches(seed=0), 9, wd=0.5)  # AdamW with strong decoupled weight decay
    learner.end_task()
    mask0 = learner.history[0]
    after0 = _snapshot(model)
    for name, m in mask0.items():
        # dropped weights were reset: the task changed the model only on its final mask
        assert torch.equal(after0[name][~m], start[name][~m]), name
        assert not torch.equal(after0[name][m], start[name][m]), name
    for name in ("0.bias", "2.bias", "4.bias"):
        assert torch.equal(after0[name], start[name])
    opt = _task(learner, _batches(seed=1), 9, wd=0.5)
    assert len(learner.updates) == 4
    for name, m in mask0.items():
        assert not (learner.masks[name] & m).any()  # never regrown into owned entries
        p = learner.params[name].detach()
        assert torch.equal(p[m], after0[name][m]), name  # task 0's weights bit-identical through task 1
        assert torch.equal(p[~m & ~learner.masks[name]], after0[name][~m & ~learner.masks[name]]), name
    assert isinstance(opt, torch.optim.AdamW)
    learner.end_task()
    assert learner.overlap_matrix()[0][1] == 0.0
    assert learner.updated_fraction() == pytest.approx([0.15, 0.15], abs=0.002)


def test_entries_outside_the_current_mask_do_not_move_between_updates():
    model = _mlp()
    learner = make_sparse_learner("rigl", model, density=0.1, update_every=5, train_head=False)
    batches = _batches()
    opt = torch.optim.AdamW(learner.begin_task(batches), lr=0.1, weight_decay=0.3)
    for _ in range(12):
        before = _snapshot(model)
        masks = {n: m.clone() for n, m in learner.masks.items()}
        n_updates = len(learner.updates)
        _train(learner, batches, 1, opt)
        if len(learner.updates) == n_updates:  # no mask update at this step
            for name, m in masks.items():
                assert torch.equal(learner.params[name].detach()[~m], before[name][~m]), name


def test_regrown_weights_start_from_their_start_value_and_dropped_ones_are_reset():
    model = _mlp()
    learner = make_sparse_learner("set", model, density=0.2, update_every=4, drop_fraction=0.5, train_head=False)
    start = _snapshot(model)
    batches = _batches()
    opt = torch.optim.SGD(learner.begin_task(batches), lr=0.5)
    _train(learner, batches, 3, opt)
    old = {n: m.clone() for n, m in learner.masks.items()}
    _train(learner, batches, 1, opt)  # step 4: update
    assert len(learner.updates) == 1
    for name, m in learner.masks.items():
        p = learner.params[name].detach()
        assert torch.equal(p[old[name] & ~m], start[name][old[name] & ~m])  # dropped: reset
        assert torch.equal(p[m & ~old[name]], start[name][m & ~old[name]])  # regrown: start value


def test_rigl_regrows_the_largest_dense_gradient_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    learner = make_sparse_learner("rigl", model, density=0.25, init="uniform", update_every=1, drop_fraction=0.5,
                                  head="1")
    learner.begin_task()
    name = "0.weight"
    w = learner.params[name]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, :] = True  # active: the first row
    learner.masks[name] = mask
    learner.guard = type(learner.guard)(learner.params, learner.masks)
    with torch.no_grad():
        w.copy_(learner.start[name])
        w[0] += torch.tensor([0.5, 0.01, 0.3, 0.02])  # changes: entries 1 and 3 are the smallest -> dropped
    grad = torch.zeros(4, 4)
    grad[2, 1], grad[3, 3], grad[1, 0] = 5.0, -7.0, 1.0  # largest |g| among inactive: (3, 3) and (2, 1)
    grad[0, 0] = 100.0  # a kept active entry: not a candidate
    w.grad = grad.clone()
    learner.after_backward()
    assert torch.equal(w.grad[~mask], torch.zeros(12))  # the guard still masks the gradient
    assert torch.equal(learner.dense_grads[name], grad)  # captured before masking
    learner.step = 0
    learner.update_masks()
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[0, 2] = expected[3, 3] = expected[2, 1] = True
    assert torch.equal(learner.masks[name], expected)
    assert torch.equal(learner.guard.masks[name], expected)  # the guard uses the new mask
    assert torch.equal(w[0, [1, 3]], learner.start[name][0, [1, 3]])  # dropped: reset to their start value
    assert torch.equal(w[0, [0, 2]], learner.start[name][0, [0, 2]] + torch.tensor([0.5, 0.3]))  # kept


def test_rigl_may_regrow_a_just_dropped_entry():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    learner = make_sparse_learner("rigl", model, density=0.25, init="uniform", update_every=1, drop_fraction=0.5,
                                  head="1")
    learner.begin_task()
    name, w = "0.weight", learner.params["0.weight"]
    learner.masks[name] = torch.zeros(4, 4, dtype=torch.bool)
    learner.masks[name][0, :] = True
    learner.guard = type(learner.guard)(learner.params, learner.masks)
    with torch.no_grad():
        w[0] += torch.tensor([0.5, 0.01, 0.3, 0.02])
    changed = w.detach().clone()
    grad = torch.zeros(4, 4)
    grad[0, 1], grad[3, 3] = 100.0, 7.0  # (0, 1) is dropped (small change) but has the largest |g|: regrown
    w.grad = grad
    learner.after_backward()
    learner.update_masks()
    assert learner.masks[name].nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [3, 3]]
    assert torch.equal(w[0, :3], changed[0, :3])  # dropped and regrown at once: its change is kept (as RigL)
    assert w[0, 3] == learner.start[name][0, 3]


def test_same_seed_same_masks_and_weights_other_seed_differs():
    def run(method, seed):
        model = _mlp()
        learner = make_sparse_learner(method, model, density=0.2, update_every=2, seed=seed)
        _task(learner, _batches(), 7)
        return learner.masks, _snapshot(model)

    for method in ("set", "rigl"):
        (m1, w1), (m2, w2), (m3, _) = run(method, 0), run(method, 0), run(method, 1)
        assert all(torch.equal(m1[n], m2[n]) for n in m1) and all(torch.equal(w1[n], w2[n]) for n in w1)
        assert any(not torch.equal(m1[n], m3[n]) for n in m1)


def test_tiny_vit_erk_counts_and_update():
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))
    learner = make_sparse_learner("rigl", model, density=0.1, update_every=2)
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 4, (4,))) for _ in range(2)]
    start = _snapshot(model)
    _task(learner, batches, 4)
    n = {k: p.numel() for k, p in learner.params.items()}
    assert sum(learner.counts.values()) == round(0.1 * sum(n.values()))
    eps = 0.1 * sum(n.values()) / sum(sum(p.shape) for p in learner.params.values())
    for name, p in learner.params.items():  # ERK: count_l ~ eps * (n_in + n_out)
        assert abs(learner.counts[name] - eps * sum(p.shape)) < 1, name
        assert int(learner.masks[name].sum()) == learner.counts[name]
    assert len(learner.updates) == 2
    assert not torch.equal(model.head.weight, start["head.weight"])  # head trains densely
    assert torch.equal(model.norm.weight, start["norm.weight"])


@pytest.mark.parametrize(("options", "match"), [
    ({"update_every": 0}, r"update_every must be an int >= 1, got 0"),
    ({"update_every": 2.5}, r"update_every must be an int >= 1, got 2.5"),
    ({"drop_fraction": 0.0}, r"drop_fraction must be in \(0.0, 1.0\), got 0.0"),
    ({"drop_fraction": 1.0}, r"drop_fraction must be in \(0.0, 1.0\), got 1.0"),
    ({"init": "er"}, r"init must be one of \['erk', 'uniform'\], got 'er'"),
    ({"drop_schedule": "linear"}, r"drop_schedule must be one of"),
    ({"drop_schedule": "cosine"}, r"needs end_step \(an int >= 1\) or end_fraction"),
    ({"end_step": 5, "end_fraction": 0.5}, r"give end_step or end_fraction, not both"),
    ({"end_fraction": 0.0}, r"end_fraction must be in \(0.0, 1.0\], got 0.0"),
    ({"end_fraction": 1.5}, r"end_fraction must be in \(0.0, 1.0\], got 1.5"),
    ({"drop_fraction_min": 0.3}, r"drop_fraction_min must be in \[0.0, 0.3\), got 0.3"),
    ({"drop_fraction_min": -0.01}, r"drop_fraction_min must be in"),
    ({"end_step": 0}, r"end_step must be an int >= 1, got 0"),
    ({"drop_by": "gradient"}, r"drop_by must be one of"),
    ({"scope": "global"}, r"scope must be 'tensor'"),
    ({"density": 0.0}, r"density"),
])
def test_bad_configs_raise(options, match):
    with pytest.raises(ValueError, match=match):
        DSTConfig(**options)


def test_rigl_without_after_backward_raises():
    learner = make_sparse_learner("rigl", _mlp(), update_every=1)
    learner.begin_task()
    with pytest.raises(RuntimeError, match="dense gradient"):
        learner.update_masks()


def test_dst_rigl_runs_in_avalanche(tmp_path):
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run

    entry = {"name": "dst_rigl", "options": {"update_every": 4, "drop_fraction": 0.3}}
    (plan,) = plan_experiment(load_experiment(tiny_experiment([entry])))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and np.all((R >= 0) & (R <= 1))


def test_sparse_plugin_drives_set_inside_naive():
    from avalanche.training import Naive

    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.plugins.sparse import SparsePlugin

    bench = build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=10)
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    plugin = SparsePlugin(method="set", options={"density": 0.1, "update_every": 2})
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, device="cpu",
                     evaluator=None, plugins=[plugin])
    start = _snapshot(model)
    strategy.train(bench.scenario.train_stream[0])
    learner, mask = plugin.learner, plugin.learner.history[0]
    assert [u["step"] for u in learner.updates] == list(range(2, learner.step + 1, 2)) and learner.updates
    after0 = _snapshot(model)
    for name, m in mask.items():
        assert torch.equal(after0[name][~m], start[name][~m]), name
    strategy.train(bench.scenario.train_stream[1])
    for name, m in mask.items():
        assert torch.equal(learner.params[name].detach()[m], after0[name][m]), name
    assert learner.updated_fraction() == pytest.approx([0.1, 0.1], abs=0.002)
