"""The fast merge kernels (radix-select trim threshold, chunked TIES) against the composed reference ops."""

import pytest
import torch

import avalanche_merge.merging.offline as offline
from avalanche_merge.merging import TaskVector, magmax, ties
from avalanche_merge.merging.reference import (
    kth_largest_magnitude_reference,
    magmax_tensor_reference,
    ties_tensor_reference,
)
from avalanche_merge.merging.steps import kth_largest_magnitude, top_magnitude_mask


def _tensors(n, t=5, *, seed=0, ties_heavy=False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g) * 1e-3 for _ in range(t)]
    if ties_heavy:  # few distinct magnitudes: many exact ties at every threshold, and zeros
        xs = [torch.round(x * 3e3) / 7 for x in xs]
    return xs


@pytest.mark.parametrize("ties_heavy", [False, True])
@pytest.mark.parametrize("n", [37, 20_011, 70_000])
def test_radix_threshold_equals_kthvalue(n, ties_heavy):
    for x in _tensors(n, 3, seed=n, ties_heavy=ties_heavy):
        for k in (1, 2, n // 100 + 1, n // 5, n // 2, n - 1, n):
            assert kth_largest_magnitude(x, k) == kth_largest_magnitude_reference(x, k), k


def test_radix_threshold_on_signs_subnormals_and_a_tail():
    # negative values, +-0, subnormals, a mask tail that is not a multiple of 8, a bucket shared by many values
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(30_003, generator=g), torch.full((5,), -0.0), torch.full((7,), 1e-42),
                   -torch.full((9,), 1.0 + 2**-20), torch.full((9,), 1.0)])
    for k in (1, 9, 18, 19, 3000, 30_020, x.numel()):
        assert kth_largest_magnitude(x, k) == kth_largest_magnitude_reference(x, k), k
    mask = top_magnitude_mask(x, 0.3)
    assert torch.equal(mask, x.abs() >= kth_largest_magnitude_reference(x, int(0.3 * x.numel())))


def test_radix_threshold_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k must be in"):
        kth_largest_magnitude(torch.ones(4), 0)


@pytest.mark.parametrize("chunk", [1 << 16, 96])  # 96: many chunks, the last one short (25 columns)
@pytest.mark.parametrize("ties_heavy", [False, True])
def test_chunked_ties_equals_reference(monkeypatch, chunk, ties_heavy):
    monkeypatch.setattr(offline, "_CHUNK", chunk)
    xs = _tensors(3001, ties_heavy=ties_heavy)
    for density in (0.05, 0.2, 1.0):
        thresholds = [offline._tensor_threshold(x, density) for x in xs]
        for sign_method in ("total", "frequency"):
            for merge_func in ("mean", "sum"):
                for w in ([1.0] * 5, [0.7, 1.3, -0.4, 1.0, 0.0]):
                    ours = offline.ties_tensor(xs, thresholds, w, sign_method, merge_func)
                    ref = ties_tensor_reference(xs, thresholds, w, sign_method, merge_func)
                    assert torch.equal(ours, ref), (density, sign_method, merge_func, w)


def test_ties_keeps_every_entry_tied_at_the_threshold():
    # 10 entries, density 0.2 -> k = 2; the 2nd largest magnitude (3) is shared by three entries: all kept
    v = torch.tensor([5.0, -3.0, 3.0, 3.0, 1.0, -1.0, 0.5, 0.2, 0.1, 0.0])
    merged = ties([TaskVector({"w": v})], density=0.2)["w"]
    assert torch.equal(merged, torch.tensor([5.0, -3.0, 3.0, 3.0, 0, 0, 0, 0, 0, 0]))


def test_ties_model_scope_and_mixed_signs_match_reference():
    tvs = [TaskVector({"a": x[:2000].reshape(40, 50), "b": x[2000:]}) for x in _tensors(3001, seed=4)]
    thresholds = [offline.global_magnitude_threshold([v for _, v in tv.items()], 0.3) for tv in tvs]
    merged = ties(tvs, density=0.3, trim_scope="model")
    for name in ("a", "b"):
        ref = ties_tensor_reference([tv[name] for tv in tvs], thresholds, [1.0] * 5)
        assert torch.equal(merged[name], ref)


@pytest.mark.parametrize("chunk", [1 << 16, 13])
def test_magmax_equals_reference_and_breaks_sign_ties_to_plus(monkeypatch, chunk):
    monkeypatch.setattr(offline, "_CHUNK", chunk)
    xs = _tensors(500, ties_heavy=True)
    xs[0][:50] = -torch.linspace(1.0, 2.0, 50)  # exact +a / -a ties of the largest magnitude, minus first
    xs[3][:50] = -xs[0][:50]
    merged = magmax([TaskVector({"w": x}) for x in xs])["w"]
    assert torch.equal(merged, magmax_tensor_reference(xs))
    assert (merged[:50] >= 0).all()
