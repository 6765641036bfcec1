"""Offline merges: equality with peft.utils.merge_utils, invariants, errors."""

import pytest
import torch
from peft.utils import merge_utils as pm

from avalanche_merge.merging import TaskVector, average, breadcrumbs, dare, magmax, task_arithmetic, ties
from avalanche_merge.merging.steps import trim

SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 6)}


def _tvs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [TaskVector({k: torch.randn(s, generator=g) for k, s in SHAPES.items()}) for _ in range(n)]


WEIGHTS = [0.7, 1.3, 0.4, 1.0]


def _peft(fn, tvs, **kw):
    w = torch.tensor(WEIGHTS)
    return {k: fn([tv[k] for tv in tvs], w, **kw) for k in SHAPES}


def _close(ours: TaskVector, ref: dict):
    for k, v in ref.items():
        assert torch.allclose(ours[k], v, atol=1e-6), k


def test_task_arithmetic_equals_peft():
    tvs = _tvs()
    _close(task_arithmetic(tvs, WEIGHTS), _peft(pm.task_arithmetic, tvs))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_magnitude_prune_equals_peft(density):
    tvs = _tvs()
    trimmed = [tv.map(lambda _, v: trim(v, density)) for tv in tvs]
    _close(task_arithmetic(trimmed, WEIGHTS), _peft(pm.magnitude_prune, tvs, density=density))


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_per_tensor_equals_peft(sign_method, density):
    tvs = _tvs()
    ours = ties(tvs, density=density, sign_method=sign_method, trim_scope="tensor", weights=WEIGHTS)
    _close(ours, _peft(pm.ties, tvs, density=density, majority_sign_method=sign_method))


@pytest.mark.parametrize("fn", ["dare_linear", "dare_ties"])
def test_dare_with_density_one_equals_peft(fn):
    tvs = _tvs()
    combine = "task_arithmetic" if fn == "dare_linear" else "ties"
    _close(dare(tvs, density=1.0, combine=combine, weights=WEIGHTS), _peft(getattr(pm, fn), tvs, density=1.0))


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare_with_injected_mask_equals_peft_on_the_same_mask(combine):
    tvs = _tvs()
    g = torch.Generator().manual_seed(5)
    masks = [{k: torch.rand(s, generator=g) < 0.4 for k, s in SHAPES.items()} for _ in tvs]
    ours = dare(tvs, density=0.4, combine=combine, masks=masks, weights=WEIGHTS)
    rescaled = [TaskVector({k: tv[k] * m[k] / 0.4 for k in SHAPES}) for tv, m in zip(tvs, masks)]
    fn = pm.dare_linear if combine == "task_arithmetic" else pm.dare_ties
    _close(ours, _peft(fn, rescaled, density=1.0))  # density 1: peft keeps the pre-masked tensors as they are


def test_dare_is_deterministic_under_a_seed_and_unbiased():
    tvs = _tvs()
    assert torch.equal(dare(tvs, density=0.3, seed=1)["a.weight"], dare(tvs, density=0.3, seed=1)["a.weight"])
    assert not torch.equal(dare(tvs, density=0.3, seed=1)["a.weight"], dare(tvs, density=0.3, seed=2)["a.weight"])
    big = TaskVector({"w": torch.ones(200_000)})
    assert dare([big], density=0.25, seed=0)["w"].mean().item() == pytest.approx(1.0, abs=0.02)


def test_merging_one_task_vector_returns_it():
    (tv,) = _tvs(1)
    for merged in (task_arithmetic([tv]), average([tv]), ties([tv], density=1.0), magmax([tv]),
                   dare([tv], density=1.0), breadcrumbs([tv], top_drop=0.0, bottom_drop=0.0)):
        for k in SHAPES:
            assert torch.allclose(merged[k], tv[k], atol=1e-6)


def test_ties_with_density_one_and_unanimous_signs_is_the_mean():
    base = _tvs(1)[0].map(lambda _, v: v.abs() + 0.1)
    tvs = [base * s for s in (0.5, 1.0, 2.5)]
    _close(ties(tvs, density=1.0), {k: sum(tv[k] for tv in tvs) / 3 for k in SHAPES})


def test_ties_model_scope_trims_over_the_whole_vector():
    tv = TaskVector({"small": torch.tensor([0.1, 0.2, 0.3, 0.4]), "large": torch.tensor([5.0, 6.0, 7.0, 8.0])})
    merged = ties([tv], density=0.5, trim_scope="model")
    assert torch.equal(merged["small"], torch.zeros(4))
    assert torch.equal(merged["large"], tv["large"])
    per_tensor = ties([tv], density=0.5, trim_scope="tensor")
    assert torch.equal(per_tensor["small"], torch.tensor([0.0, 0.0, 0.3, 0.4]))


def test_magmax_keeps_largest_magnitude_entry():
    a = TaskVector({"w": torch.tensor([1.0, -5.0, 2.0])})
    b = TaskVector({"w": torch.tensor([-3.0, 4.0, 2.0])})
    assert torch.equal(magmax([a, b])["w"], torch.tensor([-3.0, -5.0, 2.0]))


def test_breadcrumbs_drops_outliers_and_small_entries():
    tv = TaskVector({"w": torch.arange(1.0, 11.0)})  # magnitudes 1..10
    merged = breadcrumbs([tv], top_drop=0.1, bottom_drop=0.5)
    assert torch.equal(merged["w"], torch.tensor([0, 0, 0, 0, 0, 6, 7, 8, 9, 0], dtype=torch.float32))


def test_zero_task_vectors_merge_to_zero():
    zeros = [TaskVector.zeros_like(tv) for tv in _tvs(3)]
    for merged in (task_arithmetic(zeros), ties(zeros), magmax(zeros), dare(zeros), breadcrumbs(zeros)):
        assert merged.norm() == 0.0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda t: ties(t, density=0.0), ValueError, "density must be in (0, 1], got 0.0"),
        (lambda t: ties(t, density=1.5), ValueError, "density must be in (0, 1], got 1.5"),
        (lambda t: ties(t, sign_method="mode"), ValueError, "'total' or 'frequency'"),
        (lambda t: ties(t, trim_scope="layer"), ValueError, "trim_scope must be"),
        (lambda t: dare(t, combine="mean"), ValueError, "combine must be"),
        (lambda t: task_arithmetic(t, [1.0]), ValueError, "got 1 weights for 4 task vectors"),
        (lambda t: breadcrumbs(t, top_drop=0.5, bottom_drop=0.5), ValueError, "must be < 1"),
        (lambda t: task_arithmetic([]), ValueError, "at least one task vector"),
        (lambda t: task_arithmetic([t[0], "x"]), TypeError, "task_vectors[1] must be a TaskVector"),
        (lambda t: task_arithmetic([t[0], TaskVector({"z": torch.ones(1)})]), ValueError, "'a.weight'"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error) as info:
        call(_tvs())
    assert message in str(info.value)
