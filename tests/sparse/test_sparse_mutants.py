"""Edge cases of the sparse cores found by mutation testing (issue 14): exact values on small inputs."""

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_merge.sparse import density_of, make_sparse_learner, mask_overlap, select_masks
from avalanche_merge.sparse.masks import gradient_scores, random_scores, topk_mask


def _warned_from_this_file(record) -> bool:
    """The warning points at this file (``stacklevel``); not checkable under mutmut, whose trampoline adds a frame."""
    return any(m == "mutmut" or m.startswith("mutmut.") for m in sys.modules) or record[0].filename == __file__


# -- masks.py -------------------------------------------------------------------------------------------------------
def test_nan_scores_are_least_important_per_tensor_and_globally():
    s = {"a": torch.tensor([0.3, float("nan"), -2.0, 0.1])}
    assert select_masks(s, 0.75)["a"].tolist() == [True, False, True, True]
    g = {"a": torch.tensor([float("nan"), -5.0]), "b": torch.tensor([-7.0, float("nan")])}
    masks = select_masks(g, 0.5, scope="global")
    assert masks["a"].tolist() == [False, True] and masks["b"].tolist() == [True, False]


def test_global_scope_never_selects_frozen_entries_even_when_k_exceeds_the_free_ones():
    scores = {"a": torch.tensor([4.0, -1.0, 2.5]), "b": torch.tensor([[0.5, 3.0], [-2.0, 1.5]])}
    frozen = {"a": torch.tensor([True, False, True]), "b": torch.tensor([[False, True], [True, True]])}
    masks = select_masks(scores, 1.0, scope="global", frozen=frozen)
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[True, False], [False, False]]
    # per tensor: a frozen tensor with some free entries keeps only those; an unfrozen one takes its k
    masks = select_masks(scores, 2 / 3, frozen={"a": frozen["a"]})
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[True, True], [False, True]]  # round(2 / 3 * 4) = 3


def test_infinite_scores_are_selectable_and_nan_is_last_per_tensor():
    # +inf is the most important entry, also in a tensor with frozen entries (it used to count as not free)
    masks = select_masks({"a": torch.tensor([float("inf"), 1.0, 2.0, 3.0])}, 1.0,
                         frozen={"a": torch.tensor([False, False, False, True])})
    assert masks["a"].tolist() == [True, True, True, False]
    # without frozen entries every entry is free: density 1 selects NaN and -inf scores too (last)
    s = torch.tensor([float("nan"), -float("inf"), 0.5, float("inf")])
    assert select_masks({"a": s}, 1.0)["a"].tolist() == [True, True, True, True]
    assert select_masks({"a": s}, 0.5)["a"].tolist() == [False, False, True, True]


def test_global_scope_splits_the_chosen_entries_back_over_three_tensors():
    scores = {"a": torch.tensor([0.9, -0.1]), "b": torch.tensor([[0.2, 0.8, -0.4]]), "c": torch.tensor([0.3, 0.7])}
    masks = select_masks(scores, 3 / 7, scope="global")  # top 3: 0.9, 0.8, 0.7
    assert masks["a"].tolist() == [True, False]
    assert masks["b"].tolist() == [[False, True, False]]
    assert masks["c"].tolist() == [False, True]


def test_scores_are_accumulated_in_float32_whatever_the_parameter_dtype():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])) for _ in range(2)]
    scores = gradient_scores(model, {"w": model.weight}, batches)
    assert scores["w"].dtype == torch.float32
    grads = [torch.autograd.grad(F.cross_entropy(model(x), y), model.weight)[0].float() for x, y in batches]
    assert torch.equal(scores["w"], (grads[0] + grads[1]).abs())


def test_topk_mask_of_one_and_of_zero_entries():
    s = torch.tensor([[0.2, -0.7], [1.3, 0.9]])
    assert topk_mask(s, 1).tolist() == [[False, False], [True, False]]
    assert topk_mask(s, 0).tolist() == [[False, False], [False, False]]
    assert topk_mask(s, 3).tolist() == [[True, False], [True, True]]


def test_gradient_scores_restore_requires_grad_and_give_zero_for_unused_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)
    model[0].weight.requires_grad_(False)
    params = {"used": model[0].weight, "unused": model[1].weight}

    def loss(m, batch):
        return F.cross_entropy(m[0](batch[0]), batch[1])

    batches = [(torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))]
    scores = gradient_scores(model, params, batches, loss)
    assert not model[0].weight.requires_grad and not model[1].weight.requires_grad
    assert torch.equal(scores["unused"], torch.zeros(2, 3))
    model[0].weight.requires_grad_(True)
    (g,) = torch.autograd.grad(loss(model, batches[0]), model[0].weight)
    assert torch.allclose(scores["used"], g.abs())
    assert model[0].weight.requires_grad  # a trainable parameter stays trainable
    gradient_scores(model, params, batches, loss)
    assert model[0].weight.requires_grad and not model[1].weight.requires_grad


def test_random_scores_default_seed_is_zero_and_deterministic():
    params = {"w": torch.zeros(3, 4), "v": torch.zeros(5)}
    a, b = random_scores(params), random_scores(params, seed=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(a["w"], torch.rand(3, 4, generator=g)) and torch.equal(a["v"], torch.rand(5, generator=g))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(random_scores(params, seed=1)["w"], a["w"])


def test_overlap_and_density_of_empty_masks_are_zero():
    empty = {"w": torch.zeros(3, dtype=torch.bool)}
    assert mask_overlap(empty, empty) == 0.0
    assert density_of({}) == 0.0
    a = {"w": torch.tensor([True, True, False, False]), "x": torch.tensor([True])}
    b = {"w": torch.tensor([False, True, True, False]), "y": torch.tensor([True])}
    assert mask_overlap(a, b) == pytest.approx(1 / 3)  # only common names: |{1}| / |{0, 1, 2}|
    assert density_of(a) == pytest.approx(3 / 5)


# -- masked.py ------------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _batches(n=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("criterion", ["gradient", "fisher", "change"])
def test_every_data_criterion_needs_batches(criterion):
    learner = make_sparse_learner("masked", _Net(), criterion=criterion)
    with pytest.raises(ValueError, match=f"criterion '{criterion}' needs the task's"):
        learner.begin_task([])


def test_random_masks_use_seed_plus_1000_per_task():
    torch.manual_seed(0)
    learner = make_sparse_learner("masked", _Net(), criterion="random", density=0.25, seed=3, ownership=False)
    for task in range(2):
        learner.begin_task([])
        expected = select_masks(random_scores(learner.params, seed=3 + 1000 * task), 0.25)
        assert all(torch.equal(learner.masks[n], expected[n]) for n in expected), task
        learner.end_task()


def test_change_scores_are_those_of_a_dense_sgd_phase_on_cycled_batches():
    torch.manual_seed(1)
    model = _Net()
    learner = make_sparse_learner("masked", model, criterion="change", dense_steps=5, dense_lr=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = _batches()
    scores = learner._dense_phase_change(batches)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model itself is untouched
    probe = copy.deepcopy(model)
    names = list(learner.params)
    params = dict(probe.named_parameters())
    for step in range(5):
        x, y = batches[step % 3]
        grads = torch.autograd.grad(F.cross_entropy(probe(x), y), [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads, strict=True):
                params[n] -= 0.3 * g
    assert set(scores) == set(names)
    for n in names:
        assert torch.allclose(scores[n], (params[n] - before[n]).abs(), atol=1e-6), n
        assert scores[n].max() > 1e-3


def test_masked_config_bounds():
    assert make_sparse_learner("masked", _Net(), dense_steps=1).config.dense_steps == 1
    for bad in (True, 0, 2.0):
        with pytest.raises(ValueError, match="dense_steps must be an int >= 1"):
            make_sparse_learner("masked", _Net(), dense_steps=bad)
    with pytest.raises(ValueError, match=r"^dense_lr must be in \(0.0, inf\], got 0.0"):
        make_sparse_learner("masked", _Net(), dense_lr=0.0)
    with pytest.raises(ValueError, match="dense_lr"):
        make_sparse_learner("masked", _Net(), dense_lr=-1.0)
    assert make_sparse_learner("masked", _Net(), dense_lr=1e-6).config.dense_lr == 1e-6


@pytest.mark.parametrize("criterion", ["gradient", "fisher", "change"])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_each_criterion_selects_the_top_entries_of_its_own_scores(criterion, scope):
    from avalanche_merge.sparse.masks import fisher_scores

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    learner = make_sparse_learner("masked", model, criterion=criterion, density=0.3, scope=scope, dense_steps=2,
                                  dense_lr=0.5)
    batches = _batches()
    if criterion == "gradient":
        scores = gradient_scores(model, learner.params, batches)
    elif criterion == "fisher":
        scores = fisher_scores(model, learner.params, batches)
    else:
        scores = learner._dense_phase_change(batches)
    expected = select_masks(scores, 0.3, scope=scope)
    learner.begin_task(batches)
    assert all(torch.equal(learner.masks[n], expected[n]) for n in expected)
    if criterion == "gradient":  # the scope matters for these scores on this model
        other = select_masks(scores, 0.3, scope="global" if scope == "tensor" else "tensor")
        assert not all(torch.equal(other[n], expected[n]) for n in expected)


# -- dst.py ---------------------------------------------------------------------------------------------------------
def _dst_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def _dst_train(learner, steps, *, seed=0, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    params = learner.begin_task(batches)
    opt = torch.optim.SGD(params, lr=lr)
    for i in range(steps):
        x, y = batches[i % 3]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(learner.model(x), y).backward()
        learner.after_backward()
        learner.before_step()
        opt.step()
        learner.after_step()


def test_erk_raw_density_of_scalars_single_entries_and_empty_tensors():
    from avalanche_merge.sparse.dst import erk_densities

    dens = erk_densities({"s": (), "w": (3, 5)}, 0.3)  # raw: s 1 (no shape), w 8/15; eps = 0.3 * 16 / (1 + 8)
    assert dens["s"] == pytest.approx(0.3 * 16 / 9) and dens["w"] == pytest.approx(0.3 * 16 / 9 * 8 / 15)
    assert erk_densities({"a": (1,)}, 0.5) == {"a": pytest.approx(0.5)}  # weight sum(shape) * ... = 1
    dens = erk_densities({"e": (0, 3), "w": (4, 4)}, 0.25)  # an empty tensor: raw 1, no entries
    assert dens["w"] == pytest.approx(0.25) and dens["e"] == pytest.approx(0.25 * 16 / 8)
    assert erk_densities({"a": (4, 4), "b": (2, 6)}, 1.0) == {"a": 1.0, "b": 1.0}


def test_erk_densities_validate_density_and_use_partial_caps():
    from avalanche_merge.sparse.dst import erk_densities, layer_counts

    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"^density must be in \(0.0, 1.0\], got {bad}"):
            erk_densities({"a": (4, 4)}, bad)
        with pytest.raises(ValueError, match=rf"^density must be in \(0.0, 1.0\], got {bad}"):
            layer_counts({"a": (4, 4)}, bad, "uniform")
    shapes = {"a": (4, 4), "b": (8, 8)}  # raw 0.5 and 0.25
    free = erk_densities(shapes, 0.2)
    capped = erk_densities(shapes, 0.2, {"a": 0.1})  # 'b' has no cap entry: 1
    assert free["a"] > 0.1 and capped["a"] == 0.1
    assert capped["a"] * 16 + capped["b"] * 64 == pytest.approx(0.2 * 80)


def test_erk_caps_over_two_rounds_keep_the_budget():
    from avalanche_merge.sparse.dst import erk_densities

    shapes = {"t": (2, 2), "s": (3, 3), "m": (3, 8), "b": (10, 12)}
    n = {k: math.prod(s) for k, s in shapes.items()}
    dens = erk_densities(shapes, 0.4)
    # the first round caps t (raw 1); s (raw 2/3) only exceeds 1 once t's budget moved to the others
    eps0 = 0.4 * sum(n.values()) / sum(sum(s) for s in shapes.values())
    assert eps0 * 1.0 > 1 and eps0 * 2 / 3 < 1
    assert dens["t"] == 1.0 and dens["s"] == 1.0
    assert sum(dens[k] * n[k] for k in shapes) == pytest.approx(0.4 * sum(n.values()))
    assert dens["m"] / dens["b"] == pytest.approx((11 / 24) / (22 / 120))


def test_largest_remainder_order_caps_and_several_passes():
    from avalanche_merge.sparse.dst import _largest_remainder

    big = {"a": 100, "b": 100, "c": 100}
    assert _largest_remainder({"a": 2.0, "b": 1.5, "c": 1.5}, 4, big) == {"a": 2, "b": 1, "c": 1}
    assert _largest_remainder({"a": 1.2, "b": 1.7, "c": 0.1}, 3, big) == {"a": 1, "b": 2, "c": 0}
    assert _largest_remainder({"a": 2.1, "b": 0.8}, 3, big) == {"a": 2, "b": 1}
    assert _largest_remainder({"a": 2.0, "b": 0.5}, 3, big) == {"a": 2, "b": 1}
    # 'a' is at its cap: the missing two go to 'b' over two passes
    assert _largest_remainder({"a": 1.9, "b": 0.6}, 3, {"a": 1, "b": 5}) == {"a": 1, "b": 2}


def test_layer_counts_erk_respects_the_free_entries_and_splits_the_rest_by_erk():
    from avalanche_merge.sparse.dst import layer_counts

    shapes = {"s": (4, 4), "m": (10, 10), "b": (50, 50)}
    counts = layer_counts(shapes, 0.2, "erk", {"s": 4, "m": 100, "b": 2500})
    assert counts["s"] == 4 and sum(counts.values()) == round(0.2 * 2616)
    assert abs(counts["m"] - counts["b"] * (20 / 100) / (100 / 2500) * 100 / 2500) <= 1  # ERK: n * raw ~ sum(s)
    assert layer_counts({"e": (0, 4), "w": (4, 4)}, 0.5, "erk") == {"e": 0, "w": 8}


def test_dst_messages_and_end_fraction_floor():
    from avalanche_merge.sparse.dst import DSTConfig

    with pytest.raises(ValueError, match=r"^drop_schedule='cosine' needs end_step"):
        DSTConfig(drop_schedule="cosine")
    learner = make_sparse_learner("set", _dst_mlp(), end_fraction=0.1)
    with pytest.raises(RuntimeError, match=r"^end_fraction needs the task's length"):
        learner.begin_task()
    learner.set_task_steps(5)  # floor(0.5) = 0: at least one step
    assert learner.resolve_end_step() == 1
    rigl = make_sparse_learner("rigl", _dst_mlp(), update_every=1)
    rigl.begin_task()
    with pytest.raises(RuntimeError, match=r"^RigL needs the dense gradient"):
        rigl.update_masks()


def test_initial_topology_of_task_t_is_drawn_from_seed_plus_1000_t():
    from avalanche_merge.sparse.masks import topk_mask

    learner = make_sparse_learner("set", _dst_mlp(), density=0.3, seed=4, ownership=False, update_every=1000)
    for task in range(2):
        learner.begin_task()
        g = torch.Generator().manual_seed(4 + 1000 * task)
        for name, p in learner.params.items():
            expected = topk_mask(torch.rand(p.shape, generator=g), learner.counts[name])
            assert torch.equal(learner.masks[name], expected), (task, name)
        learner.end_task()


def test_without_ownership_every_task_gets_its_erk_counts():
    learner = make_sparse_learner("set", _dst_mlp(), density=0.4, ownership=False, update_every=2)
    for task in range(2):
        _dst_train(learner, 4, seed=task)
        assert {n: int(m.sum()) for n, m in learner.masks.items()} == learner.requested_counts()
        learner.end_task()


def test_ownership_beyond_half_density_never_takes_owned_weights():
    learner = make_sparse_learner("set", _dst_mlp(), density=0.6, update_every=2, on_exhausted="ignore")
    _dst_train(learner, 4)
    learner.end_task()
    first = learner.history[0]
    _dst_train(learner, 4, seed=1)
    for name, m in learner.masks.items():
        assert not (m & first[name]).any(), name
        assert int(m.sum()) == int((~first[name]).sum())  # only the free 40% are left


def test_uniform_init_requests_uniform_counts():
    learner = make_sparse_learner("set", _dst_mlp(), density=0.3, init="uniform")
    assert learner.requested_counts() == {n: round(0.3 * p.numel()) for n, p in learner.params.items()}


def test_dense_gradient_is_kept_only_by_rigl_and_only_for_an_update_step():
    s = make_sparse_learner("set", _dst_mlp(), update_every=1)
    _dst_train(s, 1)
    s.after_backward()  # a backward outside the loop: SET never keeps a dense gradient
    assert s.dense_grads is None
    rigl = make_sparse_learner("rigl", _dst_mlp(), update_every=3, end_step=3)
    _dst_train(rigl, 6)  # updates only at step 3; capturing at another step would fail or leak
    assert [u["step"] for u in rigl.updates] == [3]
    assert rigl.dense_grads is None
    rigl.after_backward()  # step 6: no update is due any more
    assert rigl.dense_grads is None


def test_rigl_with_a_selectable_parameter_without_gradient():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.extra, self.head = nn.Linear(6, 10), nn.Linear(4, 4), nn.Linear(10, 3)

        def forward(self, x):  # extra is selectable but never used: no gradient
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    model = WithUnused()
    learner = make_sparse_learner("rigl", model, update_every=2, density=0.3)
    _dst_train(learner, 4)
    assert [u["step"] for u in learner.updates] == [2, 4]
    assert int(learner.masks["extra.weight"].sum()) == learner.counts["extra.weight"]


def test_set_regrowth_ignores_the_global_random_state():
    def run(global_seed):
        model = _dst_mlp(0)
        learner = make_sparse_learner("set", model, density=0.3, update_every=1, seed=2)
        torch.manual_seed(global_seed)
        _dst_train(learner, 3)
        return learner.masks

    a, b = run(0), run(123)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_rigl_captures_the_dense_gradient_just_before_an_update_step():
    rigl = make_sparse_learner("rigl", _dst_mlp(), update_every=3)
    rigl.begin_task()
    F.cross_entropy(rigl.model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    for step, due in [(0, False), (1, False), (2, True), (3, False), (4, False), (5, True)]:
        rigl.step, rigl.dense_grads = step, None
        rigl.after_backward()  # the step about to run is step + 1
        assert (rigl.dense_grads is not None) == due, step


# -- capacity.py ----------------------------------------------------------------------------------------------------
def test_capacity_message_lists_at_most_four_short_tensors():
    from avalanche_merge.sparse.capacity import capacity_message, task_capacity

    def record(n_short):
        masks = {f"l{i}": torch.tensor([i >= n_short, False]) for i in range(6)}
        return task_capacity(1, 0.5, masks, requested={n: 1 for n in masks})

    six = capacity_message(record(6), 0.5)
    assert "; tensors below it: l0 (0/1), l1 (0/1), l2 (0/1), l3 (0/1) and 2 more. Under ownership" in six
    four = capacity_message(record(4), 0.5)
    assert "; tensors below it: l0 (0/1), l1 (0/1), l2 (0/1), l3 (0/1). Under ownership" in four
    five = capacity_message(record(5), 0.5, max_layers=5)
    assert "l3 (0/1), l4 (0/1). Under" in five
    none = capacity_message(record(0), 0.5)
    assert "below min_fraction=0.5. Under ownership" in none and "tensors below it" not in none


def test_capacity_warning_points_at_the_caller_of_begin_task():
    from avalanche_merge.sparse.capacity import CapacityWarning

    learner = make_sparse_learner("masked", _Net(), density=0.7, criterion="random", train_head=False)
    learner.begin_task()
    learner.end_task()
    with pytest.warns(CapacityWarning, match="task 1 got") as record:
        learner.begin_task()
    assert _warned_from_this_file(record)


def test_forecast_and_full_tasks_validate_their_inputs():
    from avalanche_merge.sparse.capacity import full_tasks, ownership_forecast

    for fn in (full_tasks, lambda d: ownership_forecast(d, 3)):
        for bad in (0.0, 1.5):
            with pytest.raises(ValueError, match=rf"^density must be in \(0.0, 1.0\], got {bad}"):
                fn(bad)
    assert full_tasks(1.0) == 1 and ownership_forecast(1.0, 2) == [1.0, 0.0]
    assert ownership_forecast(0.4, 1) == [1.0]
    with pytest.raises(ValueError, match="n_tasks must be an int >= 1, got True"):
        ownership_forecast(0.4, True)


def test_task_capacity_totals_defaults_and_record():
    from avalanche_merge.sparse.capacity import task_capacity

    masks = {"a": torch.tensor([True, False, True, False]), "b": torch.tensor([[True, False], [False, False]])}
    rec = task_capacity(3, 0.3, masks, requested={"a": 4})  # 'b' not requested: 0
    assert rec.layers["b"].requested == 0 and rec.requested == 4  # the sum, not round(0.3 * 8) = 2
    assert rec.density == 0.3 and isinstance(rec.density, float)
    assert rec.short_layers(0.5) == [] and rec.short_layers(0.51) == ["a"]  # a got exactly half
    d = rec.as_dict()
    assert d["granted_density"] == pytest.approx(3 / 8) and d["fraction"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match=r"^owned names tensors without a mask: \['z'\]"):
        task_capacity(0, 0.5, masks, owned={"z": torch.zeros(2, dtype=torch.bool)})


def test_pick_among_smallest_with_nan_scores_per_tensor_and_over_tensors():
    """``largest=False`` (sparcl_update's pruning) with NaN scores, exact picks; global counts across three tensors
    whose offsets matter, and a count of one."""
    from avalanche_merge.sparse.masks import pick_among

    scores = {"a": torch.tensor([[0.3, float("nan")], [-0.7, 0.1]]), "b": torch.tensor([0.25, -0.2, 0.9]),
              "c": torch.tensor([-0.05, 0.6])}
    allowed = {"a": torch.tensor([[True, True], [True, False]]), "b": torch.tensor([True, True, False]),
               "c": torch.tensor([True, True])}
    per = pick_among(scores, allowed, {"a": 2, "b": 1, "c": 1}, largest=False)
    assert per["a"].tolist() == [[True, False], [True, False]]  # -0.7 and 0.3; NaN is the least preferred
    assert per["b"].tolist() == [False, True, False] and per["c"].tolist() == [True, False]
    glob = pick_among(scores, allowed, 3, largest=False)  # over all: -0.7 (a), -0.2 (b), -0.05 (c)
    assert glob["a"].tolist() == [[False, False], [True, False]]
    assert glob["b"].tolist() == [False, True, False] and glob["c"].tolist() == [True, False]
    top1 = pick_among(scores, allowed, 1)  # largest allowed over all: 0.6 in c (0.9 in b is not allowed)
    assert [int(m.sum()) for m in top1.values()] == [0, 0, 1] and top1["c"].tolist() == [False, True]
    nan_only = pick_among({"a": torch.tensor([float("nan"), 0.5])}, {"a": torch.tensor([True, True])}, 1,
                          largest=False)
    assert nan_only["a"].tolist() == [False, True]
