"""Parallel and sharded grids (issue 19): ``--jobs`` worker processes, ``--shard K/N`` workers and a submitit job
array on one results folder give exactly the runs and summary of a sequential run; claim files keep any number
of workers from computing a run twice and expire when their holder dies; bad grid flags fail before any work."""

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_experiment

import avalanche_merge.runner.suite as suite_module
from avalanche_merge.cli import main
from avalanche_merge.config import ConfigError
from avalanche_merge.runner import load_experiment, plan_experiment, run_experiment
from avalanche_merge.runner.claims import CLAIM_NAME, read_claim, try_claim
from avalanche_merge.runner.parallel import available_cores, parse_shard, select_shard
from avalanche_merge.runner.store import run_dir
from avalanche_merge.runner.summary import TIMINGS

REPO = Path(__file__).resolve().parents[2]
RAW = tiny_experiment(["naive", "lwf"], seeds=(0, 1), train={"epochs": 2, "batch_size": 16, "eval_batch_size": 128,
                                                             "lr": 2e-3})


def _summary(out: Path) -> list[dict]:
    """summary.csv without the columns that depend on the machine's speed."""
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    timing = {f"{k}_{s}" for k in TIMINGS for s in ("mean", "std")}
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def _runs(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The reference: every run in this process, one thread (as each worker below)."""
    out = tmp_path_factory.mktemp("sequential")
    run_experiment(load_experiment(RAW), out, progress=False, plots=False, threads=1)
    return out


def _same_as_sequential(out: Path, sequential: Path) -> dict[str, dict]:
    runs, ref = _runs(out), _runs(sequential)
    assert sorted(runs) == sorted(ref) == sorted(p.run_id for p in plan_experiment(load_experiment(RAW)))
    for run_id, result in runs.items():
        assert result["accuracy_matrix"] == ref[run_id]["accuracy_matrix"], run_id
        assert result["pretrained_accuracy"] == ref[run_id]["pretrained_accuracy"], run_id
    assert _summary(out) == _summary(sequential)
    return runs


def test_jobs_give_the_runs_and_summary_of_a_sequential_run(tmp_path, sequential):
    results, rows = run_experiment(load_experiment(RAW), tmp_path, progress=False, plots=False, jobs=2)
    assert len(results) == 4 and len(rows) == 2
    runs = _same_as_sequential(tmp_path, sequential)
    workers = {r["worker"]["pid"] for r in runs.values()}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2  # computed in worker processes
    assert {r["worker"]["threads"] for r in runs.values()} == {max(1, available_cores() // 2)}  # no oversubscription
    assert not list(tmp_path.glob(f"runs/*/{CLAIM_NAME}"))  # every claim released


def test_two_shard_workers_give_the_runs_and_summary_of_a_sequential_run(tmp_path, sequential):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(RAW))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    workers = [subprocess.Popen([sys.executable, "-m", "avalanche_merge.cli", "run", str(config), "--out", str(out),
                                 "--shard", f"{k}/2", "--threads", "1", "--quiet"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    runs = _same_as_sequential(out, sequential)  # the summary was written by the last worker to finish
    plans = plan_experiment(load_experiment(RAW))
    for k, worker in zip((1, 2), workers):  # each shard's runs, and only those, computed by its worker
        assert {r["worker"]["pid"] for rid, r in runs.items()
                if rid in {p.run_id for p in select_shard(plans, (k, 2))}} == {worker.pid}
    before = (out / "summary.csv").read_text()
    assert main(["summarize", str(out), "--no-plots"]) == 0  # idempotent, from the stored runs only
    assert (out / "summary.csv").read_text() == before


def test_a_submitit_job_array_runs_a_grid_locally(tmp_path, sequential, capsys):
    pytest.importorskip("submitit")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(RAW))
    out = tmp_path / "out"
    code = main(["run", str(config), "--out", str(out), "--backend", "submitit", "--cluster", "local", "--jobs", "2",
                 "--executor-param", "timeout_min=10", "--quiet"])
    assert code == 0, capsys.readouterr()
    runs = _same_as_sequential(out, sequential)
    assert len({r["worker"]["pid"] for r in runs.values()}) == 2  # one process per array task
    assert (out / "submitit").is_dir()


# --- claims -------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_runs(monkeypatch):
    """Training replaced by a fake that records which runs were computed."""
    from test_store import fake_result

    computed = []

    def execute(plan, folder):
        computed.append(plan.run_id)
        return fake_result(plan)

    monkeypatch.setattr(suite_module, "execute_run", execute)
    return computed


def _one_plan():
    config = load_experiment(tiny_experiment(["naive"]))
    return config, plan_experiment(config)[0]


def _write_claim(folder: Path, *, host: str, pid: int, pid_start: float | None, age: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_start": pid_start, "token": "theirs"}))
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def _dead_process() -> tuple[int, float]:
    """The pid and start time of a process of this host that was killed (as a worker killed with SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, start


def test_a_claim_of_a_killed_worker_on_this_host_is_taken_over_at_once(tmp_path, fake_runs):
    config, plan = _one_plan()
    pid, start = _dead_process()
    _write_claim(run_dir(tmp_path, plan.run_id), host=socket.gethostname(), pid=pid, pid_start=start)
    assert read_claim(run_dir(tmp_path, plan.run_id) / CLAIM_NAME, 300).status == "stale"
    run_experiment(config, tmp_path, progress=False, plots=False)  # ttl 300 s: not by age
    assert fake_runs == [plan.run_id]


def test_a_silent_claim_of_another_host_expires_after_the_ttl(tmp_path, fake_runs):
    config, plan = _one_plan()
    folder = run_dir(tmp_path, plan.run_id)
    _write_claim(folder, host="other-host", pid=os.getpid(), pid_start=None, age=30)
    assert read_claim(folder / CLAIM_NAME, 60).status == "live"
    run_experiment(config, tmp_path, progress=False, plots=False, claim_ttl=10)
    assert fake_runs == [plan.run_id]


def test_a_live_claim_is_respected_until_its_holder_stores_the_result(tmp_path, fake_runs):
    from test_store import fake_result

    config, plan = _one_plan()
    folder = run_dir(tmp_path, plan.run_id)
    # another host's worker (its flock is not visible here): only the claim file says the run is taken
    claim = _write_claim(folder, host="other-host", pid=1, pid_start=None)
    out = {}
    runner = threading.Thread(target=lambda: out.setdefault("r", run_experiment(config, tmp_path, progress=False,
                                                                                 plots=False, claim_ttl=60)))
    runner.start()
    time.sleep(1.5)
    assert fake_runs == [] and runner.is_alive()  # waiting, not computing
    suite_module.write_json_atomic(folder / "result.json", fake_result(plan, [[0.5, 0.5]]))
    claim.unlink()
    runner.join(timeout=30)
    (result,), _ = out["r"]
    assert fake_runs == [] and result["accuracy_matrix"] == [[0.5, 0.5]]


def test_a_pid_reused_by_another_process_does_not_keep_a_claim_alive(tmp_path):
    me = psutil.Process(os.getpid())
    path = _write_claim(tmp_path, host=socket.gethostname(), pid=me.pid, pid_start=me.create_time() - 100)
    assert read_claim(path, 300).status == "stale"
    path = _write_claim(tmp_path, host=socket.gethostname(), pid=me.pid, pid_start=me.create_time())
    assert read_claim(path, 300).status == "live"


def test_the_heartbeat_keeps_a_long_run_claimed_and_its_absence_lets_it_expire(tmp_path):
    claim = try_claim(tmp_path, ttl=1.0)
    with claim.heartbeat():
        for _ in range(6):  # 3 s: three times the ttl
            time.sleep(0.5)
            assert try_claim(tmp_path, ttl=1.0) is None
    assert not claim.lost
    time.sleep(1.3)  # no heartbeat for longer than the ttl
    other = try_claim(tmp_path, ttl=1.0)
    assert other is not None and other.record["token"] != claim.record["token"]
    with pytest.warns(UserWarning, match="taken over"):
        assert claim.touch() is False  # the old holder learns it lost the run
    claim.release()  # and does not remove the new holder's claim
    assert json.loads((tmp_path / CLAIM_NAME).read_text())["token"] == other.record["token"]


def test_workers_racing_for_a_stale_claim_take_it_over_exactly_once(tmp_path, monkeypatch):
    import avalanche_merge.runner.claims as claims

    real = claims.read_claim

    def slow_read(path, ttl):  # every racer judges the claim stale before any of them acts on it
        state = real(path, ttl)
        time.sleep(0.05)
        return state

    monkeypatch.setattr(claims, "read_claim", slow_read)
    for _ in range(3):
        _write_claim(tmp_path, host="other-host", pid=1, pid_start=None, age=100)
        won, barrier = [], threading.Barrier(8)

        def race(won=won, barrier=barrier):
            barrier.wait()
            claim = try_claim(tmp_path, ttl=10)
            if claim is not None:
                won.append(claim)

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert json.loads((tmp_path / CLAIM_NAME).read_text())["token"] == won[0].record["token"]
        won[0].release()
        assert not (tmp_path / CLAIM_NAME).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or moved file left


# --- shards and bad input -----------------------------------------------------------------------------------------


def test_shards_partition_the_plan_deterministically_and_evenly():
    plans = plan_experiment(load_experiment(tiny_experiment(["naive", "lwf", "ewc"], seeds=(0, 1, 2, 3))))
    again = plan_experiment(load_experiment(tiny_experiment(["naive", "lwf", "ewc"], seeds=(0, 1, 2, 3))))
    for n in (1, 2, 3, 5, 7, 12, 13):
        parts = [[p.run_id for p in select_shard(plans, (k, n))] for k in range(1, n + 1)]
        flat = [rid for part in parts for rid in part]
        assert sorted(flat) == sorted(p.run_id for p in plans) and len(set(flat)) == len(flat)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [[p.run_id for p in select_shard(again, (k, n))] for k in range(1, n + 1)]
    assert parse_shard(" 2/5 ") == (2, 5)


@pytest.mark.parametrize(("flags", "message"), [
    (["--jobs", "0"], "--jobs must be an integer >= 1"),
    (["--jobs", "-3"], "--jobs must be an integer >= 1"),
    (["--shard", "3/2"], "k must be in 1..2"),
    (["--shard", "0/2"], "k must be in 1..2"),
    (["--shard", "1/0"], "n >= 1"),
    (["--shard", "1-2"], "--shard must be K/N"),
    (["--shard", "a/b"], "--shard must be K/N"),
    (["--shard", "1/2/3"], "--shard must be K/N"),
    (["--threads", "0"], "--threads must be an integer >= 1"),
    (["--claim-ttl", "0"], "--claim-ttl"),
    (["--claim-ttl", "nan"], "--claim-ttl"),
    (["--backend", "submitit", "--shard", "1/2"], "makes its own shards"),
    (["--cluster", "slurm"], "need --backend submitit"),
    (["--backend", "submitit", "--executor-param", "novalue"], "KEY=VALUE"),
])
def test_bad_grid_flags_fail_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    import avalanche_merge.runner as runner_package

    monkeypatch.setattr(runner_package, "plan_experiment", lambda *a: pytest.fail("planned despite bad flags"))
    monkeypatch.setattr(suite_module, "plan_experiment", lambda *a: pytest.fail("planned despite bad flags"))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_experiment(["naive"])))
    for argv in (["run", str(config)], ["bench"]):
        assert main([*argv, "--out", str(tmp_path / "out"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_experiment_refuses_bad_jobs_and_shards_before_any_work(tmp_path, fake_runs):
    config, _ = _one_plan()
    for kwargs in ({"jobs": 0}, {"shard": (2, 1)}, {"shard": (0, 3)}, {"claim_ttl": 0.5}):
        with pytest.raises((ConfigError, ValueError)):
            run_experiment(config, tmp_path, progress=False, plots=False, **kwargs)
    assert fake_runs == [] and not (tmp_path / "runs").exists()


def test_unknown_submitit_parameters_are_refused_before_submission(tmp_path, capsys):
    pytest.importorskip("submitit")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_experiment(["naive"])))
    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--backend", "submitit", "--cluster", "local",
                 "--executor-param", "no_such_parameter=1"])
    assert code == 2 and "no_such_parameter" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_run_records_and_the_summary_split_time_into_training_evaluation_and_setup(sequential):
    for result in _runs(sequential).values():
        parts = [result[k] for k in ("train_time_s", "eval_time_s", "setup_time_s")]
        assert all(p > 0 for p in parts) and sum(parts) <= result["wall_time_s"]  # disjoint parts of the wall time
        assert result["cpu_time_s"] > 0 and result["worker"]["pid"] == os.getpid()
    with open(sequential / "summary.csv", newline="") as f:
        row = next(csv.DictReader(f))
    for key in ("train_time_s", "eval_time_s", "setup_time_s", "cpu_time_s"):
        assert float(row[f"{key}_mean"]) > 0
    assert "eval_time_s" in (sequential / "summary.md").read_text()


def test_pool_tasks_of_every_method_can_be_sent_to_a_worker_which_plans_the_same_run(tmp_path):
    """Plans hold options classes the registries make at run time (not picklable): workers get the config and
    the run id and plan the run themselves (a bench with --jobs once died on continual_ta's options)."""
    import pickle

    from avalanche_merge.runner.bench import bench_config
    from avalanche_merge.runner.parallel import _worker_plan, task_args

    config = bench_config(full=True, seeds=1)
    for plan in plan_experiment(config):
        sent_config, run_id, *_ = pickle.loads(pickle.dumps(task_args(config, plan, tmp_path, False, 60.0)))
        assert _worker_plan(sent_config, run_id).describe() == plan.describe()
