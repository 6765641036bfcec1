"""Ownership capacity: per-task accounting of the requested and granted update budget, the on_exhausted policy."""

import warnings

import pytest
import torch
from torch import nn

from avalanche_merge.sparse import make_sparse_learner
from avalanche_merge.sparse.capacity import (
    CapacityExhaustedError,
    CapacityWarning,
    LayerCapacity,
    check_capacity,
    full_tasks,
    ownership_forecast,
    task_capacity,
)
from avalanche_merge.sparse.learner import SparseConfig


def _two_layers(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))  # weights of 20 and 10 entries


def _run_tasks(learner, n):
    """Start and end ``n`` tasks without training (the masks and ownership are what matter here)."""
    for _ in range(n):
        learner.begin_task()
        learner.end_task()


# -- the pure record ------------------------------------------------------------------------------------------------
def test_task_capacity_by_hand():
    masks = {
        "a": torch.tensor([[True, False, False], [False, True, False]]),  # 2 of 6 granted
        "b": torch.tensor([False, False, False, False]),
    }  # 0 of 4
    owned = {
        "a": torch.tensor([[False, True, True], [True, False, False]]),  # 3 owned -> 3 free
        "b": torch.tensor([True, True, True, True]),
    }  # all owned -> 0 free
    rec = task_capacity(7, 0.5, masks, owned, {"a": 3, "b": 2})
    assert rec.layers == {
        "a": LayerCapacity(numel=6, free=3, requested=3, granted=2),
        "b": LayerCapacity(numel=4, free=0, requested=2, granted=0),
    }
    assert (rec.task, rec.numel, rec.free, rec.requested, rec.granted) == (7, 10, 3, 5, 2)
    assert rec.fraction == pytest.approx(2 / 5)
    assert rec.granted_density == pytest.approx(2 / 10)
    assert rec.layers["a"].fraction == pytest.approx(2 / 3) and rec.layers["b"].fraction == 0.0
    assert rec.short_layers(0.5) == ["b"] and rec.short_layers(0.7) == ["a", "b"]
    d = rec.as_dict()
    assert d["fraction"] == pytest.approx(0.4) and d["layers"]["b"] == {
        "numel": 4,
        "free": 0,
        "requested": 2,
        "granted": 0,
        "fraction": 0.0,
    }
    # a global allocation: no per-tensor request, the total is round(density * N); nothing owned: all free
    glob = task_capacity(0, 0.3, masks)
    assert (glob.requested, glob.free, glob.granted) == (3, 10, 2)
    assert glob.layers["a"].requested is None and glob.layers["a"].fraction is None
    assert glob.fraction == pytest.approx(2 / 3)
    # requesting nothing counts as fully served
    assert task_capacity(0, 0.1, {"a": torch.zeros(3, dtype=torch.bool)}, requested={"a": 0}).fraction == 1.0


def test_task_capacity_rejects_bad_inputs():
    masks = {"a": torch.zeros(2, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="owned mask of 'a' has shape"):
        task_capacity(0, 0.5, masks, {"a": torch.zeros(3, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"requested names tensors without a mask: \['z'\]"):
        task_capacity(0, 0.5, masks, requested={"a": 1, "z": 1})
    with pytest.raises(ValueError, match="must be bool"):
        task_capacity(0, 0.5, {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"density must be in \(0.0, 1.0\]"):
        task_capacity(0, 0.0, masks)


# -- the learner's accounting ---------------------------------------------------------------------------------------
def test_masked_learner_accounting_is_exact_per_task_and_layer():
    # density 0.3 per tensor: each task asks for round(0.3 * 20) = 6 and round(0.3 * 10) = 3 entries.
    # Tasks 0-2 get them; task 3 finds 20 - 18 = 2 and 10 - 9 = 1 free; task 4 finds none.
    learner = make_sparse_learner(
        "masked", _two_layers(), density=0.3, criterion="random", train_head=False, on_exhausted="ignore"
    )
    _run_tasks(learner, 5)
    expected_free = [(20, 10), (14, 7), (8, 4), (2, 1), (0, 0)]
    expected_granted = [(6, 3), (6, 3), (6, 3), (2, 1), (0, 0)]
    for t, rec in enumerate(learner.capacity):
        assert rec.task == t
        assert rec.layers == {
            "0.weight": LayerCapacity(20, expected_free[t][0], 6, expected_granted[t][0]),
            "2.weight": LayerCapacity(10, expected_free[t][1], 3, expected_granted[t][1]),
        }
        assert rec.requested == 9 and rec.granted == sum(expected_granted[t])
    assert [r.fraction for r in learner.capacity] == pytest.approx([1, 1, 1, 3 / 9, 0])
    assert [r.granted_density for r in learner.capacity] == pytest.approx([0.3, 0.3, 0.3, 0.1, 0.0])
    assert learner.updated_fraction() == pytest.approx([0.3, 0.3, 0.3, 0.1, 0.0])  # agrees with the history
    assert [r["granted"] for r in learner.capacity_record()] == [9, 9, 9, 3, 0]


def test_global_scope_accounts_one_request_over_all_tensors():
    # density 0.36 over 30 weights: one request of round(10.8) = 11 per task; task 2 finds 30 - 22 = 8 free
    learner = make_sparse_learner(
        "masked",
        _two_layers(),
        density=0.36,
        scope="global",
        criterion="random",
        train_head=False,
        on_exhausted="ignore",
    )
    _run_tasks(learner, 4)
    assert [(r.requested, r.free, r.granted) for r in learner.capacity] == [
        (11, 30, 11),
        (11, 19, 11),
        (11, 8, 8),
        (11, 0, 0),
    ]
    assert all(layer.requested is None for r in learner.capacity for layer in r.layers.values())
    assert sum(r.layers["0.weight"].granted + r.layers["2.weight"].granted for r in learner.capacity) == 30


def test_without_ownership_every_task_gets_its_full_budget():
    learner = make_sparse_learner(
        "masked",
        _two_layers(),
        density=0.3,
        criterion="random",
        train_head=False,
        ownership=False,
        on_exhausted="error",
    )
    _run_tasks(learner, 5)
    assert [r.fraction for r in learner.capacity] == [1.0] * 5
    assert all(r.free == 30 for r in learner.capacity)


def test_long_stream_warns_naming_the_task_and_fraction():
    learner = make_sparse_learner("masked", _two_layers(), density=0.3, criterion="random", train_head=False)
    _run_tasks(learner, 3)  # tasks 0-2 are fully served: no warning
    with pytest.warns(CapacityWarning, match=r"task 3 got 33\.3% of its requested update budget \(3 of 9 weights"):
        learner.begin_task()
    learner.end_task()
    with pytest.warns(
        CapacityWarning,
        match=r"task 4 got 0\.0% .* tensors below it: 0\.weight \(0/6\), "
        r"2\.weight \(0/3\)",
    ):
        learner.begin_task()


def test_min_fraction_is_compared_with_the_fraction_of_the_request():
    # task 3 gets 1/3 of its request (10% of the weights): above min_fraction 0.3, so only task 4 warns
    learner = make_sparse_learner(
        "masked", _two_layers(), density=0.3, criterion="random", train_head=False, min_fraction=0.3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityWarning)
        _run_tasks(learner, 4)
    with pytest.warns(CapacityWarning, match="task 4 got 0.0%"):
        learner.begin_task()


def test_on_exhausted_error_stops_the_task_and_ignore_stays_silent():
    learner = make_sparse_learner(
        "masked", _two_layers(), density=0.3, criterion="random", train_head=False, on_exhausted="error"
    )
    _run_tasks(learner, 3)
    with pytest.raises(CapacityExhaustedError, match=r"task 3 got 33\.3%.*min_fraction=0\.5"):
        learner.begin_task()
    quiet = make_sparse_learner(
        "masked", _two_layers(), density=0.3, criterion="random", train_head=False, on_exhausted="ignore"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityWarning)
        _run_tasks(quiet, 6)
    assert quiet.capacity[-1].granted == 0


def test_check_capacity_policies_on_a_record():
    rec = task_capacity(2, 0.5, {"a": torch.tensor([True, False, False, False])}, requested={"a": 2})  # 1 of 2
    assert check_capacity(rec, min_fraction=0.5, on_exhausted="error") is False  # 0.5 is not below 0.5
    with pytest.raises(CapacityExhaustedError, match="task 2 got 50.0%"):
        check_capacity(rec, min_fraction=0.6, on_exhausted="error")
    with pytest.warns(CapacityWarning, match="task 2"):
        assert check_capacity(rec, min_fraction=0.6) is True
    with pytest.raises(ValueError, match="on_exhausted must be one of"):
        check_capacity(rec, min_fraction=0.6, on_exhausted="skip")


def test_erk_uses_up_small_layers_first_and_moves_their_budget_to_large_ones():
    torch.manual_seed(0)  # the layers are never called: only their shapes and masks matter
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(200, 200, bias=False))  # 16 and 40,000 entries
    learner = make_sparse_learner("set", model, density=0.2, train_head=False, update_every=1000)
    # ERK: eps = 0.2 * 40016 / (8 + 400) = 19.6 puts the small layer above 1, so it is capped at 16 and the big
    # layer gets the rest of round(0.2 * 40016) = 8003
    assert learner.requested_counts() == {"0.weight": 16, "1.weight": 8003 - 16}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityWarning)  # the task's total stays served: no warning
        _run_tasks(learner, 2)
    first, second = learner.capacity
    assert first.layers == {
        "0.weight": LayerCapacity(16, 16, 16, 16),
        "1.weight": LayerCapacity(40000, 40000, 7987, 7987),
    }
    assert second.layers["0.weight"] == LayerCapacity(16, 0, 16, 0)  # used up by task 0
    assert second.layers["1.weight"] == LayerCapacity(40000, 40000 - 7987, 7987, 8003)  # takes the small share
    assert second.granted == second.requested == 8003 and second.fraction == 1.0
    assert second.short_layers(0.5) == ["0.weight"]


# -- forecast and options -------------------------------------------------------------------------------------------
def test_forecast_and_stream_length_warning():
    assert ownership_forecast(0.3, 5) == pytest.approx([1, 1, 1, 1 / 3, 0])
    assert ownership_forecast(0.1, 12)[9:] == pytest.approx([1, 0, 0])
    assert full_tasks(0.1) == 10 and full_tasks(0.3) == 3 and full_tasks(1.0) == 1
    learner = make_sparse_learner("masked", _two_layers(), density=0.3, criterion="random", train_head=False)
    with pytest.warns(CapacityWarning, match=r"about 3 tasks .* tasks 3\.\.4 of this 5-task stream"):
        learner.set_stream_length(5)
    assert learner.stream_length == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityWarning)
        learner.set_stream_length(3)
        make_sparse_learner("masked", _two_layers(), density=0.3, ownership=False).set_stream_length(12)
        make_sparse_learner("masked", _two_layers(), density=0.3, on_exhausted="ignore").set_stream_length(12)
    with pytest.raises(ValueError, match="n_tasks must be an int >= 1"):
        learner.set_stream_length(0)
    with pytest.raises(ValueError, match="n_tasks must be an int >= 1"):
        ownership_forecast(0.3, 0)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"on_exhausted": "raise"}, r"on_exhausted must be one of \['warn', 'error', 'ignore'\], got 'raise'"),
        ({"min_fraction": 1.5}, r"min_fraction must be in \[0.0, 1.0\], got 1.5"),
        ({"min_fraction": -0.1}, r"min_fraction must be in \[0.0, 1.0\], got -0.1"),
    ],
)
def test_bad_capacity_options_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        SparseConfig(**options)
    with pytest.raises(ValueError, match=match):
        make_sparse_learner("sparcl", _two_layers(), **options)


def test_plugin_reports_capacity_per_experience():
    from avalanche.training import Naive

    from avalanche_merge.benchmarks import build_benchmark
    from avalanche_merge.plugins.sparse import SparsePlugin

    bench = build_benchmark("split_digits", seed=0, n_experiences=5, max_train_per_class=5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
    plugin = SparsePlugin(method="masked", options={"density": 0.45, "criterion": "random", "lr": 0.01})
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=1,
        device="cpu",
        evaluator=None,
        plugins=[plugin],
    )
    assert plugin.method_info() == {"capacity": []}
    with pytest.warns(CapacityWarning, match=r"tasks 2\.\.4 of this 5-task stream"):  # forecast at the start
        strategy.train(bench.scenario.train_stream[0])
    strategy.train(bench.scenario.train_stream[1])
    # the backbone's one selectable weight has 6272 entries: round(0.45 * 6272) = 2822 per task; tasks 0 and 1
    # take 5644, task 2 gets the 628 left (22.3%)
    with pytest.warns(CapacityWarning, match=r"task 2 got 22\.3% of its requested update budget \(628 of 2822"):
        strategy.train(bench.scenario.train_stream[2])
    info = plugin.method_info()["capacity"]
    assert [r["task"] for r in info] == [0, 1, 2]
    assert [r["granted"] for r in info] == [2822, 2822, 628]
    assert [r["requested"] for r in info] == [2822] * 3
    assert list(info[2]["layers"]) == ["1.weight"]
