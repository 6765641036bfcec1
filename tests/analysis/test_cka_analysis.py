"""Linear CKA, SVCCA, pooling of module outputs and the features of named layers (``analysis.cka``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from avalanche_merge.analysis.cka import find_blocks, layer_features, linear_cka, pool_output, svcca
from avalanche_merge.models.vit import TinyViT, TinyViTConfig


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(n: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(n, n, seed=seed))
    return q


def _hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), Eq. via HSIC with the centering matrix: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    return float(np.trace(k @ h @ l_ @ h) / math.sqrt(np.trace(k @ h @ k @ h) * np.trace(l_ @ h @ l_ @ h)))


def _tiny_vit(depth: int = 3) -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(TinyViTConfig(dim=16, depth=depth, heads=2))


# linear CKA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(30, 6), (6, 30)])  # feature form and Gram form
def test_cka_of_a_representation_with_itself_is_one(shape):
    x = _randn(*shape)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("shape", [(40, 8), (8, 40)])
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(shape):
    x, y = _randn(*shape, seed=0), _randn(shape[0], 5, seed=2) @ _randn(5, shape[1], seed=3) + _randn(*shape, seed=4)
    ref = linear_cka(x, y)
    assert 0.05 < ref < 0.95  # a non-trivial value, so that invariance is not 0 == 0 or 1 == 1
    q = _orthogonal(shape[1])
    assert linear_cka(x @ q, y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x, y @ q) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x, 0.02 * y) == pytest.approx(ref, abs=1e-10)
    assert linear_cka(y, x) == pytest.approx(ref, abs=1e-12)  # symmetric
    # a translation of either side changes nothing (features are centred)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(ref, abs=1e-10)


def test_cka_not_invariant_to_general_invertible_maps():
    x = _randn(50, 5)
    stretch = torch.diag(torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.linalg.matrix_rank(stretch) == 5
    value = linear_cka(x, x @ stretch)
    assert value < 0.6  # identical information, but CKA sees the anisotropic rescaling
    assert value == pytest.approx(_hsic_cka(x.numpy(), (x @ stretch).numpy()), abs=1e-10)


@pytest.mark.parametrize("n,p,q", [(7, 12, 9), (25, 4, 6), (10, 10, 3)])
def test_cka_matches_direct_hsic_formula(n, p, q):
    x, y = _randn(n, p, seed=5), _randn(n, q, seed=6)
    y = y + 0.5 * x[:, :1]  # correlate them a little
    assert linear_cka(x, y) == pytest.approx(_hsic_cka(x.numpy(), y.numpy()), abs=1e-10)
    # numpy arrays and float32 tensors are accepted too
    assert linear_cka(x.numpy(), y.float()) == pytest.approx(_hsic_cka(x.numpy(), y.numpy()), abs=1e-5)


def test_cka_gram_and_feature_branches_agree():
    x, y = _randn(6, 4, seed=7), _randn(6, 4, seed=8)
    pad = torch.zeros(6, 4, dtype=torch.float64)
    feature_form = linear_cka(x, y)  # n = 6 >= 4 features
    gram_form = linear_cka(torch.cat([x, pad], 1), torch.cat([y, pad], 1))  # n = 6 < 8 features: Gram form
    assert feature_form == pytest.approx(gram_form, abs=1e-12)
    assert feature_form == pytest.approx(_hsic_cka(x.numpy(), y.numpy()), abs=1e-12)


def test_debiased_cka_of_independent_features_is_near_zero():
    x, y = _randn(200, 64, seed=9), _randn(200, 64, seed=10)
    biased, debiased = linear_cka(x, y), linear_cka(x, y, debiased=True)
    assert abs(debiased) < 0.1
    assert biased > 0.15  # the bias of the plain estimator for p comparable to n
    assert biased > debiased + 0.1


def test_debiased_cka_matches_unbiased_hsic_by_formula():
    # Song et al. (2012) unbiased HSIC, written out independently with numpy.
    def hsic1(k, l_):
        n = k.shape[0]
        k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
        one = np.ones(n)
        return (np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l_ @ one)) / (n * (n - 3))

    x, y = _randn(12, 5, seed=11), _randn(12, 3, seed=12)
    y = y + x[:, :3]
    xc, yc = x.numpy() - x.numpy().mean(0), y.numpy() - y.numpy().mean(0)
    k, l_ = xc @ xc.T, yc @ yc.T
    expected = hsic1(k, l_) / math.sqrt(hsic1(k, k) * hsic1(l_, l_))
    assert linear_cka(x, y, debiased=True) == pytest.approx(expected, abs=1e-10)


def test_cka_of_a_constant_representation_is_nan():
    x, const = _randn(10, 3), torch.ones(10, 3)
    assert math.isnan(linear_cka(x, const))
    assert math.isnan(linear_cka(const, x))
    assert math.isnan(linear_cka(const, x, debiased=True))


def test_cka_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(_randn(10, 3), _randn(11, 3))
    bad = _randn(10, 3)
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(bad, _randn(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(_randn(10, 3), torch.full((10, 2), float("inf")))
    with pytest.raises(ValueError, match="matrix"):
        linear_cka(_randn(10), _randn(10, 3))
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(_randn(1, 3), _randn(1, 3))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(_randn(3, 3), _randn(3, 3), debiased=True)


# SVCCA -----------------------------------------------------------------------------------------------------------


def test_svcca_invariant_to_orthogonal_and_invertible_maps():
    x = _randn(50, 5)
    assert svcca(x, x @ _orthogonal(5)) == pytest.approx(1.0, abs=1e-10)
    a = _randn(5, 5, seed=13)
    assert abs(float(torch.linalg.det(a))) > 1e-3  # invertible, not orthogonal
    assert linear_cka(x, x @ a) < 0.95  # CKA does see it ...
    assert svcca(x, x @ a, energy=1.0) == pytest.approx(1.0, abs=1e-10)  # ... CCA does not


def test_svcca_of_independent_features_is_small_and_of_partial_overlap_in_between():
    x, y = _randn(400, 4, seed=14), _randn(400, 4, seed=15)
    independent = svcca(x, y, energy=1.0)
    assert independent < 0.15
    # y shares two of x's four directions exactly: canonical correlations (1, 1, ~0, ~0) -> mean ~0.5
    shared = torch.cat([x[:, :2], y[:, 2:]], 1)
    assert svcca(x, shared, energy=1.0) == pytest.approx(0.5, abs=0.08)


def test_svcca_rejects_too_few_inputs_and_bad_energy():
    with pytest.raises(ValueError, match="SVCCA keeps"):
        svcca(_randn(3, 5), _randn(3, 5, seed=1), energy=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        svcca(_randn(1, 5), _randn(1, 5))
    for energy in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="energy"):
            svcca(_randn(20, 3), _randn(20, 3), energy=energy)


def test_svcca_of_a_constant_representation_is_nan():
    assert math.isnan(svcca(_randn(20, 3), torch.ones(20, 3)))


# pooling ---------------------------------------------------------------------------------------------------------


def test_pool_output_tokens():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    torch.testing.assert_close(pool_output(t, "mean"), t.mean(1))
    torch.testing.assert_close(pool_output(t, "mean")[0], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    torch.testing.assert_close(pool_output(t, "cls"), t[:, 0])
    flat = pool_output(t, "flatten")
    assert flat.shape == (2, 12)
    torch.testing.assert_close(flat[1], torch.arange(12, 24, dtype=torch.float32))
    torch.testing.assert_close(pool_output((t, "extra"), "cls"), t[:, 0])  # a tuple uses its first element


def test_pool_output_conv_maps_and_vectors():
    t = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    mean = pool_output(t, "mean")
    assert mean.shape == (2, 3)
    torch.testing.assert_close(mean[0], torch.tensor([1.5, 5.5, 9.5]))
    torch.testing.assert_close(pool_output(t, "cls"), mean)  # no class token in a conv map: spatial mean
    assert pool_output(t, "flatten").shape == (2, 12)
    v = torch.randn(5, 7)
    for pool in ("mean", "cls", "flatten"):
        torch.testing.assert_close(pool_output(v, pool), v)


def test_pool_output_rejects_bad_pool_and_non_tensors():
    with pytest.raises(ValueError, match="pool must be one of"):
        pool_output(torch.zeros(2, 3, 4), "max")
    with pytest.raises(TypeError, match="dict"):
        pool_output({"a": torch.zeros(2, 3)}, "mean")


# blocks and layer features ---------------------------------------------------------------------------------------


def test_find_blocks():
    assert find_blocks(_tiny_vit()) == ["blocks.0", "blocks.1", "blocks.2"]
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    # the longest list wins; a top-level ModuleList gives bare indices
    model = nn.Module()
    model.short, model.long = nn.ModuleList([nn.Linear(2, 2)] * 2), nn.ModuleList([nn.Linear(2, 2)] * 4)
    assert find_blocks(model) == ["long.0", "long.1", "long.2", "long.3"]
    assert find_blocks(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])) == ["0", "1"]


def test_layer_features_shapes_values_mode_and_rng():
    model = _tiny_vit()
    x = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    model.train()
    rng = torch.get_rng_state()
    layers = find_blocks(model)
    feats = layer_features(model, x, layers + ["head"], pool="cls")
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(feats) == layers + ["head"]
    for name in layers:
        assert feats[name].shape == (7, 16) and feats[name].dtype == torch.float32
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(feats["head"], model(x))
        # the class token after the last block, normalised, is TinyViT's features(x)
        torch.testing.assert_close(model.norm(feats["blocks.2"]), model.features(x))
    model.train()
    means = layer_features(model, x, layers, pool="mean")
    assert not torch.allclose(means["blocks.0"], feats["blocks.0"])
    assert model.training


def test_layer_features_independent_of_batching():
    model = _tiny_vit()
    x = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    layers = find_blocks(model)
    small = layer_features(model, x, layers, batch_size=3)
    big = layer_features(model, x, layers, batch_size=256)
    batches = layer_features(model, [x[:4], x[4:]], layers)  # a sequence of batches
    for name in layers:
        assert small[name].shape == (10, 16)
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batches[name], big[name], rtol=1e-5, atol=1e-6)


def test_layer_features_eval_mode_is_used():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.9), nn.Linear(8, 3))
    model.train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    a = layer_features(model, x, ["1"])["1"]
    torch.testing.assert_close(a, model[0](x).detach())  # dropout inactive
    assert model.training


def test_layer_features_errors():
    model = _tiny_vit(depth=2)
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(ValueError, match="'blocks.7'"):
        layer_features(model, x, ["blocks.0", "blocks.7"])
    with pytest.raises(ValueError, match="did not run"):
        layer_features(model, x, ["head"], forward=lambda m, b: m.features(b))
    assert model.training  # restored after the forward pass even when the check fails afterwards

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, b):
            return self.lin(self.lin(b))

    twice = Twice()
    b = torch.randn(5, 3)
    feats = layer_features(twice, b, ["lin"], batch_size=2)["lin"]  # a module called twice: its last call counts
    torch.testing.assert_close(feats, twice(b).detach())


def test_layer_features_refuses_a_layer_that_sees_part_of_the_batch():
    class Halves(nn.Module):  # like a routed model: the block runs on each half separately
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, b):
            return torch.cat([self.lin(b[:2]), self.lin(b[2:])])

    with pytest.raises(ValueError, match="part of the batch"):
        layer_features(Halves(), torch.randn(5, 3), ["lin"])
