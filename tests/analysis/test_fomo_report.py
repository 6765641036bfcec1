"""Table and KA-vs-ZS plot of fomo runs (avalanche_merge.analysis.fomo)."""

import json

import pytest

from avalanche_merge.analysis.fomo import fomo_markdown, fomo_table, load_fomo_results, plot_ka_zs


def _result(label, seed, ka, zs, steps=5):
    gm = [(a * b) ** 0.5 for a, b in zip(ka, zs, strict=True)]
    fomo = {"A_KA": ka, "A_ZS": zs, "GM": gm, "final_A_KA": ka[-1], "final_A_ZS": zs[-1], "final_GM": gm[-1],
            "mean_GM": sum(gm[1:]) / (len(gm) - 1),
            "budget": {"steps_per_task": steps, "memory_ratio": 0.5, "gradient_free": False,
                       "cost": {"flops": 2e6}}}
    return {"status": "complete", "label": label, "seed": seed, "fomo": fomo}


def test_table_averages_seeds_and_plot_is_written(tmp_path):
    results = [_result("a", 0, [0.4, 0.6], [0.5, 0.3]), _result("a", 1, [0.4, 0.8], [0.5, 0.5]),
               _result("b", 0, [0.4, 0.5], [0.5, 0.5])]
    rows = fomo_table(results)
    assert [r["method"] for r in rows] == ["a", "b"]
    assert rows[0]["final_A_KA"] == pytest.approx(0.7)
    assert rows[0]["final_A_KA_std"] == pytest.approx(0.1414, abs=1e-3)  # sample std over seeds
    assert rows[1]["final_A_KA_std"] == 0.0
    assert "| a | 5 | 0.50 | 2.0 | 70.0 ± 14.1 |" in fomo_markdown(rows)
    path = plot_ka_zs(results, tmp_path / "p.png")
    assert path.stat().st_size > 1000
    for i, r in enumerate(results):
        (tmp_path / "runs" / f"r{i}").mkdir(parents=True)
        (tmp_path / "runs" / f"r{i}" / "result.json").write_text(json.dumps(r))
    (tmp_path / "runs" / "plain").mkdir()
    (tmp_path / "runs" / "plain" / "result.json").write_text(json.dumps({"status": "complete", "label": "x"}))
    assert len(load_fomo_results(tmp_path / "runs")) == 3  # runs without a fomo record are left out
