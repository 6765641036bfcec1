"""Stored runs under concurrency and interruption (issue 15): two runners on one folder never compute a run twice,
experiments sharing a folder never overwrite each other's summary, temp files of killed writes are cleaned, and
the summary is recomputed from the stored accuracy matrices (one source of truth with the report)."""

import csv
import json
import threading
import time

import pytest
from conftest import tiny_experiment

import avalanche_merge.runner.suite as suite_module
from avalanche_merge.analysis.report import load_results
from avalanche_merge.runner import load_experiment, plan_experiment, run_experiment
from avalanche_merge.runner.store import CorruptResult, check_result, folder_lock, run_lock


def fake_result(plan, matrix=None):
    matrix = matrix or [[0.8, 0.1], [0.6, 0.9]]
    return {"run_id": plan.run_id, "status": "complete", "benchmark": plan.benchmark, "method": plan.method,
            "label": plan.label, "protocol": plan.protocol, "seed": plan.seed, "config": plan.describe(),
            "config_hash": plan.config_hash, "accuracy_matrix": matrix, "pretrained_accuracy": None,
            "metrics": {"final_acc": 0.75}, "avalanche_metrics": {}, "train_time_s": 0.1, "wall_time_s": 0.1,
            "peak_rss_mb": 1.0, "trainable_params": 1, "scenario_type": "class_incremental"}


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace training by a 0.3 s fake that records which runs were computed, by whom."""
    computed = []

    def execute(plan, folder):
        computed.append((plan.run_id, threading.current_thread().name))
        time.sleep(0.3)
        return fake_result(plan)

    monkeypatch.setattr(suite_module, "execute_run", execute)
    return computed


def config(name="tiny", methods=("naive", "ewc"), seeds=(0, 1)):
    return load_experiment(tiny_experiment(list(methods), seeds=seeds, name=name))


def test_two_runners_on_one_folder_compute_each_run_once_and_both_see_every_result(tmp_path, fake_runs):
    cfg = config()
    outputs = {}

    def runner(name):
        outputs[name] = run_experiment(cfg, tmp_path, progress=False, plots=False)

    threads = [threading.Thread(target=runner, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [rid for rid, _ in fake_runs]
    assert sorted(ids) == sorted(p.run_id for p in plan_experiment(cfg))  # each of the 4 runs exactly once
    assert {who for _, who in fake_runs} == {"a", "b"}  # and the work was shared
    for results, rows in outputs.values():
        assert len(results) == 4 and len(rows) == 2


def test_a_run_locked_by_a_live_runner_is_waited_for_not_recomputed(tmp_path, fake_runs):
    cfg = config(methods=("naive",), seeds=(0,))
    (plan,) = plan_experiment(cfg)
    held = threading.Event()

    def other_runner():
        with run_lock(tmp_path, plan.run_id) as mine:
            assert mine
            held.set()
            time.sleep(0.5)
            suite_module.write_json_atomic(suite_module.result_path(tmp_path, plan), fake_result(plan, [[0.5, 0.5]]))

    t = threading.Thread(target=other_runner)
    t.start()
    held.wait()
    (result,), _ = run_experiment(cfg, tmp_path, progress=False, plots=False)
    t.join()
    assert fake_runs == [] and result["accuracy_matrix"] == [[0.5, 0.5]]


def test_a_lock_left_by_a_dead_runner_does_not_block(tmp_path, fake_runs):
    cfg = config(methods=("naive",), seeds=(0,))
    (plan,) = plan_experiment(cfg)
    with run_lock(tmp_path, plan.run_id):
        pass  # the lock file stays; its holder is gone (as after SIGKILL: the kernel drops the flock)
    (result,), _ = run_experiment(cfg, tmp_path, progress=False, plots=False)
    assert [rid for rid, _ in fake_runs] == [plan.run_id]


def test_folder_lock_is_exclusive_between_holders(tmp_path):
    with folder_lock(tmp_path / "x.lock") as first:
        with folder_lock(tmp_path / "x.lock", blocking=False) as second:
            assert first and not second
    with folder_lock(tmp_path / "x.lock", blocking=False) as again:
        assert again


def test_experiments_sharing_a_folder_keep_each_others_rows(tmp_path, fake_runs):
    run_experiment(config(name="first", methods=("naive",)), tmp_path, progress=False, plots=False)
    _, rows = run_experiment(config(name="second", methods=("ewc",)), tmp_path, progress=False, plots=False)
    assert [r["method"] for r in rows] == ["ewc"]  # what this experiment ran
    with open(tmp_path / "summary.csv") as f:
        assert sorted(r["method"] for r in csv.DictReader(f)) == ["ewc", "naive"]  # the folder keeps both


def test_temp_files_of_killed_writes_are_removed(tmp_path, fake_runs):
    cfg = config(methods=("naive",), seeds=(0,))
    (plan,) = plan_experiment(cfg)
    folder = tmp_path / "runs" / plan.run_id
    folder.mkdir(parents=True)
    for p in (folder / ".tmp-abc.json", tmp_path / ".tmp-def.csv"):
        p.write_text("half")
    run_experiment(cfg, tmp_path, progress=False, plots=False)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_summary_and_report_recompute_metrics_from_the_stored_matrix(tmp_path, fake_runs):
    cfg = config(methods=("naive",), seeds=(0,))
    (result,), _ = run_experiment(cfg, tmp_path, progress=False, plots=False)
    path = suite_module.result_path(tmp_path, plan_experiment(cfg)[0])
    stored = json.loads(path.read_text())
    stored["metrics"]["final_acc"] = 0.01  # a stale or edited field never reaches a table
    path.write_text(json.dumps(stored))
    _, rows = run_experiment(cfg, tmp_path, progress=False, plots=False)
    with open(tmp_path / "summary.csv") as f:
        (row,) = csv.DictReader(f)
    assert float(row["final_acc_mean"]) == pytest.approx(0.75) == rows[0]["final_acc_mean"]  # mean of [0.6, 0.9]
    assert load_results(tmp_path)[0]["accuracy_matrix"] == [[0.8, 0.1], [0.6, 0.9]]


@pytest.mark.parametrize(("record", "match"), [
    ([], "not a JSON object"),
    ({"status": "complete"}, r"missing \['accuracy_matrix'"),
    ({**fake_result(plan_experiment(config())[0]), "accuracy_matrix": [[0.5], [0.5, 0.5]]}, "equal-length"),
    ({**fake_result(plan_experiment(config())[0]), "accuracy_matrix": [[1.5, 0.5]]}, r"1\.5, not an accuracy"),
    ({**fake_result(plan_experiment(config())[0]), "seed": "0"}, "seed is '0'"),
    ({**fake_result(plan_experiment(config())[0]), "train_time_s": float("nan")}, "train_time_s is nan"),
    ({**fake_result(plan_experiment(config())[0]), "metrics": []}, "metrics is not a mapping"),
])
def test_malformed_records_are_named(record, match):
    with pytest.raises(CorruptResult, match=match):
        check_result(record)
