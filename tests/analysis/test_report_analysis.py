"""``avalanche-merge report``: loading runs, report rows checked against hand computations, correlations, the
written report.md / report.csv / plots, and the command line."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from avalanche_merge.analysis.report import correlations, load_results, report_rows, write_report
from avalanche_merge.cli import main

PRETRAINED = [0.1, 0.1, 0.1]
# (label, seed) -> accuracy matrix, final held-out retention
RUNS = {
    ("naive", 0): ([[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.3, 0.6, 0.7]], 0.5),
    ("naive", 1): ([[0.6, 0.2, 0.1], [0.7, 0.9, 0.3], [0.5, 0.5, 0.8]], 0.4),
    ("ewc", 0): ([[0.9, 0.1, 0.1], [0.8, 0.9, 0.1], [0.8, 0.8, 0.9]], 0.7),
    ("ewc", 1): ([[0.8, 0.1, 0.1], [0.8, 0.8, 0.1], [0.7, 0.7, 0.8]], 0.6),
}
# Chaudhry forgetting by hand: mean over j < 2 of max_{j<=l<2} R[l][j] - R[2][j]
FORGETTING = {("naive", 0): (0.6 + 0.2) / 2, ("naive", 1): ((0.7 - 0.5) + (0.9 - 0.5)) / 2,
              ("ewc", 0): (0.1 + 0.1) / 2, ("ewc", 1): (0.1 + 0.1) / 2}
# Avalanche's StreamForgetting by hand: mean over j < 2 of R[j][j] - R[2][j] (naive seed 1: R[0][0] < R[1][0])
STREAM = {("naive", 0): 0.4, ("naive", 1): ((0.6 - 0.5) + (0.9 - 0.5)) / 2, ("ewc", 0): 0.1, ("ewc", 1): 0.1}
# FWT by hand: mean over j >= 1 of R[j-1][j] - pretrained[j]
FWT = {("naive", 0): (0.0 + 0.1) / 2, ("naive", 1): (0.1 + 0.2) / 2, ("ewc", 0): (0.0 + 0.0) / 2,
       ("ewc", 1): (0.0 + 0.0) / 2}


def analysis_record(R, retention: float, scale: float) -> dict:
    acc = float(np.mean(R[-1]))
    return {
        "continual": {"final_accumulation": acc, "final_retention": retention,
                      "final_geometric_mean": math.sqrt(acc * retention), "retention_change": retention - 0.3,
                      "pretrained_accumulation": 0.1, "pretrained_retention": 0.3},
        "geometry": {"names": ["blocks.0.w", "blocks.1.w", "head.weight"],
                     "step_norms": [[scale, 2 * scale, 0.5], [scale, scale, 0.5], [scale, 0.5, 0.5]],
                     "cumulative_total_norm": [1.0, 2.0, 3.0 * scale],
                     "step_cosine": [[1.0, 0.2 * scale, 0.1], [0.2 * scale, 1.0, 0.3], [0.1, 0.3, 1.0]],
                     "mean_step_cosine": 0.1 * scale, "sign_conflict_rate": 0.2 * scale, "mean_angle": 40.0 * scale,
                     "mean_effective_rank": 2.0},
        "drift": {"layers": ["blocks.0", "blocks.1"], "experiences": [0, 1, 2], "probe_samples": 8, "pool": "mean",
                  "cka_pretrained": [[[0.9, 0.9, 0.9], [0.8, 0.8, 0.8]], [[0.8, 0.8, 0.8], [0.7, 0.6, 0.5]],
                                     [[0.7, 0.7, 0.7], [0.6 / scale, 0.5 / scale, 0.4 / scale]]],
                  "cka_learned": [[[None] * 3, [None] * 3], [[0.9, None, None], [0.8, None, None]],
                                  [[0.9, 0.8, None], [0.7, 0.5, None]]]},
    }


def make_result(label: str, seed: int, *, analysis: bool = True) -> dict:
    R, retention = RUNS[(label, seed)]
    scale = 2.0 if label == "naive" else 1.0
    return {
        "benchmark": "toy", "method": label, "label": label, "seed": seed, "status": "complete",
        "scenario_type": "class_incremental", "experience_names": ["a", "b", "c"], "accuracy_matrix": R,
        "pretrained_accuracy": PRETRAINED, "metrics": {}, "trainable_params": 10, "train_time_s": 1.0,
        "avalanche_metrics": {"StreamForgetting/eval_phase/test_stream": STREAM[(label, seed)]},
        **({"analysis": analysis_record(R, retention, scale + 0.1 * seed)} if analysis else {}),
    }


def write_runs(root, results) -> None:
    for r in results:
        d = root / "runs" / f"{r['benchmark']}__{r['label']}__seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))


@pytest.fixture
def results_dir(tmp_path):
    root = tmp_path / "exp"
    write_runs(root, [make_result(label, seed) for label, seed in RUNS])
    return root


def mean_std(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def test_report_rows_match_hand_computations(results_dir):
    results = load_results(results_dir)
    assert [(r["label"], r["seed"]) for r in results] == [("ewc", 0), ("ewc", 1), ("naive", 0), ("naive", 1)]
    rows = {r["method"]: r for r in report_rows(results)}
    assert set(rows) == {"naive", "ewc"} and rows["naive"]["n_seeds"] == 2 and rows["naive"]["n_analysis"] == 2
    for label, row in rows.items():
        for key, table in (("forgetting", FORGETTING), ("stream_forgetting", STREAM), ("fwt", FWT)):
            mean, std = mean_std([table[(label, s)] for s in (0, 1)])
            assert row[f"{key}_mean"] == pytest.approx(mean) and row[f"{key}_std"] == pytest.approx(std), key
        mean, std = mean_std([RUNS[(label, s)][1] for s in (0, 1)])
        assert row["retention_mean"] == pytest.approx(mean) and row["retention_std"] == pytest.approx(std)
        assert row["retention_change_mean"] == pytest.approx(mean - 0.3)
        assert row["final_acc_mean"] == pytest.approx(np.mean([np.mean(RUNS[(label, s)][0][-1]) for s in (0, 1)]))
    naive = rows["naive"]
    # Chaudhry's max-based forgetting exceeds Avalanche's initial-minus-last where accuracy rose after learning
    assert naive["forgetting_mean"] > naive["stream_forgetting_mean"]
    assert naive["mean_step_cosine_mean"] == pytest.approx(np.mean([0.1 * 2.0, 0.1 * 2.1]))
    assert naive["cumulative_norm_mean"] == pytest.approx(np.mean([3 * 2.0, 3 * 2.1]))
    # last step, last layer, mean over probes / over the earlier probes (None skipped)
    assert naive["cka_pretrained_mean"] == pytest.approx(np.mean([0.5 / 2.0, 0.5 / 2.1]))
    assert naive["cka_learned_mean"] == pytest.approx(0.6) and naive["cka_learned_std"] == pytest.approx(0.0)


def test_rows_without_analysis_or_pretrained_row_are_nan(tmp_path):
    r = make_result("naive", 0, analysis=False)
    single = {**make_result("ewc", 0, analysis=False), "label": "joint", "accuracy_matrix": [[0.8, 0.7, 0.9]]}
    no_pre = {**make_result("ewc", 1, analysis=False), "pretrained_accuracy": None, "avalanche_metrics": {}}
    rows = {row["method"]: row for row in report_rows([r, single, no_pre])}
    assert math.isnan(rows["naive"]["retention_mean"]) and math.isnan(rows["naive"]["cka_pretrained_mean"])
    assert rows["naive"]["fwt_mean"] == pytest.approx(FWT[("naive", 0)]) and rows["naive"]["fwt_std"] == 0.0
    assert math.isnan(rows["joint"]["fwt_mean"]) and math.isnan(rows["joint"]["bwt_mean"])
    assert rows["joint"]["final_acc_mean"] == pytest.approx(0.8)
    assert math.isnan(rows["ewc"]["fwt_mean"]) and math.isnan(rows["ewc"]["stream_forgetting_mean"])


def test_correlations_match_numpy_and_hand_spearman():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 10.0]
    rows = [{"a_mean": a, "b_mean": b} for a, b in zip(x, y)] + [{"a_mean": math.nan, "b_mean": 1.0}, {}]
    c = correlations(rows, "a", "b")
    assert c["n"] == 5
    assert c["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert c["spearman"] == pytest.approx(1 - 6 * 4 / (5 * 24))  # rank differences -1, 1, -1, 1, 0
    ties = correlations([{"a_mean": a, "b_mean": b} for a, b in zip([1, 2, 2, 3], [1, 2, 3, 4])], "a", "b")
    assert ties["spearman"] == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    few = correlations(rows[:2], "a", "b")
    assert few["n"] == 2 and math.isnan(few["pearson"]) and math.isnan(few["spearman"])


def test_write_report_writes_tables_csv_and_plots(results_dir):
    from matplotlib.image import imread

    md_path = write_report(results_dir)
    out = results_dir / "report"
    assert md_path == out / "report.md"
    md = md_path.read_text()
    assert "| naive | 2 |" in md and "| ewc | 2 |" in md
    naive_f = mean_std([FORGETTING[("naive", s)] for s in (0, 1)])
    assert f"{100 * naive_f[0]:.1f} ± {100 * naive_f[1]:.1f}" == "35.0 ± 7.1"
    assert "35.0 ± 7.1" in md  # naive forgetting
    assert "10.0 ± 7.1" in md  # naive FWT
    assert "45.0 ± 7.1" in md  # naive retention
    assert "max-based" in md and "initial-minus-last" in md
    corr = correlations(report_rows(load_results(results_dir)), "mean_step_cosine", "forgetting")
    assert corr["n"] == 2 and "| step cosine | forgetting | - | - | 2 |" in md
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["ewc", "naive"]
    assert float(rows[1]["forgetting_mean"]) == pytest.approx(naive_f[0])
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    for name in ("toy_naive_matrix", "toy_ewc_cosine", "toy_naive_layer_norms", "toy_ewc_cka", "toy_accuracy_curves",
                 "toy_accumulation_retention", "toy_mean_step_cosine_vs_forgetting"):
        assert f"plots/{name}.png" in links
    for link in links:
        assert (out / link).stat().st_size > 0
    img = imread(out / "plots" / "toy_accumulation_retention.png")
    assert 800 <= img.shape[0] <= 1000 and 1000 <= img.shape[1] <= 1300  # 6.5 x 5 in at 200 dpi, tight box
    img = imread(out / "plots" / "toy_naive_cosine.png")
    assert img.shape[1] > img.shape[0]  # square heatmap plus colour bar


def test_broken_and_incomplete_runs_are_skipped(results_dir, capsys):
    bad = results_dir / "runs" / "bad"
    bad.mkdir()
    (bad / "result.json").write_text('{"benchmark": "toy", ')
    running = results_dir / "runs" / "running"
    running.mkdir()
    (running / "result.json").write_text(json.dumps({**make_result("naive", 0), "status": "running", "seed": 9}))
    results = load_results(results_dir)
    assert len(results) == 4 and all(r["seed"] in (0, 1) for r in results)
    err = capsys.readouterr().err
    assert "bad/result.json" in err and "running/result.json" in err and err.count("warning:") == 2


def test_no_runs_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="result.json"):
        load_results(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path)


def test_cli_report(results_dir, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(results_dir), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and "4 runs" in printed
    assert (out / "report.md").is_file() and (out / "report.csv").is_file() and list((out / "plots").glob("*.png"))
    assert main(["report", "/nonexistent"]) == 2
    assert capsys.readouterr().err.startswith("avalanche-merge: ")
    assert main(["report", str(tmp_path / "rep")]) == 2  # a folder without runs
    assert "avalanche-merge: no runs/" in capsys.readouterr().err
