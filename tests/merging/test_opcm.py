"""OPCM: the reduced-SVD projection against the published one, the projection's properties, the merger."""

import pytest
import torch
from torch import nn

from avalanche_merge.merging import (
    OPCM,
    TaskVector,
    linear_weight_names,
    make_merger,
    opcm_project,
    opcm_project_full_svd,
    split_rank,
)

SHAPES = {"a.weight": (12, 8), "a.bias": (12,), "b.weight": (6, 10)}
ALPHAS = [0.0, 0.3, 0.5, 0.9, 1.0]
PAIR_SHAPES = [(20, 12), (12, 20), (16, 16)]


def _tvs(n=3, seed=0):
    torch.manual_seed(seed)
    return [TaskVector({k: torch.randn(s) for k, s in SHAPES.items()}) for _ in range(n)]


def _max_abs(x):
    return float(x.abs().max()) if x.numel() else 0.0


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# split_rank -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("alpha", "expected"), [(0.0, 0), (0.3, 0), (0.4, 1), (0.5, 1), (0.7, 2), (0.8, 2),
                                                 (0.9, 3), (0.95, 3), (1.0, 0)])
def test_split_rank_matches_the_published_definition(alpha, expected):
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # cumsum share: .4 .7 .9 1.0
    assert split_rank(s, alpha) == expected
    # the published one-liner (FusionBench): first index where cumsum / sum > alpha, argmax of a 0/1 vector
    assert split_rank(s, alpha) == int((s.cumsum(0) / s.sum() > alpha).float().argmax())


def test_split_rank_on_a_flat_spectrum():
    s = torch.ones(10)
    assert split_rank(s, 0.5) == 5  # cumsum share 0.1 .. 1.0; the first above 0.5 is 0.6 at index 5
    assert split_rank(s, 0.05) == 0


# projection ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", PAIR_SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_projection_equals_the_published_full_svd_formulation(alpha, shape, dtype):
    merged, task = _pair(shape, dtype, seed=hash((shape, alpha)) % 1000)
    ours = opcm_project(merged, task, alpha)
    ref = opcm_project_full_svd(merged, task, alpha)
    assert ours.shape == task.shape
    assert ours.dtype == task.dtype
    rel = float((ours - ref).norm() / ref.norm())
    assert rel <= (1e-4 if dtype == torch.float32 else 1e-10), rel


@pytest.mark.parametrize("shape", PAIR_SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_projection_removes_the_kept_block_and_the_diagonal(alpha, shape):
    merged, task = _pair(shape, torch.float64, seed=7)
    out = opcm_project(merged, task, alpha).double()
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    r = split_rank(s, alpha)
    tol = 1e-5 * float(task.norm())
    assert _max_abs(u[:, :r].T @ out @ vh[:r].T) < tol
    assert _max_abs(torch.diagonal(u.T @ out @ vh.T)) < tol
    # everything outside the zeroed set is untouched: P_out = P_task off that set
    p_task, p_out = u.T @ task @ vh.T, u.T @ out @ vh.T
    keep = torch.ones_like(p_task, dtype=torch.bool)
    keep.fill_diagonal_(False)
    keep[:r, :r] = False
    assert torch.allclose(p_out[keep], p_task[keep], atol=tol)


def test_projection_in_float32_also_removes_the_kept_components():
    merged, task = _pair((20, 12), torch.float32, seed=3)
    out = opcm_project(merged, task, 0.5)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    r = split_rank(s, 0.5)
    assert r > 0
    tol = 1e-5 * float(task.norm())
    assert _max_abs(u[:, :r].T @ out @ vh[:r].T) < tol
    assert _max_abs(torch.diagonal(u.T @ out @ vh.T)) < tol


def test_projection_is_scale_invariant_in_the_merged_weight():
    merged, task = _pair((16, 16), torch.float64, seed=2)
    assert torch.allclose(opcm_project(merged, task, 0.5), opcm_project(merged * 37.0, task, 0.5), atol=1e-10)


def test_projection_of_a_zero_merged_weight_returns_the_task_unchanged():
    task = torch.randn(6, 4)
    out = opcm_project(torch.zeros(6, 4), task, 0.5)
    assert torch.equal(out, task)
    assert out is not task


@pytest.mark.parametrize("fn", [opcm_project, opcm_project_full_svd])
def test_projection_rejects_bad_inputs(fn):
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(4), torch.randn(4), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(4, 3), torch.randn(3, 4), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        fn(torch.randn(4, 3), torch.randn(4, 3), 1.5)


# OPCM merger ------------------------------------------------------------------------------------------------------
def _reference_second_step(tau1, tau2, alpha, projected):
    s = {k: tau1[k] + (opcm_project_full_svd(tau1[k].double(), tau2[k].double(), alpha).float()
                       if k in projected else tau2[k]) for k in tau1}
    s_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in s.values())))
    scale = (tau1.norm() + tau2.norm()) / 2 / s_norm
    return {k: v * scale for k, v in s.items()}


def test_first_update_is_the_first_task_vector():
    tau1, _, _ = _tvs()
    merger = OPCM(alpha=0.5)
    merged = merger.update(tau1)
    for k in SHAPES:
        assert torch.equal(merged[k], tau1[k])
    assert merger.lambda_t == 1.0
    assert merger.norms == [pytest.approx(tau1.norm())]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_second_update_matches_a_hand_computed_reference(alpha):
    tau1, tau2, _ = _tvs()
    merger = OPCM(alpha=alpha)
    merger.update(tau1)
    merged = merger.update(tau2)
    ref = _reference_second_step(tau1, tau2, alpha, projected={"a.weight", "b.weight"})
    for k in SHAPES:
        assert torch.allclose(merged[k], ref[k], atol=1e-5), k
    assert merged.norm() == pytest.approx((tau1.norm() + tau2.norm()) / 2, rel=1e-5)
    unnormalised = {k: tau1[k] + opcm_project_full_svd(tau1[k], tau2[k], alpha) if k != "a.bias"
                    else tau1[k] + tau2[k] for k in SHAPES}
    s_norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in unnormalised.values())))
    assert merger.lambda_t == pytest.approx(s_norm / ((tau1.norm() + tau2.norm()) / 2), rel=1e-5)


def test_merged_norm_is_the_mean_task_vector_norm_after_every_step():
    tvs = _tvs(5, seed=4)
    tvs = [tv * float(c) for tv, c in zip(tvs, [1.0, 3.0, 0.5, 2.0, 1.5])]
    merger = OPCM(alpha=0.5)
    for t, tv in enumerate(tvs, start=1):
        merged = merger.update(tv)
        mean_norm = sum(x.norm() for x in tvs[:t]) / t
        assert merged.norm() == pytest.approx(mean_norm, rel=1e-5)


def test_linear_names_restrict_the_projection():
    tau1, tau2, _ = _tvs()
    merger = OPCM(alpha=0.5, linear=["a.weight"])
    merger.update(tau1)
    merged = merger.update(tau2)
    ref = _reference_second_step(tau1, tau2, 0.5, projected={"a.weight"})
    for k in SHAPES:
        assert torch.allclose(merged[k], ref[k], atol=1e-5), k
    # b.weight is summed unprojected: merged = (tau1 + tau2) / lambda
    lam = merger.lambda_t
    assert torch.allclose(merged["b.weight"], (tau1["b.weight"] + tau2["b.weight"]) / lam, atol=1e-6)
    everything = OPCM(alpha=0.5)
    everything.update(tau1)
    assert not torch.allclose(everything.update(tau2)["b.weight"], merged["b.weight"], atol=1e-3)


def test_linear_predicate_restricts_the_projection():
    tau1, tau2, _ = _tvs()
    by_name, by_predicate = OPCM(linear=["b.weight"]), OPCM(linear=lambda name, t: name.startswith("b."))
    for m in (by_name, by_predicate):
        m.update(tau1)
    a, b = by_name.update(tau2), by_predicate.update(tau2)
    for k in SHAPES:
        assert torch.allclose(a[k], b[k], atol=1e-7), k


def test_linear_naming_a_non_matrix_does_not_project_it():
    tau1, tau2, _ = _tvs()
    merger = OPCM(linear=["a.weight", "b.weight", "a.bias"])
    merger.update(tau1)
    merged = merger.update(tau2)
    ref = _reference_second_step(tau1, tau2, 0.5, projected={"a.weight", "b.weight"})
    for k in SHAPES:
        assert torch.allclose(merged[k], ref[k], atol=1e-5), k


def test_linear_naming_an_unknown_key_raises():
    merger = OPCM(linear=["a.weight", "missing.weight"])
    with pytest.raises(ValueError, match="'missing.weight'"):
        merger.update(_tvs(1)[0])
    with pytest.raises(TypeError, match="linear"):
        OPCM(linear=3)


def test_a_zero_previous_merged_weight_passes_tau_unchanged():
    tau1, tau2, _ = _tvs()
    tau1 = TaskVector({k: (torch.zeros_like(v) if k == "a.weight" else v) for k, v in tau1.items()})
    merger = OPCM(alpha=0.5)
    merger.update(tau1)
    merged = merger.update(tau2)
    assert torch.allclose(merged["a.weight"] * merger.lambda_t, tau2["a.weight"], atol=1e-6)
    ref = _reference_second_step(tau1, tau2, 0.5, projected={"b.weight"})
    for k in SHAPES:
        assert torch.allclose(merged[k], ref[k], atol=1e-5), k


def test_zero_task_vectors_merge_to_zero():
    merger = OPCM()
    for tv in _tvs(3):
        merged = merger.update(TaskVector.zeros_like(tv))
        assert merged.norm() == 0.0


def test_two_runs_are_bit_identical():
    tvs = _tvs(4, seed=9)
    a, b = OPCM(alpha=0.5), make_merger("opcm", alpha=0.5)
    for tv in tvs:
        ma, mb = a.update(tv), b.update(tv)
        for k in SHAPES:
            assert torch.equal(ma[k], mb[k]), k
    assert a.norms == b.norms
    assert a.lambda_t == b.lambda_t


def test_full_svd_projection_gives_the_same_merge():
    tvs = _tvs(4, seed=5)
    fast, slow = OPCM(alpha=0.5), OPCM(alpha=0.5, project=opcm_project_full_svd)
    for tv in tvs:
        mf, ms = fast.update(tv), slow.update(tv)
    for k in SHAPES:
        assert torch.allclose(mf[k], ms[k], atol=1e-5), k


def test_merger_does_not_modify_its_inputs():
    tvs = _tvs(3)
    before = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    merger = OPCM()
    for tv in tvs:
        merger.update(tv)
    for tv, b in zip(tvs, before):
        for k in SHAPES:
            assert torch.equal(tv[k], b[k])


def test_linear_weight_names():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert linear_weight_names(model) == ["0.weight", "2.weight"]
    assert linear_weight_names(nn.Linear(2, 2)) == ["weight"]
    assert linear_weight_names(nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm(4))) == []
    names = linear_weight_names(model)
    assert set(names) <= set(model.state_dict())
