"""Small-multiple accuracy curves: one row per family, baselines on every row, legends outside the axes, one
colour per method in every figure, PNG/PDF/SVG output."""

import numpy as np
import pytest

from avalanche_merge.analysis.family_plots import family_figure, method_style, plot_family_curves
from avalanche_merge.analysis.plots import check_formats, figure_formats, save_figure


def _run(method, seed, *, label=None, n=3, scenario="domain_incremental", offset=0.0):
    rng = np.random.default_rng(seed + 17 * len(method))
    mat = np.clip(rng.uniform(0.3, 0.9, size=(1 if method == "joint" else n, n)) + offset, 0, 1)
    return {"label": label or method, "method": method, "benchmark": "toy", "seed": seed,
            "accuracy_matrix": mat.tolist(), "scenario_type": scenario, "pretrained_accuracy": [0.4] * n}


def _results(methods, seeds=(0, 1)):
    return [_run(m, s) for m in methods for s in seeds]


def _line_colours(ax):
    return {line.get_label(): line.get_color() for line in ax.get_lines()}


def test_one_row_per_family_with_the_baselines_on_every_row():
    import matplotlib.pyplot as plt

    fig = family_figure(_results(["naive", "replay", "joint", "ewc", "opcm", "magmax", "inflora", "ncm"]))
    try:
        axes = np.array(fig.axes).reshape(-1, 2)
        ylabels = [row[0].get_ylabel().split("\n")[0] for row in axes]
        assert ylabels == ["merging", "lora", "retrieval", "baseline"]  # families first, baselines last
        for row, members in zip(axes, (["opcm", "magmax"], ["inflora"], ["ncm"], ["naive", "replay", "ewc"])):
            for ax in row:
                names = set(_line_colours(ax))
                assert set(members) <= names
                assert {"naive", "replay"} <= names  # the reference baselines on every row
                assert "joint (trained once)" in names
                assert not ({"opcm", "inflora", "ncm"} - set(members)) & names  # no other family's method
        assert "ewc" not in _line_colours(axes[0][0])  # only the reference baselines visit other rows
    finally:
        plt.close(fig)


def test_legends_sit_outside_every_axes():
    import matplotlib.pyplot as plt

    fig = family_figure(_results(["naive", "replay", "opcm", "magmax", "continual_ta", "inflora"]))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), "a legend covers an axes"
    finally:
        plt.close(fig)


def test_a_method_has_the_same_colour_in_every_figure():
    import matplotlib.pyplot as plt

    a = family_figure(_results(["naive", "opcm", "magmax", "inflora"]))
    b = family_figure(_results(["naive", "tsv_merge", "opcm"]))  # other company, other order
    try:
        ca = {k: v for ax in a.axes for k, v in _line_colours(ax).items()}
        cb = {k: v for ax in b.axes for k, v in _line_colours(ax).items()}
        for name in ("naive", "opcm"):
            assert ca[name] == cb[name]
        assert ca["opcm"] != ca["magmax"]  # within a family, distinct
    finally:
        plt.close(a)
        plt.close(b)


def test_styles_are_deterministic_and_ablations_keep_their_colour():
    colour, dash, _ = method_style("inflora", "lora")
    colour2, dash2, _ = method_style("inflora", "lora", "inflora-shared")
    assert colour == colour2 and dash == "-" and dash2 == "--"
    assert method_style("naive", "baseline")[0] == "#000000"
    assert method_style("not_registered", "other") == method_style("not_registered", "other")


def test_every_requested_format_is_written(tmp_path):
    written = plot_family_curves(_results(["naive", "opcm"]), tmp_path / "f.png", title="t",
                                 formats=("png", "pdf", "svg"))
    assert [p.suffix for p in written] == [".png", ".pdf", ".svg"]
    assert written[1].read_bytes()[:4] == b"%PDF"
    assert b"<svg" in written[2].read_bytes()[:2000]
    from matplotlib.image import imread

    img = imread(written[0])
    assert img.shape[0] > 500 and img.std() > 0.01  # a real, non-blank raster at 200 dpi


def test_figure_formats_block_applies_to_plots_saved_without_formats(tmp_path):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    with figure_formats("svg,pdf"):
        written = save_figure(fig, tmp_path / "x.png")
    plt.close(fig)
    assert sorted(p.suffix for p in written) == [".pdf", ".svg"]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("bad", ["", "jpg", "png,tiff", []])
def test_bad_formats_are_refused_naming_the_valid_ones(bad):
    with pytest.raises(ValueError, match="png, pdf, svg"):
        check_formats(bad)


def test_no_runs_is_a_clear_error():
    with pytest.raises(ValueError, match="no runs"):
        family_figure([])
