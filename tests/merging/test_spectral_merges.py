"""Spectral merges (TSV-M, Iso-C, Iso-CTS): closed-form references, invariants, errors."""

import pytest
import torch

from avalanche_merge.merging import TaskVector, iso_c, iso_cts, tsv

SHAPES = {"a.weight": (12, 8), "a.bias": (8,), "b.weight": (6, 10)}
MATRICES = [k for k, s in SHAPES.items() if len(s) == 2]
OTHERS = [k for k, s in SHAPES.items() if len(s) != 2]


def _tvs(n=3, seed=0):
    torch.manual_seed(seed)
    return [TaskVector({k: torch.randn(s) for k, s in SHAPES.items()}) for _ in range(n)]


def _mean(tvs, k):
    return sum(tv[k] for tv in tvs) / len(tvs)


def _sum(tvs, k):
    return sum(tv[k] for tv in tvs)


def _svals(m):
    return torch.linalg.svdvals(m.double())


def _assert_flat_spectrum(m, value):
    """All min(m, n) singular values of ``m`` equal ``value`` > 0."""
    s = _svals(m)
    assert float(value) > 0
    assert torch.allclose(s, torch.full_like(s, float(value)), rtol=1e-4, atol=1e-5), s


# Iso-C ----------------------------------------------------------------------------------------------------------
def test_iso_c_of_one_task_vector_is_its_isotropic_matrix():
    (tv,) = _tvs(1)
    merged = iso_c([tv])
    for k in MATRICES:
        u, s, vh = torch.linalg.svd(tv[k], full_matrices=False)
        ref = u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh
        assert torch.allclose(merged[k], ref, atol=1e-5), k
    for k in OTHERS:
        assert torch.allclose(merged[k], tv[k], atol=1e-7)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_iso_c_flattens_the_spectrum_of_the_summed_matrix(n):
    tvs = _tvs(n, seed=n)
    merged = iso_c(tvs)
    for k in MATRICES:
        total = _sum(tvs, k)
        _assert_flat_spectrum(merged[k], _svals(total).mean())
        # same singular subspaces as the sum: U^T merged V is mean(S) * I
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        assert torch.allclose(u.T @ merged[k] @ vh.T, s.mean() * torch.eye(len(s)), atol=1e-5)
    for k in OTHERS:
        assert torch.allclose(merged[k], _mean(tvs, k), atol=1e-6)


def test_iso_c_exclude_averages_the_named_matrix():
    tvs = _tvs(3)
    merged = iso_c(tvs, exclude=["b.weight"])
    assert torch.allclose(merged["b.weight"], _mean(tvs, "b.weight"), atol=1e-6)
    assert torch.allclose(merged["a.weight"], iso_c(tvs)["a.weight"], atol=1e-6)


# TSV-M ----------------------------------------------------------------------------------------------------------
def _orthogonal_task_vectors(n_tasks, seed=0):
    """Task vectors whose matrices have mutually orthogonal row and column spaces, each of rank
    min(m, n) // n_tasks (a sum of rank-1 outer products of disjoint columns of random orthogonal matrices)."""
    g = torch.Generator().manual_seed(seed)
    tvs = [{} for _ in range(n_tasks)]
    for k, shape in SHAPES.items():
        if len(shape) != 2:
            for tv in tvs:
                tv[k] = torch.randn(shape, generator=g)
            continue
        m, n = shape
        ql, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        qr, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        rank = min(m, n) // n_tasks
        for t, tv in enumerate(tvs):
            cols = range(t * rank, (t + 1) * rank)
            coef = 0.5 + torch.rand(rank, generator=g, dtype=torch.float64) * 2.0
            tv[k] = sum(c * torch.outer(ql[:, j], qr[:, j]) for c, j in zip(coef, cols)).float()
    return [TaskVector(tv) for tv in tvs]


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_tsv_of_orthogonal_task_vectors_is_their_sum(n_tasks):
    tvs = _orthogonal_task_vectors(n_tasks, seed=n_tasks)
    for k in MATRICES:  # the construction really is mutually orthogonal
        for i in range(n_tasks):
            for j in range(i + 1, n_tasks):
                assert (tvs[i][k] @ tvs[j][k].T).abs().max() < 1e-5
                assert (tvs[i][k].T @ tvs[j][k]).abs().max() < 1e-5
    merged = tsv(tvs)
    for k in MATRICES:
        assert torch.allclose(merged[k], _sum(tvs, k), atol=1e-5), k
    for k in OTHERS:
        assert torch.allclose(merged[k], _mean(tvs, k), atol=1e-6)


def test_tsv_of_one_task_vector_returns_it():
    (tv,) = _tvs(1)
    merged = tsv([tv])
    for k in SHAPES:
        assert torch.allclose(merged[k], tv[k], atol=1e-5), k


def test_tsv_averages_non_matrix_and_excluded_entries():
    tvs = _tvs(4)
    merged = tsv(tvs, exclude={"a.weight"})
    for k in [*OTHERS, "a.weight"]:
        assert torch.allclose(merged[k], _mean(tvs, k), atol=1e-6), k
    assert not torch.allclose(merged["b.weight"], _mean(tvs, "b.weight"), atol=1e-3)


def test_tsv_keeps_each_task_rank_min_over_t():
    tvs = _tvs(2)
    merged = tsv(tvs)
    for k in MATRICES:
        s = _svals(merged[k])
        full = min(SHAPES[k])
        # 2 tasks x (full // 2) triplets = full directions; the result is full rank
        assert (s > 1e-4).sum() == 2 * (full // 2)


# Iso-CTS --------------------------------------------------------------------------------------------------------
def test_iso_cts_with_full_common_fraction_equals_iso_c():
    tvs = _tvs(3)
    ours, ref = iso_cts(tvs, common_fraction=1.0), iso_c(tvs)
    for k in SHAPES:
        assert torch.allclose(ours[k], ref[k], atol=1e-5), k


@pytest.mark.parametrize("fraction", [0.5, 0.8])
@pytest.mark.parametrize("n", [2, 3])
def test_iso_cts_has_flat_nonzero_spectrum(fraction, n):
    tvs = _tvs(n, seed=10 + n)
    merged = iso_cts(tvs, common_fraction=fraction)
    for k in MATRICES:
        s = _svals(merged[k])
        assert s[0] > 0
        _assert_flat_spectrum(merged[k], s[0])
    for k in OTHERS:
        assert torch.allclose(merged[k], _mean(tvs, k), atol=1e-6)


def test_iso_cts_flat_value_is_the_mean_of_the_kept_singular_values_with_one_task():
    (tv,) = _tvs(1)
    # one task and common_fraction 1: every direction is common, the value is mean(S) of the matrix
    merged = iso_cts([tv], common_fraction=1.0)
    for k in MATRICES:
        _assert_flat_spectrum(merged[k], _svals(tv[k]).mean())


def test_iso_cts_exclude_averages_the_named_matrix():
    tvs = _tvs(3)
    merged = iso_cts(tvs, exclude=["a.weight"])
    assert torch.allclose(merged["a.weight"], _mean(tvs, "a.weight"), atol=1e-6)
    _assert_flat_spectrum(merged["b.weight"], _svals(merged["b.weight"])[0])


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (0.0, ValueError), (1.5, ValueError),
                                              (-0.2, ValueError), ("x", TypeError), (True, TypeError)])
def test_iso_cts_rejects_bad_common_fraction(value, error):
    with pytest.raises(error, match="common_fraction") as info:
        iso_cts(_tvs(2), common_fraction=value)
    if error is ValueError:
        assert str(value) in str(info.value)
    else:
        assert type(value).__name__ in str(info.value)


@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_unknown_exclude_name_raises(fn):
    with pytest.raises(ValueError, match="'nope.weight'"):
        fn(_tvs(2), exclude=["a.weight", "nope.weight"])


@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_zero_task_vectors_merge_to_zero(fn):
    zeros = [TaskVector.zeros_like(tv) for tv in _tvs(3)]
    merged = fn(zeros)
    for k in SHAPES:
        assert merged[k].shape == zeros[0][k].shape
        assert torch.equal(merged[k], torch.zeros(SHAPES[k])), k


@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_incompatible_task_vectors_raise(fn):
    tvs = _tvs(2)
    other = TaskVector({"z": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="'a.weight'"):
        fn([tvs[0], other])
    with pytest.raises(ValueError, match="at least one task vector"):
        fn([])


@pytest.mark.parametrize("fn", [tsv, iso_c, iso_cts])
def test_spectral_merges_keep_shapes_dtype_and_inputs(fn):
    tvs = _tvs(3)
    before = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    merged = fn(tvs)
    assert merged.keys() == tvs[0].keys()
    for k, s in SHAPES.items():
        assert merged[k].shape == s
        assert merged[k].dtype == torch.float32
        assert torch.isfinite(merged[k]).all()
    for tv, b in zip(tvs, before):
        for k in SHAPES:
            assert torch.equal(tv[k], b[k]), "merge modified an input"


def test_iso_cts_never_loses_a_whole_matrix():
    torch.manual_seed(0)
    tvs = [TaskVector({"w": torch.randn(2, 6)}) for _ in range(3)]
    merged = iso_cts(tvs, common_fraction=0.1)
    assert torch.linalg.matrix_rank(merged["w"]) >= 1


def test_svd_falls_back_to_float64_when_lapack_fails(monkeypatch):
    from avalanche_merge.merging import spectral

    real_svd = torch.linalg.svd
    calls = []

    def flaky(m, full_matrices=True):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(m, full_matrices=full_matrices)

    torch.manual_seed(0)
    m = torch.randn(6, 4)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = spectral.reduced_svd(m)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close((u * s) @ vh, m, rtol=1e-5, atol=1e-5)
