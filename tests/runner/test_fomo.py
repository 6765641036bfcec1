"""The ``fomo`` experiment option (FoMo-in-Flux, Roth et al. 2024): identity, validation, orderings, budget."""

import numpy as np
import pytest
from conftest import tiny_experiment

from avalanche_merge.config import ConfigError
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.runner.fomo import reorder_benchmark, stream_order
from avalanche_merge.runner.run import execute_run

FOMO = {"held_out_domains": ["identity", "invert"], "held_out_samples": 20}


def _plan(methods=("naive",), **fomo):
    cfg = tiny_experiment(list(methods), fomo={**FOMO, **fomo}) if fomo is not None else tiny_experiment(methods)
    return plan_experiment(load_experiment(cfg))


def test_run_identity_is_unchanged_without_fomo_and_changes_with_it():
    plain = plan_experiment(load_experiment(tiny_experiment(["naive"])))[0]
    assert "fomo" not in plain.describe()
    with_fomo = _plan()[0]
    assert with_fomo.describe()["fomo"]["held_out_domains"] == ["identity", "invert"]
    assert with_fomo.run_id != plain.run_id
    assert _plan(budget={"reference_steps": 3})[0].run_id != with_fomo.run_id


@pytest.mark.parametrize("fomo,match", [
    ({"budget": {}}, "exactly one of"),
    ({"budget": {"reference_steps": 2, "flops": 1e9}}, "exactly one of"),
    ({"budget": {"reference_steps": 0}}, "reference_steps must be >= 1"),
    ({"budget": {"flops": -1.0}}, "budget.flops"),
    ({"ordering": "by_size"}, "ordering"),
    ({"held_out_domains": []}, "at least one held-out"),
    ({"held_out_samples": 15}, "multiple of 10"),
])
def test_bad_fomo_sections_fail_before_training(fomo, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        _plan(**fomo)


def test_a_trained_domain_cannot_be_held_out():
    bench = {"name": "domain_mnist", "options": {"domains": ["invert", "edges"]}}
    cfg = tiny_experiment(["naive"], benchmark=bench, fomo=FOMO)
    with pytest.raises(ConfigError, match="'invert' is trained on"):
        plan_experiment(load_experiment(cfg))


def test_orderings():
    acc = [0.2, 0.9, 0.5, 0.9]
    assert stream_order("given", acc, 0) == [0, 1, 2, 3]
    assert stream_order("easy_to_hard", acc, 0) == [1, 3, 2, 0]  # highest pretrained accuracy first, stable
    assert stream_order("hard_to_easy", acc, 0) == [0, 2, 3, 1]  # the exact reverse
    rand = stream_order("random", acc, 5)
    assert sorted(rand) == [0, 1, 2, 3] and rand == stream_order("random", acc, 5)
    assert len({tuple(stream_order("random", acc, s)) for s in range(6)}) > 1


def test_reorder_benchmark_permutes_train_and_test_together():
    from avalanche_merge.benchmarks import BENCHMARKS

    spec = BENCHMARKS.get("split_digits")
    bench = spec.build(spec.config_cls(n_experiences=5, max_train_per_class=10), 0)
    ordered = reorder_benchmark(bench, [2, 0, 1, 4, 3])
    assert ordered.experience_names == [bench.experience_names[j] for j in (2, 0, 1, 4, 3)]
    for new, old in enumerate((2, 0, 1, 4, 3)):
        for stream in ("train_stream", "test_stream"):
            a = getattr(ordered, stream)[new].classes_in_this_experience
            assert sorted(a) == sorted(getattr(bench, stream)[old].classes_in_this_experience)
    with pytest.raises(ValueError, match="permutation"):
        reorder_benchmark(bench, [0, 0, 1, 2, 3])


def test_fomo_without_budget_trains_exactly_as_without_it(tmp_path):
    # the zero-shot point and the held-out metric must not change what the run trains
    (plain,) = plan_experiment(load_experiment(tiny_experiment(["naive"])))
    (fomo,) = _plan()
    a = execute_run(plain, tmp_path / "a")
    b = execute_run(fomo, tmp_path / "b")
    np.testing.assert_allclose(a["accuracy_matrix"], b["accuracy_matrix"])
    f = b["fomo"]
    n = len(a["accuracy_matrix"])
    assert len(f["A_KA"]) == len(f["A_ZS"]) == len(f["GM"]) == n + 1  # step 0 = the zero-shot point
    assert f["A_KA"][0] == pytest.approx(np.mean(a["pretrained_accuracy"]))  # plain forward == strategy eval
    np.testing.assert_allclose(f["A_KA"][1:], np.mean(a["accuracy_matrix"], axis=1))
    assert f["GM"][-1] == pytest.approx(np.sqrt(f["A_KA"][-1] * f["A_ZS"][-1]))


def test_budget_sets_the_steps_of_every_task(tmp_path):
    (plan,) = _plan(budget={"reference_steps": 3}, ordering="hard_to_easy")
    f = execute_run(plan, tmp_path)["fomo"]
    assert f["budget"]["steps_per_task"] == 3  # naive is the reference: k reference steps = k steps
    assert f["steps_taken"] == [3, 3]  # 3 < one epoch of the tiny stream: stopped mid-epoch
    assert f["budget"]["memory_ratio"] == pytest.approx(1.0)
    zs = f["zero_shot"]["test_accuracy"]
    assert zs == sorted(zs)  # hard to easy: lowest pretrained accuracy first


def test_budget_smaller_than_one_step_is_refused_before_training(tmp_path):
    # LwF's step also runs the previous model: one reference step cannot pay for it
    (plan,) = _plan(("lwf",), budget={"reference_steps": 1})
    with pytest.raises(ValueError, match="smaller than one training step"):
        execute_run(plan, tmp_path)
    assert not (tmp_path / "result.json").exists()
