"""Continual mergers and make_merger: equality with the offline merges, state, errors."""

import pytest
import torch

from avalanche_merge.merging import (
    CONTINUAL_MERGERS,
    OPCM,
    ContinualAverage,
    ContinualTaskArithmetic,
    ContinualTIES,
    MagMax,
    OfflineMerger,
    TaskVector,
    average,
    list_mergers,
    magmax,
    make_merger,
    merge_sequentially,
    task_arithmetic,
    ties,
)

SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 6)}


def _tvs(n=4, seed=0):
    torch.manual_seed(seed)
    return [TaskVector({k: torch.randn(s) for k, s in SHAPES.items()}) for _ in range(n)]


def _close(a: TaskVector, b: TaskVector, atol=1e-6):
    assert a.keys() == b.keys()
    for k in b:
        assert torch.allclose(a[k], b[k], atol=atol), k


def _equal(a: TaskVector, b: TaskVector):
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("scaling", [0.3, 1.0, 2.5])
def test_continual_task_arithmetic_is_scaled_sum_after_every_step(scaling):
    tvs = _tvs()
    merger = ContinualTaskArithmetic(scaling=scaling)
    for t, tv in enumerate(tvs, start=1):
        out = merger.update(tv)
        _close(out, task_arithmetic(tvs[:t]) * scaling)
        _close(merger.merged, out)
        assert merger.num_tasks == t


def test_continual_average_is_the_mean_after_every_step():
    tvs = _tvs(5)
    merger = ContinualAverage()
    for t, tv in enumerate(tvs, start=1):
        _close(merger.update(tv), average(tvs[:t]))


def test_magmax_running_equals_offline_magmax():
    tvs = _tvs(4)
    merger = MagMax(scaling=1.0)
    for t, tv in enumerate(tvs, start=1):
        _equal(merger.update(tv), magmax(tvs[:t]))
    _close(MagMax(scaling=0.5).update(tvs[0]), tvs[0] * 0.5)


def test_magmax_keeps_the_entry_of_largest_magnitude():
    a = TaskVector({"w": torch.tensor([1.0, -5.0, 2.0, 0.0])})
    b = TaskVector({"w": torch.tensor([-3.0, 4.0, 2.0, 0.5])})
    c = TaskVector({"w": torch.tensor([2.0, 1.0, -7.0, -0.25])})
    merger = MagMax(scaling=1.0)
    merge_sequentially(merger, [a, b, c])
    assert torch.equal(merger.merged["w"], torch.tensor([-3.0, -5.0, -7.0, 0.5]))
    stacked = torch.stack([a["w"], b["w"], c["w"]])
    idx = stacked.abs().argmax(dim=0)
    assert torch.equal(merger.merged["w"], stacked.gather(0, idx[None])[0])
    # the running state does not alias the inputs
    assert torch.equal(a["w"], torch.tensor([1.0, -5.0, 2.0, 0.0]))


def test_continual_ties_follows_the_published_recursion():
    tvs = _tvs(3)
    s, density = 0.5, 0.3
    merger = ContinualTIES(density=density, scaling=s)
    m1 = merger.update(tvs[0])
    _close(m1, tvs[0] * s)
    m2 = merger.update(tvs[1])
    ref2 = m1 + ties([m1, tvs[1]], density=density, trim_scope="model", merge_func="sum") * s
    _close(m2, ref2)
    m3 = merger.update(tvs[2])
    ref3 = m2 + ties([m2, tvs[2]], density=density, trim_scope="model", merge_func="sum") * s
    _close(m3, ref3)


def test_continual_ties_options_are_passed_on():
    tvs = _tvs(2)
    merger = ContinualTIES(density=0.5, scaling=0.8, trim_scope="tensor", merge_func="mean", sign_method="frequency")
    m1 = merger.update(tvs[0])
    ref = m1 + ties([m1, tvs[1]], density=0.5, trim_scope="tensor", merge_func="mean", sign_method="frequency") * 0.8
    _close(merger.update(tvs[1]), ref)


def test_offline_merger_reruns_ties_over_all_task_vectors():
    tvs = _tvs(4)
    merger = make_merger("ties", density=0.5, scaling=0.7)
    assert isinstance(merger, OfflineMerger)
    for t, tv in enumerate(tvs, start=1):
        _close(merger.update(tv), ties(tvs[:t], density=0.5) * 0.7)
        assert merger.stored_task_vectors == t


@pytest.mark.parametrize("name", sorted(CONTINUAL_MERGERS.names()))
def test_online_mergers_store_one_task_vector(name):
    merger = make_merger(name)
    for tv in _tvs(3):
        merger.update(tv)
        assert merger.stored_task_vectors == 1
    assert merger.num_tasks == 3


def test_make_merger_builds_the_registered_classes():
    assert isinstance(make_merger("opcm", alpha=0.3), OPCM)
    assert make_merger("opcm", alpha=0.3).alpha == 0.3
    assert isinstance(make_merger("continual_task_arithmetic", scaling=0.4), ContinualTaskArithmetic)
    assert isinstance(make_merger("continual_average"), ContinualAverage)
    assert isinstance(make_merger("continual_ties"), ContinualTIES)
    assert isinstance(make_merger("magmax_running"), MagMax)
    names = list_mergers()
    for n in ("opcm", "continual_ties", "ties", "tsv", "iso_c", "iso_cts", "magmax", "dare"):
        assert n in names


def test_make_merger_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        make_merger("nope")
    msg = str(info.value)
    assert "'nope'" in msg
    for n in ("opcm", "continual_task_arithmetic", "ties", "tsv"):
        assert n in msg


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("continual_task_arithmetic", {"scaling": 0}, "scaling"),
        ("continual_task_arithmetic", {"scaling": -1}, "scaling"),
        ("magmax_running", {"scaling": 0}, "scaling"),
        ("continual_ties", {"scaling": -1}, "scaling"),
        ("continual_ties", {"density": 0}, "density"),
        ("continual_ties", {"density": 1.5}, "density"),
        ("continual_ties", {"trim_scope": "layer"}, "trim_scope"),
        ("continual_ties", {"merge_func": "max"}, "merge_func"),
        ("opcm", {"alpha": 1.5}, "alpha"),
        ("opcm", {"alpha": -0.1}, "alpha"),
        ("ties", {"scaling": 0}, "scaling"),
        ("tsv", {"scaling": -1}, "scaling"),
    ],
)
def test_make_merger_rejects_bad_option_values(name, options, field):
    with pytest.raises(ValueError, match=field):
        make_merger(name, **options)


@pytest.mark.parametrize("name", ["opcm", "continual_ties", "continual_average", "magmax_running"])
def test_make_merger_rejects_unknown_options(name):
    with pytest.raises(TypeError, match="bogus"):
        make_merger(name, bogus=1)


@pytest.mark.parametrize(("options", "error"), [({"bogus": 1}, TypeError), ({"density": 0}, ValueError)])
def test_make_merger_validates_offline_merge_options_up_front(options, error):
    with pytest.raises(error):
        make_merger("ties", **options)


def test_offline_merger_rejects_a_non_callable_merge():
    with pytest.raises(TypeError, match="merge must be callable"):
        OfflineMerger(merge="ties")


@pytest.mark.parametrize("name", [*sorted(CONTINUAL_MERGERS.names()), "ties", "tsv"])
def test_merged_before_any_update_raises(name):
    merger = make_merger(name)
    with pytest.raises(RuntimeError, match="update"):
        _ = merger.merged


@pytest.mark.parametrize("name", [*sorted(CONTINUAL_MERGERS.names()), "ties"])
def test_update_checks_its_input(name):
    merger = make_merger(name)
    with pytest.raises(TypeError, match="TaskVector"):
        merger.update({"a.weight": torch.zeros(6, 5)})
    assert merger.num_tasks == 0
    tvs = _tvs(1)
    merger.update(tvs[0])
    bad = TaskVector({"a.weight": torch.zeros(6, 5), "a.bias": torch.zeros(6)})
    with pytest.raises(ValueError, match="'b.weight'"):
        merger.update(bad)
    reshaped = TaskVector({"a.weight": torch.zeros(5, 6), "a.bias": torch.zeros(6), "b.weight": torch.zeros(3, 6)})
    with pytest.raises(ValueError, match="'a.weight'"):
        merger.update(reshaped)
    assert merger.num_tasks == 1


@pytest.mark.parametrize("merger", [ContinualAverage(), OPCM(), MagMax(scaling=1.0),
                                    ContinualTaskArithmetic(scaling=1.0), make_merger("magmax", scaling=1.0)])
def test_merging_one_task_vector_returns_it(merger):
    (tv,) = _tvs(1)
    _close(merger.update(tv), tv, atol=1e-7)


@pytest.mark.parametrize("name", [*sorted(CONTINUAL_MERGERS.names()), "ties", "magmax", "tsv", "iso_c"])
def test_zero_task_vectors_merge_to_zero(name):
    merger = make_merger(name)
    for tv in _tvs(3):
        out = merger.update(TaskVector.zeros_like(tv))
    assert out.norm() == 0.0
    for k, s in SHAPES.items():
        assert out[k].shape == s


def test_merge_sequentially_returns_every_step():
    tvs = _tvs(3)
    steps = merge_sequentially(ContinualAverage(), tvs)
    assert len(steps) == 3
    for t, step in enumerate(steps, start=1):
        _close(step, average(tvs[:t]))


def test_updates_do_not_modify_inputs_or_earlier_results():
    tvs = _tvs(3)
    before = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    for name in [*CONTINUAL_MERGERS.names(), "ties"]:
        merger = make_merger(name)
        first = merger.update(tvs[0])
        first_copy = {k: v.clone() for k, v in first.items()}
        for tv in tvs[1:]:
            merger.update(tv)
        for k in SHAPES:
            assert torch.equal(first[k], first_copy[k]), (name, k)
    for tv, b in zip(tvs, before):
        for k in SHAPES:
            assert torch.equal(tv[k], b[k])


def test_cli_method_names_are_the_same_mergers_as_the_cli():
    """One name, one meaning (issue 16): the CLI's merging method names build the CLI's merger at its defaults;
    'magmax' is MagMax (running max magnitude, scaling 0.5), which equals the offline max-magnitude merge of every
    task vector so far scaled by 0.5."""
    from avalanche_merge.merging import magmax

    assert isinstance(make_merger("continual_ta"), ContinualTaskArithmetic)
    assert make_merger("continual_ta").scaling == 0.3
    assert isinstance(make_merger("continual_avg"), ContinualAverage)
    running = make_merger("magmax")
    assert isinstance(running, MagMax) and running.scaling == 0.5
    tvs = _tvs(3)
    for t, tv in enumerate(tvs, start=1):
        out = running.update(tv)
        _close(out, magmax(tvs[:t]) * 0.5, atol=1e-6)


def test_unknown_continual_merger_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'alhpa'.*valid options: \['alpha', 'linear', 'project'\]"):
        make_merger("opcm", alhpa=0.3)
def test_continual_ema_is_the_weight_ema():
    # m_t = (1 - w) m_{t-1} + w tau_t from m_0 = 0: the closed form sum_t w (1 - w)^(T - t) tau_t
    from avalanche_merge.merging import ContinualEMA

    tvs, w = _tvs(3), 0.3
    merged = merge_sequentially(ContinualEMA(weight=w), tvs)[-1]
    expected = tvs[0] * (w * (1 - w) ** 2) + tvs[1] * (w * (1 - w)) + tvs[2] * w
    _close(merged, expected)
    # the newest task gets weight w, not 1 - w (a swapped interpolation would give it 0.7 here)
    _close(merge_sequentially(ContinualEMA(weight=w), tvs[:1])[-1], tvs[0] * w)
    assert isinstance(make_merger("continual_ema", weight=0.5), ContinualEMA)
    with pytest.raises(ValueError, match="weight"):
        ContinualEMA(weight=0.0)


def test_continual_ema_method_trains_from_the_merged_weights():
    from avalanche_merge.strategies import METHODS

    cfg = METHODS.get("continual_ema").config_cls()
    assert cfg.start == "merged" and cfg.merger_options() == {"weight": 0.5}
