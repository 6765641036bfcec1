"""Plots of the analysis record (``analysis.analysis_plots``): the data they show, checked exactly, and the files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avalanche_merge.analysis import analysis_plots as ap
from avalanche_merge.analysis.geometry import cosine_matrix
from avalanche_merge.merging.task_vector import TaskVector


@pytest.fixture
def figures(monkeypatch):
    """Keep the figures instead of saving them, so the drawn data can be inspected."""
    kept = []

    def keep(plt, fig, path):
        kept.append(fig)
        return path

    monkeypatch.setattr(ap, "_save", keep)
    yield kept
    import matplotlib.pyplot as plt

    for fig in kept:
        plt.close(fig)


def test_seed_mean_ignores_missing_values_and_checks_rank():
    seeds = [[[1.0, None], [3.0, 4.0]], [[3.0, 2.0], [5.0, None]]]
    np.testing.assert_array_equal(ap.seed_mean(seeds, 2), [[2.0, 2.0], [4.0, 4.0]])
    np.testing.assert_array_equal(ap.seed_mean(seeds[0], 2), [[1.0, np.nan], [3.0, 4.0]])
    with pytest.raises(ValueError, match="2-D"):
        ap.seed_mean([1.0, 2.0], 2)
    cka = [[[0.5, None, 0.7]], [[None, None, None]]]  # T=2 x L=1 x P=3
    probe = ap.probe_mean(cka)
    assert probe.shape == (2, 1) and probe[0, 0] == pytest.approx(0.6) and math.isnan(probe[1, 0])


def test_cosine_heatmap_of_identical_vectors_is_all_ones(figures, tmp_path):
    v = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.1, 0.0])}
    matrix = cosine_matrix([TaskVector(v), TaskVector(v), TaskVector(v)])
    seeds = [matrix, matrix]
    np.testing.assert_allclose(ap.seed_mean(seeds, 2), np.ones((3, 3)), atol=1e-6)
    ap.plot_cosine_heatmap(seeds, tmp_path / "c.png", title="identical")
    ax = figures[0].axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), np.ones((3, 3)), atol=1e-6)
    assert ax.images[0].get_clim() == (-1, 1)
    assert sorted(t.get_text() for t in ax.texts) == ["1.00"] * 9
    assert ax.get_title() == "identical"


def test_cosine_heatmap_file(tmp_path):
    from matplotlib.image import imread

    path = ap.plot_cosine_heatmap([[1.0, -0.5], [-0.5, 1.0]], tmp_path / "sub" / "c.png")
    img = imread(path)
    assert path.stat().st_size > 0 and img.shape[1] > img.shape[0]


def test_block_prefix_and_grouped_norms():
    assert ap.block_prefix("blocks.0.attn.q.weight") == "blocks.0"
    assert ap.block_prefix("visual.transformer.resblocks.11.mlp.c_fc.weight") == "visual.transformer.resblocks.11"
    assert ap.block_prefix("head.weight") == "head" and ap.block_prefix("cls_token") == "cls_token"
    names = [f"blocks.{b}.p{k}" for b in range(4) for k in range(10)] + ["head.weight", "head.bias"]
    norms = np.ones((2, len(names)))  # T=2
    norms[1, :10] = 2.0
    m, rows, grouped = ap.group_norms(norms, names)
    assert grouped and rows == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    np.testing.assert_allclose(m[:, 0], [math.sqrt(10)] * 4 + [math.sqrt(2)])
    assert m[0, 1] == pytest.approx(math.sqrt(40))  # sqrt of the summed squares
    m, rows, grouped = ap.group_norms(norms[:, :5], names[:5])
    assert not grouped and rows == names[:5] and m.shape == (5, 2)


def test_layer_norms_log_scale_and_grouping_title(figures, tmp_path):
    from matplotlib.colors import LogNorm

    names = [f"blocks.{b}.p{k}" for b in range(4) for k in range(10)]
    ap.plot_layer_norms(np.full((3, 40), 0.5), names, tmp_path / "n.png", title="norms")
    ax = figures[-1].axes[0]
    assert "grouped into 4 blocks" in ax.get_title() and not isinstance(ax.images[0].norm, LogNorm)
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"blocks.{b}" for b in range(4)]
    ap.plot_layer_norms([[1e-3, 1.0, 0.0], [1.0, 1.0, 0.0]], ["a", "b", "c"], tmp_path / "l.png")
    ax = figures[-1].axes[0]
    assert isinstance(ax.images[0].norm, LogNorm) and "grouped" not in ax.get_title()
    assert ax.images[0].get_array().shape == (3, 2)  # layers x experiences


def test_cka_curves_show_probe_means(figures, tmp_path):
    cka = [[[0.9, 0.7], [0.8, 0.6]], [[0.5, 0.7], [0.4, None]]]  # T=2 x L=2 x P=2
    learned = [[[None, None], [None, None]], [[0.9, None], [0.3, None]]]
    ap.plot_cka_curves(cka, ["blocks.0", "blocks.1"], tmp_path / "k.png", learned=learned)
    left, right = figures[0].axes[:2]
    np.testing.assert_allclose(left.lines[0].get_xdata(), [1, 2])
    np.testing.assert_allclose(left.lines[0].get_ydata(), [0.8, 0.6])
    np.testing.assert_allclose(left.lines[1].get_ydata(), [0.7, 0.4])
    np.testing.assert_allclose(right.lines[1].get_ydata(), [np.nan, 0.3])
    with pytest.raises(ValueError, match="layers"):
        ap.plot_cka_curves(cka, ["only_one"], tmp_path / "x.png")


ROWS = [{"method": m, "accumulation_mean": a, "accumulation_std": 0.01, "retention_mean": r, "retention_std": 0.0,
         "forgetting_mean": f, "forgetting_std": 0.02, "mean_step_cosine_mean": c, "mean_step_cosine_std": 0.0,
         "pretrained_accumulation_mean": 0.2, "pretrained_retention_mean": 0.6}
        for m, a, r, f, c in [("naive", 0.8, 0.3, 0.5, 0.1), ("ewc", 0.7, 0.5, 0.2, 0.4),
                              ("lora", 0.6, 0.55, 0.1, 0.5), ("joint", math.nan, math.nan, math.nan, math.nan)]]


def test_accumulation_retention_scatter(figures, tmp_path):
    ap.plot_accumulation_retention(ROWS, tmp_path / "ar.png", "acc vs ret")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.texts] == ["naive", "ewc", "lora"]
    star = [ln for ln in ax.lines if ln.get_marker() == "*"]
    assert len(star) == 1 and star[0].get_xdata()[0] == pytest.approx(20) and star[0].get_ydata()[0] == 60
    with pytest.raises(ValueError, match="held-out"):
        ap.plot_accumulation_retention(ROWS[3:], tmp_path / "none.png")


def test_geometry_vs_forgetting_reports_pearson(figures, tmp_path):
    ap.plot_geometry_vs_forgetting(ROWS, "mean_step_cosine", tmp_path / "g.png", "cos", xlabel="step cosine")
    ax = figures[0].axes[0]
    r = np.corrcoef([0.1, 0.4, 0.5], [0.5, 0.2, 0.1])[0, 1]
    assert f"Pearson r = {r:.2f} (n = 3 methods)" in ax.get_title() and ax.get_xlabel() == "step cosine"


def test_scatter_file_has_expected_size(tmp_path):
    from matplotlib.image import imread

    path = ap.plot_geometry_vs_forgetting(ROWS, "mean_step_cosine", tmp_path / "g.png", "cos")
    h, w = imread(path).shape[:2]
    assert 800 <= h <= 1000 and 1000 <= w <= 1300  # 6.5 x 5 inches at 200 dpi, tight bounding box
