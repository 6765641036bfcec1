"""Task signatures (DP-GMM / k-means centroids) for task retrieval on synthetic Gaussian mixtures."""

import numpy as np
import pytest
import torch

from avalanche_merge.retrieval.router import Router
from avalanche_merge.retrieval.signatures import SignatureConfig, TaskSignatures

N_TASKS, N_COMP, DIM, N = 4, 3, 16, 200


def mixtures(sep, *, comp_spread=0.5, seed=0):
    """Train / test embeddings of ``N_TASKS`` tasks, each a ``N_COMP``-component unit-variance Gaussian mixture.

    Task ``t`` is centred at ``2 * sep * e_t`` (pairwise centre distance ``2 * sqrt(2) * sep``); its components are
    spread around that centre by ``comp_spread * sep`` in a random direction.
    """
    g = np.random.default_rng(seed)
    train, test = [], []
    for t in range(N_TASKS):
        center = np.zeros(DIM)
        center[t] = 2.0 * sep
        offsets = g.standard_normal((N_COMP, DIM))
        means = center + comp_spread * sep * offsets / np.linalg.norm(offsets, axis=1, keepdims=True)

        def sample(m, means=means):
            c = g.integers(0, N_COMP, m)
            return torch.from_numpy((means[c] + g.standard_normal((m, DIM))).astype(np.float32))

        train.append(sample(N))
        test.append(sample(N))
    return train, torch.cat(test), torch.arange(N_TASKS).repeat_interleave(N)


def fitted(train, **config):
    sig = TaskSignatures(config=SignatureConfig(**config))
    for x in train:
        sig.add_task(x)
    return sig


def accuracy(sig, x, y):
    return (sig.route(x) == y).double().mean().item()


@pytest.mark.parametrize("config", [
    {"method": "dpgmm"},
    {"method": "dpgmm", "covariance_type": "full", "reduce": "whiten"},
    {"method": "dpgmm", "reduce": None},
    {"method": "centroid"},
])
def test_well_separated_mixtures_are_retrieved(config):
    train, x, y = mixtures(8.0, comp_spread=1.0)
    sig = fitted(train, **config)
    assert isinstance(sig, Router)
    assert sig.num_tasks == N_TASKS and len(sig.fit_seconds) == N_TASKS
    assert all(t >= 0 for t in sig.fit_seconds)
    scores = sig.scores(x)
    assert scores.shape == (N_TASKS * N, N_TASKS) and torch.isfinite(scores).all()
    routed = sig.route(x)
    assert routed.dtype == torch.long and routed.shape == (N_TASKS * N,)
    assert accuracy(sig, x, y) >= 0.98


@pytest.mark.parametrize("method", ["dpgmm", "centroid"])
def test_accuracy_declines_as_mixtures_overlap(method):
    accs = []
    for sep in (8.0, 4.0, 2.0, 1.0, 0.5):
        train, x, y = mixtures(sep)
        accs.append(accuracy(fitted(train, method=method), x, y))
    # measured (seed 0): dpgmm ~ [1.0, 1.0, 0.99, 0.81, 0.52]; centroid ~ [1.0, 1.0, 0.99, 0.79, 0.45]
    assert accs[0] > 0.95 and accs[-1] < 0.7
    assert all(b <= a + 0.02 for a, b in zip(accs, accs[1:])), accs


def test_signatures_live_in_one_shared_space():
    train, x, y = mixtures(4.0)
    sig = fitted(train, dim=8)
    assert sig.projection is not None and sig.projection.n_components_ == 8
    assert all(m.means_.shape[1] == 8 for m in sig.models)  # every task scored in the same coordinates
    sig_full = fitted(train, dim=1000)  # clipped to the embedding dimension
    assert sig_full.projection.n_components_ == DIM


@pytest.mark.parametrize("method", ["dpgmm", "centroid"])
@pytest.mark.parametrize("reduce", [None, "pca"])
def test_few_samples_warns_and_falls_back(method, reduce):
    g = np.random.default_rng(0)
    sig = TaskSignatures(config=SignatureConfig(method=method, reduce=reduce, covariance_type="full"))
    sig.add_task(torch.from_numpy(g.standard_normal((300, 32))))
    with pytest.warns(UserWarning, match=r"task 1 has 5 samples.* 32 dimensions"):
        sig.add_task(torch.from_numpy(g.standard_normal((5, 32)) + 6.0))
    with pytest.warns(UserWarning, match="task 2"):
        sig.add_task(np.full((1, 32), -6.0))
    q = np.concatenate([g.standard_normal((50, 32)), g.standard_normal((50, 32)) + 6.0])
    assert torch.isfinite(sig.scores(q)).all()
    assert (sig.route(q) == torch.arange(2).repeat_interleave(50)).double().mean() >= 0.8


def test_tiny_first_task_and_degenerate_tasks_do_not_crash():
    g = np.random.default_rng(1)
    sig = TaskSignatures(config=SignatureConfig(covariance_type="full"))
    with pytest.warns(UserWarning, match="task 0 has 5 samples"):
        sig.add_task(g.standard_normal((5, 32)))
    with pytest.warns(UserWarning, match="task 1"):
        sig.add_task(np.ones((10, 32)))  # all samples identical (10 samples > 5 PCA dimensions)
    sig.add_task(np.c_[g.standard_normal((60, 1)), np.zeros((60, 31))])  # rank-1 embeddings
    assert sig.num_tasks == 3
    assert torch.isfinite(sig.scores(g.standard_normal((4, 32)))).all()


@pytest.mark.parametrize("method", ["dpgmm", "centroid"])
def test_deterministic_under_seed(method):
    train, x, _ = mixtures(2.0)
    a = fitted(train, method=method, seed=3).scores(x)
    b = fitted(train, method=method, seed=3).scores(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["dpgmm", "centroid"])
def test_batched_route_equals_per_sample_route(method):
    train, x, _ = mixtures(1.0)
    sig = fitted(train, method=method)
    x = x[::37]
    batched = sig.route(x)
    single = torch.cat([sig.route(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(batched, single)
    assert torch.equal(sig.route(x.numpy()), batched)  # numpy input too
    assert torch.equal(sig.route(x.double()), batched)


def test_centroid_score_is_minus_squared_distance_to_nearest_centroid():
    sig = TaskSignatures(config=SignatureConfig(method="centroid", reduce=None, n_components=1))
    sig.add_task(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    sig.add_task(torch.tensor([[10.0, 10.0], [10.0, 12.0]]))
    scores = sig.scores(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(scores, torch.tensor([[-1.0, -(81.0 + 100.0)]], dtype=torch.float64))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "knn"}, "method must be one of"),
    ({"covariance_type": "tied"}, "covariance_type must be one of"),
    ({"reduce": "umap"}, "reduce must be one of"),
    ({"n_components": 0}, "n_components must be an int >= 1"),
    ({"n_components": 2.5}, "n_components must be an int >= 1"),
    ({"dim": 0}, "dim must be an int >= 1"),
    ({"reg_covar": 0.0}, r"reg_covar must be in \(0.0, inf\]"),
    ({"max_iter": -1}, "max_iter must be an int >= 1"),
    ({"weight_concentration_prior": -1.0}, "weight_concentration_prior must be in"),
    ({"seed": -1}, "seed must be an int >= 0"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SignatureConfig(**kwargs)


def test_bad_embeddings_raise():
    sig = TaskSignatures()
    with pytest.raises(RuntimeError, match="no task signatures"):
        sig.route(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        sig.add_task(torch.zeros(8))
    with pytest.raises(ValueError, match="float"):
        sig.add_task(torch.zeros(8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one sample"):
        sig.add_task(torch.zeros(0, 4))
    sig.add_task(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="dimension 4 .*got 5"):
        sig.add_task(torch.randn(40, 5))
    with pytest.raises(ValueError, match="dimension 4 .*got 3"):
        sig.scores(torch.randn(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        sig.scores(torch.full((2, 4), float("nan")))
    assert sig.num_tasks == 1
