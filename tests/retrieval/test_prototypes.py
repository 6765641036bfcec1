"""NCM and RanPAC cores (avalanche_merge.retrieval.prototypes) and their Avalanche strategies."""

import numpy as np
import pytest
import torch
from conftest import tiny_experiment

from avalanche_merge.config import ConfigError
from avalanche_merge.retrieval.prototypes import (
    NCMConfig,
    NearestClassMean,
    RanPAC,
    RanPACConfig,
    default_ridge_grid,
)


def _blobs(n_per_class=20, k=3, d=5, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    x = torch.cat([centers[c] + spread * torch.randn(n_per_class, d, generator=g) for c in range(k)])
    y = torch.arange(k).repeat_interleave(n_per_class)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


# ---------------------------------------------------------------- NCM


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_means_equal_direct_computation_across_batches(metric):
    x, y = _blobs(k=4)
    ncm = NearestClassMean(5, 6, NCMConfig(metric=metric))
    for chunk in torch.arange(len(y)).split(7):
        ncm.update(x[chunk], y[chunk])
    xs = torch.nn.functional.normalize(x.double(), dim=1) if metric == "cosine" else x.double()
    for c in range(4):
        torch.testing.assert_close(ncm.means[c], xs[y == c].mean(0))
    assert ncm.seen.tolist() == [True] * 4 + [False] * 2
    assert torch.all(ncm.means[4:] == 0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_predicts_separable_data_and_never_unseen_classes(metric):
    x, y = _blobs(k=3, seed=1)
    ncm = NearestClassMean(5, 5, NCMConfig(metric=metric))
    assert torch.all(ncm.logits(x) == 0)  # nothing seen yet
    ncm.update(x, y)
    xt, yt = _blobs(k=3, seed=1, n_per_class=10)  # same centers, fresh noise
    assert (ncm.predict(xt) == yt).float().mean() == 1.0
    logits = ncm.logits(xt)
    assert logits.dtype == xt.dtype and logits.shape == (30, 5)
    assert torch.all(logits[:, 3:] < logits[:, :3].min(dim=1, keepdim=True).values)


def test_ncm_euclidean_logits_are_negative_squared_distances():
    x, y = _blobs()
    ncm = NearestClassMean(5, 3, NCMConfig(metric="euclidean"))
    ncm.update(x, y)
    expected = -torch.cdist(x.double(), ncm.means).pow(2)
    torch.testing.assert_close(ncm.logits(x.double()), expected)


def test_ncm_cosine_logits_are_cosine_similarities_to_the_means_of_unit_features():
    """Kills un-normalised features in the means, un-normalised means at prediction, dot products for cosines."""
    x, y = _blobs(k=3, seed=3, spread=1.5)  # spread classes: means of unit features have norms well below 1
    ncm = NearestClassMean(5, 3)
    ncm.update(x, y)
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    means = torch.stack([unit[y == c].mean(0) for c in range(3)])
    assert (1 - means.norm(dim=1)).min() > 1e-2 and means.norm(dim=1).std() > 1e-3
    expected = unit @ torch.nn.functional.normalize(means, dim=1).T
    torch.testing.assert_close(ncm.logits(x.double()), expected)


def test_ncm_euclidean_with_normalized_features_uses_unit_features_throughout():
    x, y = _blobs(k=3, seed=4)
    ncm = NearestClassMean(5, 3, NCMConfig(metric="euclidean", normalize_features=True))
    ncm.update(x, y)
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    means = torch.stack([unit[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(ncm.means, means)
    torch.testing.assert_close(ncm.logits(x.double()), -torch.cdist(unit, means).pow(2))


def test_ncm_bad_inputs():
    with pytest.raises(ValueError, match="metric must be 'cosine' or 'euclidean', got 'l1'"):
        NCMConfig(metric="l1")
    with pytest.raises(TypeError):
        NCMConfig("cosine")  # keyword-only
    ncm = NearestClassMean(5, 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        ncm.update(torch.zeros(2, 5), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"features must have shape \(n, 5\)"):
        ncm.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="feature_dim must be >= 1, got 0"):
        NearestClassMean(0, 3)


# ---------------------------------------------------------------- RanPAC


def test_ranpac_fixed_ridge_equals_normal_equations():
    x, y = _blobs(k=3)
    model = RanPAC(5, 4, RanPACConfig(projection_dim=40, ridge=0.5, seed=3))
    model.update(x, y)
    h = torch.relu(x.double() @ model.projection)
    Y = torch.nn.functional.one_hot(y, 4).double()
    expected = torch.linalg.solve(h.T @ h + 0.5 * torch.eye(40, dtype=torch.float64), h.T @ Y)
    torch.testing.assert_close(model.W_out, expected)
    torch.testing.assert_close(model.logits(x.double()), h @ expected)
    assert model.ridge == 0.5 and model.selection_history == []


def test_ranpac_projection_is_seeded_gaussian():
    a = RanPAC(5, 3, RanPACConfig(projection_dim=30, seed=7))
    b = RanPAC(5, 3, RanPACConfig(projection_dim=30, seed=7))
    c = RanPAC(5, 3, RanPACConfig(projection_dim=30, seed=8))
    assert a.projection.shape == (5, 30)
    assert torch.equal(a.projection, b.projection) and not torch.equal(a.projection, c.projection)
    torch.testing.assert_close(a.projection, torch.randn(5, 30, generator=torch.Generator().manual_seed(7),
                                                         dtype=torch.float64))
    raw = RanPAC(5, 3, RanPACConfig(projection_dim=0))
    assert raw.projection is None and raw.hidden_dim == 5


def test_ranpac_accumulation_across_tasks_equals_fit_on_union():
    x, y = _blobs(k=4, seed=2)
    tasks = [y < 2, y >= 2]
    cfg = RanPACConfig(projection_dim=50, ridge=1.0)
    sequential = RanPAC(5, 4, cfg)
    for mask in tasks:
        sequential.update(x[mask], y[mask])
    union = RanPAC(5, 4, cfg)
    union.update(x, y)
    torch.testing.assert_close(sequential.G, union.G)
    torch.testing.assert_close(sequential.C, union.C)
    torch.testing.assert_close(sequential.W_out, union.W_out)
    assert sequential.n_seen == union.n_seen == len(y)


def test_ranpac_ridge_selection_picks_best_held_out_candidate():
    """Recompute the held-out scores of every candidate directly and check the argmin/argmax is chosen."""
    x, y = _blobs(k=3, seed=4, spread=2.0)  # overlapping classes: the ridge matters
    grid = (1e-6, 1e-2, 1.0, 1e2, 1e6)
    for selection in ("mse", "accuracy"):
        model = RanPAC(5, 3, RanPACConfig(projection_dim=80, ridge_grid=grid, selection=selection, seed=1,
                                          holdout_fraction=0.25))
        model.update(x, y)
        (record,) = model.selection_history
        n_val = round(0.25 * len(y))
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1 + 1 + 0))
        val, fit = perm[:n_val], perm[n_val:]
        assert record["n_val"] == n_val and record["n_fit"] == len(fit)
        h = torch.relu(x.double() @ model.projection)
        Y = torch.nn.functional.one_hot(y, 3).double()
        mses, accs = [], []
        for lam in grid:
            W = torch.linalg.solve(h[fit].T @ h[fit] + lam * torch.eye(80, dtype=torch.float64), h[fit].T @ Y[fit])
            out = h[val] @ W
            mses.append(float((out - Y[val]).pow(2).sum(1).mean()))
            accs.append(float((out.argmax(1) == y[val]).double().mean()))
        np.testing.assert_allclose(record["mse"], mses, rtol=1e-4)  # eigh vs solve at lambda 1e-6
        np.testing.assert_allclose(record["accuracy"], accs)
        best = int(np.argmin(mses)) if selection == "mse" else min(range(5), key=lambda i: (-accs[i], mses[i]))
        assert model.ridge == grid[best]
        # the extremes are not the best on this case, so the selection really discriminates
        assert model.ridge not in (grid[0], grid[-1]) or selection == "accuracy"
        # refit on all data with the chosen lambda
        expected = torch.linalg.solve(h.T @ h + model.ridge * torch.eye(80, dtype=torch.float64), h.T @ Y)
        torch.testing.assert_close(model.W_out, expected)


def test_ranpac_second_task_selection_uses_past_statistics_and_its_own_split():
    """Task 2's candidates are fitted on task 1's statistics plus task 2's non-held-out part, with the split seeded
    by ``seed + 1 + task index``. Kills a selection on the current task only (the official code's) and a split
    seed that does not move with the task."""
    x, y = _blobs(k=4, seed=7, spread=2.0)
    grid = (1e-2, 1.0, 1e2, 1e4)
    model = RanPAC(5, 4, RanPACConfig(projection_dim=60, ridge_grid=grid, seed=2, holdout_fraction=0.3))
    first, second = y < 2, y >= 2
    model.update(x[first], y[first])
    model.update(x[second], y[second])
    record = model.selection_history[1]
    h = torch.relu(x.double() @ model.projection)
    Y = torch.nn.functional.one_hot(y, 4).double()
    h0, Y0, h1, Y1 = h[first], Y[first], h[second], Y[second]
    n = len(h1)
    n_val = min(n - 1, max(1, round(0.3 * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2 + 1 + 1))
    val, fit = perm[:n_val], perm[n_val:]
    G = h0.T @ h0 + h1[fit].T @ h1[fit]
    C = h0.T @ Y0 + h1[fit].T @ Y1[fit]
    eye = torch.eye(60, dtype=torch.float64)
    mses = [float((h1[val] @ torch.linalg.solve(G + lam * eye, C) - Y1[val]).pow(2).sum(1).mean()) for lam in grid]
    assert record["task"] == 1 and record["n_val"] == n_val
    np.testing.assert_allclose(record["mse"], mses, rtol=1e-6)
    assert model.ridge == grid[int(np.argmin(mses))]
    torch.testing.assert_close(model.G, h.T @ h)


def test_ranpac_without_projection_is_ridge_regression_on_the_raw_features():
    x, y = _blobs(k=3)
    model = RanPAC(5, 3, RanPACConfig(projection_dim=0, ridge=0.1))
    model.update(x, y)
    X, Y = x.double(), torch.nn.functional.one_hot(y, 3).double()
    expected = torch.linalg.solve(X.T @ X + 0.1 * torch.eye(5, dtype=torch.float64), X.T @ Y)
    torch.testing.assert_close(model.W_out, expected)
    torch.testing.assert_close(model.logits(x.double()), X @ expected)


def test_ranpac_selection_on_constructed_case_prefers_regularisation():
    """Few noisy samples, many random features: interpolating (tiny lambda) overfits; a huge lambda shrinks the
    outputs to ~0 (MSE ~1). The winner must be strictly inside the grid and beat both ends."""
    x, y = _blobs(n_per_class=15, k=2, seed=5, spread=3.0)
    model = RanPAC(5, 2, RanPACConfig(projection_dim=200, ridge_grid=default_ridge_grid(), seed=0))
    model.update(x, y)
    mse = model.selection_history[0]["mse"]
    best = int(np.argmin(mse))
    assert model.ridge == default_ridge_grid()[best]
    assert 0 < best < len(mse) - 1
    assert mse[best] < mse[0] and mse[best] < mse[-1]


def test_ranpac_is_deterministic_and_learns():
    x, y = _blobs(k=3, seed=6)
    a, b = RanPAC(5, 3, RanPACConfig(projection_dim=64)), RanPAC(5, 3, RanPACConfig(projection_dim=64))
    for m in (a, b):
        m.update(x[y < 2], y[y < 2])
        m.update(x[y == 2], y[y == 2])
    assert a.ridge == b.ridge and torch.equal(a.W_out, b.W_out)
    assert [r["ridge"] for r in a.selection_history] == [r["ridge"] for r in b.selection_history]
    assert (a.predict(x) == y).float().mean() > 0.95


def test_ranpac_before_update_and_tiny_tasks():
    model = RanPAC(5, 3, RanPACConfig(projection_dim=10))
    assert torch.all(model.logits(torch.randn(4, 5)) == 0)
    model.update(torch.randn(1, 5), torch.tensor([1]))  # too small to hold out: grid median
    assert model.ridge == default_ridge_grid()[8] and model.W_out is not None
    with pytest.raises(ValueError, match="no ridge parameter"):
        RanPAC(5, 3, RanPACConfig(projection_dim=10)).fit()


@pytest.mark.parametrize("kwargs, message", [
    ({"projection_dim": -1}, "projection_dim must be >= 0 .* got -1"),
    ({"ridge": 0.0}, r"ridge must be in \(0.0, inf\], got 0.0"),
    ({"ridge_grid": ()}, "ridge_grid must hold at least one candidate"),
    ({"ridge_grid": (1.0, -2.0)}, r"ridge_grid value must be in \(0.0, inf\], got -2.0"),
    ({"holdout_fraction": 1.0}, r"holdout_fraction must be in \(0.0, 1.0\), got 1.0"),
    ({"holdout_fraction": 0.0}, r"holdout_fraction must be in \(0.0, 1.0\), got 0.0"),
    ({"selection": "f1"}, "selection must be 'mse' or 'accuracy', got 'f1'"),
])
def test_ranpac_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RanPACConfig(**kwargs)


def test_ranpac_config_from_json_options():
    from avalanche_merge.config import from_dict

    cfg = from_dict(RanPACConfig, {"projection_dim": 100, "ridge_grid": [0.1, 1.0]})
    assert cfg.ridge_grid == (0.1, 1.0)
    with pytest.raises(ConfigError, match="projection_dim"):
        from_dict(RanPACConfig, {"projection_dim": -3})


# ---------------------------------------------------------------- Avalanche strategies


@pytest.mark.parametrize("method, options", [("ncm", {}), ("ranpac", {"projection_dim": 256})])
def test_tiny_avalanche_run(method, options, tmp_path):
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import execute_run
    from avalanche_merge.strategies import METHODS

    spec = METHODS.get(method)
    assert spec.family == "retrieval" and not spec.pretrained_eval
    (plan,) = plan_experiment(load_experiment(tiny_experiment([{"name": method, "options": options}])))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and result["pretrained_accuracy"] is None
    assert np.diag(R).max() > 0.25, R.tolist()
    assert result["trainable_params"] == 0


def test_strategy_keeps_backbone_frozen_and_core_matches_direct_features():
    from avalanche_merge.benchmarks import BENCHMARKS
    from avalanche_merge.models import BACKBONES
    from avalanche_merge.runner import load_experiment, plan_experiment
    from avalanche_merge.runner.run import make_evaluator, seed_everything
    from avalanche_merge.strategies import METHODS
    from avalanche_merge.strategies.registry import BuildContext, TrainConfig

    (plan,) = plan_experiment(load_experiment(tiny_experiment(["ncm"])))
    bench = BENCHMARKS.get(plan.benchmark).build(plan.benchmark_options, 0)
    seed_everything(0)
    model = BACKBONES.get("tiny_vit").build(plan.model_options, bench, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = BuildContext(model=model, benchmark=bench, train=TrainConfig(epochs=3, batch_size=16),
                       evaluator=make_evaluator([]))
    strategy = METHODS.get("ncm").build(ctx, NCMConfig())
    assert strategy.train_epochs == 1
    exp = bench.train_stream[0]
    strategy.train(exp)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # one pass: the means are those of the experience's features, computed directly
    loader = torch.utils.data.DataLoader(exp.dataset.eval(), batch_size=64)
    direct = NearestClassMean(model.feature_dim, bench.num_classes)
    model.eval()
    with torch.no_grad():
        for x, y, *_ in loader:
            direct.update(model.features(x), y)
    torch.testing.assert_close(strategy.core.counts, direct.counts)
    torch.testing.assert_close(strategy.core.means, direct.means, rtol=1e-4, atol=1e-5)
