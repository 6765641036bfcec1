"""Runner reliability: determinism, resume, interruption, config validation, stored results and summaries."""

import csv
import json
import math

import numpy as np
import pytest
from conftest import tiny_experiment

from avalanche_merge.config import ConfigError
from avalanche_merge.evaluation.matrix import average_incremental_accuracy, forgetting
from avalanche_merge.runner import load_experiment, plan_experiment, run_experiment
from avalanche_merge.runner import suite as suite_module


def _stored(out):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))}


def test_same_config_and_seed_give_identical_numbers(tmp_path):
    config = load_experiment(tiny_experiment(["naive", "replay"]))
    first, _ = run_experiment(config, tmp_path / "a", progress=False, plots=False)
    second, _ = run_experiment(config, tmp_path / "b", progress=False, plots=False)
    for r1, r2 in zip(first, second):
        assert r1["run_id"] == r2["run_id"]
        assert r1["accuracy_matrix"] == r2["accuracy_matrix"]
        assert r1["pretrained_accuracy"] == r2["pretrained_accuracy"]


def test_different_seeds_differ(tmp_path):
    results, _ = run_experiment(load_experiment(tiny_experiment(["naive"], seeds=(0, 1))), tmp_path,
                                progress=False, plots=False)
    assert results[0]["accuracy_matrix"] != results[1]["accuracy_matrix"]


def test_rerun_skips_completed_runs(tmp_path, monkeypatch):
    config = load_experiment(tiny_experiment(["naive"], seeds=(0, 1)))
    results, _ = run_experiment(config, tmp_path, progress=False, plots=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a completed run was executed again")

    monkeypatch.setattr(suite_module, "execute_run", must_not_run)
    again, _ = run_experiment(config, tmp_path, progress=False, plots=False)
    assert [r["accuracy_matrix"] for r in again] == [r["accuracy_matrix"] for r in results]


def test_interrupted_experiment_keeps_completed_runs_and_resumes(tmp_path, monkeypatch):
    config = load_experiment(tiny_experiment(["naive", "lwf"]))
    real = suite_module.execute_run
    executed = []

    def interrupt_second(plan, run_dir):
        if plan.method == "lwf":
            raise KeyboardInterrupt
        executed.append(plan.method)
        return real(plan, run_dir)

    monkeypatch.setattr(suite_module, "execute_run", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path, progress=False, plots=False)
    stored = _stored(tmp_path)
    assert [r["method"] for r in stored.values()] == ["naive"]
    assert (tmp_path / "summary.csv").is_file()  # partial summary of what completed
    assert not list(tmp_path.rglob(".tmp-*"))  # no half-written files

    resumed = []

    def record(plan, run_dir):
        resumed.append(plan.method)
        return real(plan, run_dir)

    monkeypatch.setattr(suite_module, "execute_run", record)
    results, rows = run_experiment(config, tmp_path, progress=False, plots=False)
    assert resumed == ["lwf"]
    assert [r["method"] for r in results] == ["naive", "lwf"]
    assert [row["method"] for row in rows] == ["naive", "lwf"]


def test_crash_is_recorded_and_keep_going_continues(tmp_path, monkeypatch):
    config = load_experiment(tiny_experiment(["naive", "lwf"]))
    real = suite_module.execute_run

    def crash_naive(plan, run_dir):
        if plan.method == "naive":
            raise RuntimeError("boom")
        return real(plan, run_dir)

    monkeypatch.setattr(suite_module, "execute_run", crash_naive)
    results, _ = run_experiment(config, tmp_path, progress=False, plots=False, keep_going=True)
    assert [r["method"] for r in results] == ["lwf"]
    errors = list((tmp_path / "runs").glob("*naive*/error.json"))
    assert len(errors) == 1 and "boom" in json.loads(errors[0].read_text())["error"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["naive", "nope"]}, "unknown method 'nope'; valid methods: "),
        ({"benchmarks": [{"name": "nope"}]}, "unknown benchmark 'nope'; valid benchmarks: "),
        ({"methods": [{"name": "ewc", "options": {"ewc_lambda": "big"}}]}, "methods[0].options.ewc_lambda"),
        ({"methods": [{"name": "ewc", "options": {"ewc_lambda": -1.0}}]}, "ewc_lambda must be in [0.0, inf], got -1.0"),
        ({"methods": [{"name": "replay", "options": {"memsize": 3}}]}, "memsize: unknown option"),
        ({"train": {"epochs": 0}}, "epochs must be >= 1, got 0"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number"),
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"loggers": ["wandb"]}, "unknown logger 'wandb'"),
        ({"benchmarks": [{"name": "split_mnist", "options": {"n_experiences": 3}}]}, "n_experiences must divide"),
        ({"model": {"name": "tiny_vit", "options": {"head": "x"}}}, "head must be"),
        ({"methods": ["naive", "naive"]}, "label 'naive' is used twice"),
    ],
)
def test_bad_config_fails_before_training(change, message, tmp_path, monkeypatch):
    monkeypatch.setattr(suite_module, "execute_run", lambda *a, **k: pytest.fail("training started"))
    raw = tiny_experiment(["naive"])
    raw.update(change)
    with pytest.raises(ConfigError) as info:
        run_experiment(load_experiment(raw), tmp_path, progress=False)
    assert message in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_stored_result_and_summary_are_consistent(tmp_path):
    config = load_experiment(tiny_experiment(["naive", "joint"], seeds=(0, 1)))
    _, rows = run_experiment(config, tmp_path, progress=False, plots=True)
    stored = _stored(tmp_path)
    assert len(stored) == 4
    for r in stored.values():
        for key in ("accuracy_matrix", "config", "seed", "versions", "wall_time_s", "peak_rss_mb",
                    "trainable_params", "train_time_s", "config_hash"):
            assert key in r
        assert r["versions"]["avalanche-lib"] == "0.6.0"
    with open(tmp_path / "summary.csv") as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    naive = [r for r in stored.values() if r["method"] == "naive"]
    R = [np.asarray(r["accuracy_matrix"]) for r in naive]
    assert float(table["naive"]["forgetting_mean"]) == pytest.approx(np.mean([forgetting(m) for m in R]))
    assert float(table["naive"]["avg_inc_acc_mean"]) == pytest.approx(
        np.mean([average_incremental_accuracy(m) for m in R]))
    assert float(table["naive"]["final_acc_std"]) == pytest.approx(np.std([m[-1].mean() for m in R], ddof=1))
    assert int(table["naive"]["trainable_params"]) == naive[0]["trainable_params"]
    assert table["joint"]["bwt_mean"] == ""  # one row: no backward transfer
    assert "| split_digits | naive | shared | 2 |" in (tmp_path / "summary.md").read_text()
    assert table["naive"]["protocol"] == "shared"  # every row says its head protocol
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert plots == ["split_digits_accuracy_curves.png", "split_digits_joint_matrix.png",
                     "split_digits_naive_matrix.png"]
    assert not math.isnan(rows[0]["final_acc_mean"])


def test_plan_hash_changes_with_any_option():
    base = plan_experiment(load_experiment(tiny_experiment(["ewc"])))[0]
    other = plan_experiment(load_experiment(tiny_experiment([{"name": "ewc", "options": {"ewc_lambda": 1.0}}])))[0]
    assert base.run_id != other.run_id
    assert base.run_id == plan_experiment(load_experiment(tiny_experiment(["ewc"])))[0].run_id


def test_config_file_round_trip(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(tiny_experiment(["naive"])))
    assert len(plan_experiment(load_experiment(path))) == 1
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_experiment(tmp_path / "bad.json")
