"""Bad input never trains or stores anything silently (part of issue 15): non-finite or absurd settings, labels
that would become paths, empty CLI lists, and the exit status of ``--keep-going`` when runs failed."""

import json

import pytest
from conftest import tiny_experiment

import avalanche_merge.runner.suite as suite_module
from avalanche_merge.cli import main
from avalanche_merge.config import ConfigError
from avalanche_merge.runner import load_experiment, plan_experiment, run_experiment


def plan(methods, **overrides):
    return plan_experiment(load_experiment(tiny_experiment(methods, **overrides)))


@pytest.mark.parametrize(("overrides", "methods", "match"), [
    ({"train": {"lr": float("inf")}}, ["naive"], r"lr must be finite, got inf"),
    ({"train": {"lr": 1e300}}, ["naive"], r"lr must be in \(0.0, 10.0\], got 1e\+300"),
    ({"train": {"weight_decay": float("inf")}}, ["naive"], r"weight_decay must be finite"),
    ({}, [{"name": "ewc", "options": {"ewc_lambda": float("inf")}}], r"ewc_lambda must be finite, got inf"),
    ({}, [{"name": "lwf", "options": {"alpha": float("-inf")}}], r"alpha must be finite, got -inf"),
    ({}, [{"name": "inflora", "options": {"lr": float("inf")}}], r"lr must be finite, got inf"),
])
def test_non_finite_and_absurd_settings_are_refused_at_plan_time(overrides, methods, match):
    with pytest.raises(ConfigError, match=match):
        plan(methods, **overrides)


@pytest.mark.parametrize("label", ["a/../../../escaped", "../up", "x/y", ".hidden", "a__b", "a b", "x" * 81, "a\\b"])
def test_labels_that_are_not_safe_folder_names_are_refused(label):
    with pytest.raises(ConfigError, match=r"methods\[0\]\.label: .* must be 1-80 characters"):
        plan([{"name": "naive", "label": label}])


def test_safe_labels_are_accepted():
    (run,) = plan([{"name": "naive", "label": "naive_lr-1e-3+v2.1"}])
    assert run.run_id.startswith("split_digits__naive_lr-1e-3+v2.1__seed0__")


@pytest.mark.parametrize("flags", [["--methods", ""], ["--methods", "naive,,ewc"], ["--benchmarks", ","]])
def test_empty_cli_lists_are_refused(flags, tmp_path, capsys):
    assert main(["bench", *flags, "--out", str(tmp_path), "--quiet"]) == 2
    assert "expected comma-separated names" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing planned, nothing run


def test_keep_going_exits_non_zero_when_a_run_failed_and_success_removes_a_stale_error(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_experiment(["naive"])))
    real = suite_module.execute_run

    def crash(plan, run_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(suite_module, "execute_run", crash)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet", "--keep-going"]) == 1
    (error,) = (tmp_path / "out" / "runs").glob("*/error.json")
    monkeypatch.setattr(suite_module, "execute_run", real)
    results, _ = run_experiment(load_experiment(path), tmp_path / "out", progress=False, plots=False)
    assert len(results) == 1 and not error.exists()  # the later success removed the stale error record


def test_runs_of_different_configs_under_one_label_are_never_averaged(tmp_path):
    """Issue 15: two experiments in one folder, the same label, different options: two rows, one seed each."""
    from avalanche_merge.analysis.report import load_results
    from avalanche_merge.runner.summary import config_key, summarize

    for lam in (10.0, 1000.0):
        entry = {"name": "ewc", "label": "ewc", "options": {"ewc_lambda": lam}}
        run_experiment(load_experiment(tiny_experiment([entry], train={"epochs": 1, "batch_size": 16})), tmp_path,
                       progress=False, plots=False)
    stored = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/result.json"))]
    assert len(stored) == 2 and len({config_key(r) for r in stored}) == 2
    rows = summarize(stored)
    assert sorted(r["n_seeds"] for r in rows) == [1, 1]
    assert all(r["method"].startswith("ewc@") for r in rows) and rows[0]["method"] != rows[1]["method"]
    assert sorted(r["label"] for r in load_results(tmp_path)) == sorted(r["method"] for r in rows)  # the report too
    single = summarize([r for r in stored if r["config"]["method_options"]["ewc_lambda"] == 10.0])
    assert [r["method"] for r in single] == ["ewc"]  # one config under a label keeps its plain label


@pytest.mark.parametrize(("overrides", "match"), [
    ({"seeds": [2**32]}, r"seeds must be in \[0, 2\*\*32\), got 4294967296"),
    ({"device": "banana"}, r"device must be a torch device such as 'cpu' or 'cuda:0', got 'banana'"),
    ({"device": "cuda:7"}, r"device 'cuda:7': this machine has \d+ CUDA device\(s\)"),
])
def test_bad_seeds_and_devices_fail_at_plan_time(overrides, match, tmp_path, capsys):
    with pytest.raises(ConfigError, match=match):
        plan(["naive"], **overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_experiment(["naive"], **overrides)))
    assert main(["run", str(path), "--dry-run"]) == 2  # the promise of --dry-run
    assert "config error" in capsys.readouterr().err


def test_cli_mistakes_exit_2_without_a_traceback(tmp_path, capsys):
    assert main(["bench", "--epochs", "0", "--out", str(tmp_path), "--quiet"]) == 2
    assert main(["pretrain", "--epochs", "0"]) == 2
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    assert main(["run", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--epochs: epochs must be >= 1, got 0" in err and "not UTF-8 text" in err and "Traceback" not in err


def test_a_corrupt_stored_result_is_run_again_not_a_crash(tmp_path):
    from avalanche_merge.runner.suite import load_result, result_path

    config = load_experiment(tiny_experiment(["naive"], train={"epochs": 1, "batch_size": 16}))
    (first,), _ = run_experiment(config, tmp_path, progress=False, plots=False)
    (plan_,) = plan_experiment(config)
    path = result_path(tmp_path, plan_)
    good = path.read_bytes()
    for content in (b"[]", b"null", b'"complete"', b'{"status": "complete"}', b"\xff\xfe{",
                    b'{"status": "complete", "config_hash": 3', good.replace(b'"metrics"', b'"metricz"')):
        path.write_bytes(content)
        assert load_result(tmp_path, plan_) is None, content  # treated as not done: it will run again
    path.write_bytes(b"[]")
    (again,), rows = run_experiment(config, tmp_path, progress=False, plots=False)
    assert again["accuracy_matrix"] == first["accuracy_matrix"]  # recomputed, identical
    assert json.loads(path.read_text())["status"] == "complete" and len(rows) == 1


def test_out_and_cache_dir_that_are_files_are_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_experiment(["naive"])))
    assert main(["run", str(config), "--out", str(afile), "--quiet"]) == 2
    assert main(["bench", "--methods", "naive", "--out", str(afile), "--quiet"]) == 2
    assert main(["pretrain", "--cache-dir", str(afile)]) == 2
    err = capsys.readouterr().err
    assert err.count("exists and is not a folder") == 3 and "Traceback" not in err
