"""The avalanche-merge command line."""

import json

from conftest import tiny_experiment

from avalanche_merge.cli import main
from avalanche_merge.runner.bench import QUICK_METHODS, bench_config
from avalanche_merge.strategies import list_methods


def test_list_shows_benchmarks_backbones_and_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ["split_mnist", "domain_mnist", "split_cifar100", "imagenet_r", "tiny_vit"] + list_methods():
        assert f"  {name} " in out


def test_run_dry_run_and_config_error(tmp_path, capsys):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(tiny_experiment(["naive", "ewc"], seeds=(0, 1, 2))))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "config OK: 6 runs" in capsys.readouterr().out
    path.write_text(json.dumps(tiny_experiment(["naive", "not_a_method"])))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "unknown method 'not_a_method'" in capsys.readouterr().err


def test_run_writes_summary_and_prints_table(tmp_path, capsys):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(tiny_experiment(["naive"])))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| split_digits | naive | shared | 1 |" in out
    assert (tmp_path / "out" / "summary.md").is_file()


def test_full_bench_covers_every_bench_method_and_three_seeds():
    config = bench_config(full=True)
    assert [m.name for m in config.methods] == list_methods(bench_only=True)
    assert {b.name for b in config.benchmarks} == {"split_mnist", "domain_mnist"}
    assert config.seeds == [0, 1, 2]
    required = {"naive", "joint", "cumulative", "ewc", "lwf", "replay", "si", "slda"}
    assert required <= {m.name for m in config.methods}


def test_describe_shows_protocol_options_defaults_and_ranges(capsys):
    assert main(["describe", "inflora", "--train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("inflora:") and "head protocol:" in out and "family: lora" in out
    assert "threshold" in out and "= 0.95" in out and "in (0, 1]" in out  # option, default, range
    assert "shared train settings" in out and "learning rate, > 0." in out


def test_describe_unknown_method_lists_the_valid_ones(capsys):
    assert main(["describe", "infloraa"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'infloraa'" in err and "inflora" in err


def test_list_verbose_shows_every_methods_options(capsys):
    assert main(["list", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "density" in out and "head_mode" in out and "= 0.95" in out


def test_bad_figure_format_is_refused_before_any_work(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path), "--format", "png,jpg"])
    assert exc.value.code == 2
    assert "png, pdf, svg" in capsys.readouterr().err


def test_default_bench_covers_every_family_and_the_avalanche_baselines_with_three_seeds():
    from avalanche_merge.strategies import METHODS

    quick = [m.name for m in bench_config().methods]
    assert quick == list(QUICK_METHODS) and len(quick) < len(list_methods(bench_only=True))
    families = {METHODS.get(m).family for m in list_methods(bench_only=True)}
    assert families == {METHODS.get(m).family for m in quick}  # a new family needs a representative here
    assert {"naive", "ewc", "lwf", "replay", "joint"} <= set(quick)
    assert bench_config().seeds == [0, 1, 2]


def test_default_bench_runs_keep_the_ids_of_the_stored_bench_results():
    """The quick bench plans exactly the runs the full bench stored (same configs, same hashes), so stored results
    are reused and the two tables agree."""
    from pathlib import Path

    from avalanche_merge.runner import plan_experiment

    stored = {p.name for p in (Path(__file__).parents[1] / "experiments/results/bench/runs").iterdir()}
    quick = {p.run_id for p in plan_experiment(bench_config())}
    assert len(quick) == 2 * 3 * len(QUICK_METHODS) and quick <= stored
