"""Edge cases of the retrieval cores found by mutation testing (issue 14): exact values on small inputs."""

import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import BayesianGaussianMixture

from avalanche_merge.retrieval.prototypes import (
    NCMConfig,
    NearestClassMean,
    RanPAC,
    RanPACConfig,
    default_ridge_grid,
)
from avalanche_merge.retrieval.signatures import SignatureConfig, TaskSignatures


def _warned_from_this_file(record) -> bool:
    """The warning points at this file (``stacklevel``); not checkable under mutmut, whose trampoline adds a frame."""
    return any(m == "mutmut" or m.startswith("mutmut.") for m in sys.modules) or record[0].filename == __file__


# -- prototypes.py --------------------------------------------------------------------------------------------------
def test_one_feature_and_one_class_are_valid_sizes():
    ncm = NearestClassMean(1, 1, NCMConfig(metric="euclidean"))
    ncm.update(torch.tensor([[2.0], [4.0]]), torch.tensor([0, 0]))
    assert ncm.logits(torch.tensor([[1.0]])).tolist() == [[-4.0]]
    ranpac = RanPAC(1, 1, RanPACConfig(projection_dim=0, ridge=1.0))
    ranpac.update(torch.tensor([[2.0], [1.0]]), torch.tensor([0, 0]))
    assert ranpac.W_out.item() == pytest.approx(3.0 / 6.0)  # (G + I)^-1 C = 3 / (5 + 1)
    with pytest.raises(ValueError, match="feature_dim must be >= 1, got 0"):
        NearestClassMean(0, 1)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        RanPAC(1, 0)


@pytest.mark.parametrize("labels", [torch.tensor([[0], [1], [0]]), torch.tensor([0, 1])])
def test_labels_must_be_one_dimensional_with_one_label_per_row(labels):
    features = torch.tensor([[0.3, -1.2], [0.7, 0.4], [-0.5, 0.9]])
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        NearestClassMean(2, 2).update(features, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        RanPAC(2, 2, RanPACConfig(projection_dim=4, ridge=1.0)).update(features, labels)


def test_default_ridge_grid_is_powers_of_ten_from_minus_8_to_8():
    grid = default_ridge_grid()
    assert len(grid) == 17 and grid[0] == pytest.approx(1e-8) and grid[-1] == pytest.approx(1e8)
    assert grid == pytest.approx([10.0**k for k in range(-8, 9)], rel=1e-12)
    assert grid[8] == 1.0 and grid[9] == 10.0


def test_empty_ridge_grid_message():
    with pytest.raises(ValueError) as info:
        RanPACConfig(ridge_grid=())
    assert str(info.value) == "ridge_grid must hold at least one candidate, got ()"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_ranpac_accepts_integer_labels_of_any_dtype(dtype):
    features = torch.tensor([[0.3, -1.2], [0.7, 0.4], [-0.5, 0.9], [1.1, 0.2]])
    long_labels = torch.tensor([0, 2, 1, 2])
    ref = RanPAC(2, 3, RanPACConfig(projection_dim=5, ridge=0.5))
    ref.update(features, long_labels)
    other = RanPAC(2, 3, RanPACConfig(projection_dim=5, ridge=0.5))
    other.update(features, long_labels.to(dtype))
    assert torch.equal(other.W_out, ref.W_out)
    assert torch.equal(other.C, ref.C)


def test_ridge_solve_keeps_the_ridge_in_float64():
    # 0.1 is not a float32 number: a float32 identity would solve with 0.100000001490116
    G = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    C = torch.tensor([[1.0, -3.0], [2.0, 0.5]], dtype=torch.float64)
    assert torch.equal(RanPAC.solve(G, C, 0.1), C / 0.1)
    G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    expected = torch.linalg.solve(G + 1e-3 * torch.eye(2, dtype=torch.float64), C)
    assert torch.allclose(RanPAC.solve(G, C, 1e-3), expected, rtol=1e-13, atol=0)


# -- signatures.py --------------------------------------------------------------------------------------------------
def _rng(seed=0):
    return np.random.default_rng(seed)


def _anisotropic(n, d, seed=0, scale=1.0):
    """Non-axis-aligned Gaussian samples with a different mean per dimension."""
    g = _rng(seed)
    mix = g.standard_normal((d, d)) / np.sqrt(d)
    return scale * (g.standard_normal((n, d)) @ mix + np.linspace(-2.0, 3.0, d))


def test_weight_concentration_prior_bounds_and_use():
    with pytest.raises(ValueError, match=r"weight_concentration_prior must be in \(0.0, inf\], got 0.0"):
        SignatureConfig(weight_concentration_prior=0.0)
    sig = TaskSignatures(config=SignatureConfig(weight_concentration_prior=0.5, n_components=3, max_iter=7))
    sig.add_task(_anisotropic(40, 3))
    model = sig.models[0]
    assert model.weight_concentration_prior == 0.5 and model.n_components == 3 and model.max_iter == 7
    assert model.weight_concentration_prior_type == "dirichlet_process"
    assert sig.fitted == [{"covariance_type": "full", "n_components": 3, "reg_covar": sig.fitted[0]["reg_covar"],
                           "shrinkage": sig.fitted[0]["shrinkage"], "fallback": None}]


def test_diag_covariance_is_used_as_requested():
    sig = TaskSignatures(config=SignatureConfig(covariance_type="diag", n_components=2))
    sig.add_task(_anisotropic(50, 3))
    assert sig.models[0].covariance_type == "diag" and sig.fitted[0]["covariance_type"] == "diag"
    assert sig.fitted[0]["reg_covar"] == 1e-4 and sig.fitted[0]["shrinkage"] is None


def test_mixture_convergence_warnings_are_silenced():
    sig = TaskSignatures(config=SignatureConfig(max_iter=1, n_components=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sig.add_task(_anisotropic(60, 3))
    assert sig.models[0].n_iter_ == 1


def test_full_covariance_with_n_equal_to_dim_falls_back_to_a_data_scaled_diagonal():
    x = _anisotropic(6, 6, scale=30.0)
    sig = TaskSignatures(config=SignatureConfig(covariance_type="full", n_components=5))
    with pytest.warns(UserWarning, match=r"task 0 has 6 samples in 6 dimensions \(n <= dim\): using diagonal "
                                         r"covariance instead of full, 3 component\(s\)") as record:
        sig.add_task(x)
    assert _warned_from_this_file(record)  # stacklevel points at the caller of add_task
    fit = sig.fitted[0]
    assert fit["covariance_type"] == "diag" and fit["n_components"] == 3 and type(fit["n_components"]) is int
    assert fit["reg_covar"] == pytest.approx(1e-2 * x.var(0).mean(), rel=1e-12)
    assert fit["fallback"] == "6 samples in 6 dimensions (n <= dim)"


def test_two_distinct_samples_give_one_component_and_are_not_degenerate():
    x = np.array([[0.3, -1.1, 2.0], [1.4, 0.2, -0.7]])
    sig = TaskSignatures(config=SignatureConfig(covariance_type="diag"))
    with pytest.warns(UserWarning, match="2 samples in 3 dimensions"):
        sig.add_task(x)
    assert sig.fitted[0]["n_components"] == 1
    assert sig.fitted[0]["reg_covar"] == pytest.approx(1e-2 * x.var(0).mean())


def test_degenerate_tasks_get_a_ridge_scaled_to_the_first_tasks_spread():
    first = _anisotropic(80, 3, scale=100.0)
    scale = first.var(0).mean()
    assert scale > 1e3
    sig = TaskSignatures(config=SignatureConfig(covariance_type="diag"))
    sig.add_task(first)
    near = np.tile([[1.0, 2.0, -3.0]], (10, 1)) + 1e-5 * _rng(4).standard_normal((10, 3))  # spread ~1e-10
    with pytest.warns(UserWarning, match="task 1 has 10 identical samples"):
        sig.add_task(near)
    assert sig.fitted[1]["reg_covar"] == pytest.approx(1e-2 * scale, rel=1e-12)
    with pytest.warns(UserWarning, match="task 2 has 1 identical samples"):
        sig.add_task(np.array([[0.5, -0.5, 4.0]]))
    assert sig.fitted[2]["fallback"] == "1 identical samples"
    assert sig.fitted[2]["reg_covar"] == pytest.approx(1e-2 * scale, rel=1e-12)
    # the single sample is fitted as a duplicated pair: the same mixture as one fitted on two copies
    ref = BayesianGaussianMixture(n_components=1, covariance_type="diag", reg_covar=1e-2 * scale, max_iter=200,
                                  weight_concentration_prior_type="dirichlet_process", random_state=0)
    ref.fit(np.array([[0.5, -0.5, 4.0]] * 2))
    q = _anisotropic(5, 3, seed=9)
    assert np.allclose(sig.models[2].score_samples(q), ref.score_samples(q), rtol=1e-10)


def test_first_task_scale_below_one_and_identical_first_task():
    first = _anisotropic(80, 3, scale=0.1)
    scale = first.var(0).mean()
    assert 1e-4 < scale < 0.5
    sig = TaskSignatures(config=SignatureConfig(covariance_type="diag"))
    sig.add_task(first)
    with pytest.warns(UserWarning, match="identical samples"):
        sig.add_task(np.tile([[0.1, 0.2, 0.3]], (6, 1)))
    assert sig.fitted[1]["reg_covar"] == pytest.approx(max(1e-4, 1e-2 * scale), rel=1e-12)
    same = TaskSignatures(config=SignatureConfig(covariance_type="diag"))
    with pytest.warns(UserWarning, match="task 0 has 6 identical samples"):
        same.add_task(np.tile([[0.5, 0.25, -2.0]], (6, 1)))  # exactly representable: variance exactly 0
    assert same.fitted[0]["reg_covar"] == pytest.approx(1e-2)  # scale 1 when the first task has no spread


def test_fit_seconds_are_a_duration():
    sig = TaskSignatures(config=SignatureConfig(method="centroid", n_components=2))
    sig.add_task(_anisotropic(20, 3))
    assert 0.0 <= sig.fit_seconds[0] < 60.0


def test_centroid_fit_records_and_clipping():
    x = _anisotropic(200, 3, seed=2)  # Lloyd needs more than 2 iterations here
    sig = TaskSignatures(config=SignatureConfig(method="centroid", n_components=4, max_iter=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sig.add_task(x)
    assert sig.fitted[0] == {"covariance_type": None, "n_components": 4, "reg_covar": None, "shrinkage": None,
                             "fallback": None}
    km = KMeans(n_clusters=4, n_init=4, max_iter=2, random_state=0).fit(x)
    assert np.array_equal(sig.models[0].centers, km.cluster_centers_)
    # n == dim: about two samples per centroid
    sig = TaskSignatures(config=SignatureConfig(method="centroid", n_components=5))
    with pytest.warns(UserWarning, match=r"task 0 has 6 samples \(6 distinct\) in 6 dimensions: using 3") as rec:
        sig.add_task(_anisotropic(6, 6))
    assert _warned_from_this_file(rec)
    assert sig.fitted[0]["n_components"] == 3 and sig.fitted[0]["fallback"] == "6 samples (6 distinct)"


def test_centroid_scores_of_a_batch_are_exact():
    sig = TaskSignatures(config=SignatureConfig(method="centroid", n_components=1))
    sig.add_task(np.array([[0.2, 0.1], [0.4, -0.3]]))  # centroid (0.3, -0.1)
    q = np.array([[0.3, 0.2], [1.3, -0.1], [0.0, 0.0]])
    expected = -((q - np.array([0.3, -0.1])) ** 2).sum(1)
    assert np.allclose(sig.scores(q).numpy()[:, 0], expected, rtol=1e-12, atol=1e-15)


def test_embedding_errors_name_what_was_passed():
    sig = TaskSignatures()
    with pytest.raises(RuntimeError, match="^no task signatures fitted yet"):
        sig.scores(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="^embeddings of task 0 must be a float array, got dtype int64"):
        sig.add_task(np.arange(6, dtype=np.int64).reshape(3, 2))
    sig.add_task(_anisotropic(30, 2))
    with pytest.raises(ValueError, match=r"^embeddings must be 2-D"):
        sig.scores(np.zeros(2))


def test_pca_projection_is_clipped_to_the_first_tasks_samples():
    x = _anisotropic(5, 10)
    sig = TaskSignatures(config=SignatureConfig(reduce="pca", dim=8, method="centroid", n_components=1))
    with pytest.warns(UserWarning, match="task 0 has 5 samples, fewer than the 8 PCA dimensions"):
        sig.add_task(x)
    assert sig.projection.n_components_ == 5 and not sig.projection.whiten
    enough = TaskSignatures(config=SignatureConfig(reduce="pca", dim=3, method="centroid", n_components=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough.add_task(_anisotropic(20, 10))
    assert enough.projection.n_components_ == 3


@pytest.mark.parametrize("scale", [1e3, 1e-2])
def test_whitening_floors_tiny_variances_relative_to_the_largest(scale):
    g = _rng(5)
    plane = g.standard_normal((40, 2)) @ np.array([[1.0, 0.4, -0.3], [0.2, -0.5, 0.8]])  # rank 2 in 3-D
    x = scale * np.c_[plane[:, :2] * [3.0, 0.5], plane[:, 2]]
    sig = TaskSignatures(config=SignatureConfig(reduce="whiten", dim=3, method="centroid", n_components=1))
    sig.add_task(x)
    var = PCA(n_components=3, svd_solver="full").fit(x).explained_variance_
    floor = 1e-12 * var.max()
    assert sig.projection.whiten
    assert sig.projection.explained_variance_ == pytest.approx(np.maximum(var, floor), rel=1e-9, abs=floor * 1e-6)
    assert sig.projection.explained_variance_.min() == pytest.approx(floor, rel=1e-6)
    z = sig._project(x)
    assert np.isfinite(z).all()
    assert z[:, :2].var(0, ddof=1) == pytest.approx([1.0, 1.0], rel=1e-9)


# -- router.py ------------------------------------------------------------------------------------------------------
class _Routes:
    def __init__(self, tag):
        self.tag = tag

    def route(self, x):
        return torch.zeros(len(x), dtype=torch.long)


class _Holder:
    def __init__(self, router=None, plugins=None):
        if router is not None:
            self.router = router
        if plugins is not None:
            self.plugins = plugins


def test_find_router_prefers_the_strategy_then_the_first_plugin_with_a_router():
    from avalanche_merge.retrieval.router import Router, find_router

    own, first, second = _Routes("own"), _Routes("first"), _Routes("second")
    assert isinstance(own, Router) and not isinstance(object(), Router)
    plugins = [_Holder(), _Holder(router="not a router"), _Holder(router=first), _Holder(router=second)]
    assert find_router(_Holder(router=own, plugins=plugins)) is own
    assert find_router(_Holder(router=object(), plugins=plugins)) is first
    assert find_router(_Holder(plugins=plugins[:2])) is None
    assert find_router(_Holder(plugins=None)) is None
    assert find_router(_Holder(router=object())) is None
    none_plugins = _Holder()
    none_plugins.plugins = None
    assert find_router(none_plugins) is None


# -- routed.py ------------------------------------------------------------------------------------------------------
def _routed(config=None, **kwargs):
    from avalanche_merge.models import TinyViT, TinyViTConfig
    from avalanche_merge.retrieval.routed import RoutedLoRA

    torch.manual_seed(0)
    backbone = TinyViT(TinyViTConfig(image_size=8, patch_size=4, dim=8, depth=1, heads=2, num_classes=4))
    return RoutedLoRA(backbone, config=config, **kwargs)


def _images(t, n=6):
    g = torch.Generator().manual_seed(t)
    return torch.randn(n, 1, 8, 8, generator=g) + 3.0 * t


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"router": "x"}, r"^router must be one of"),
    ({"signature_method": "x"}, r"^signature_method must be one of"),
    ({"n_components": 0}, r"^n_components must be >= 1"),
    ({"dim": 0}, r"^dim must be >= 1"),
    ({"head_type": "x"}, r"^head_type must be one of"),
])
def test_routed_config_messages_name_the_field(kwargs, match):
    from avalanche_merge.retrieval.routed import CoLoRConfig

    with pytest.raises(ValueError, match=match):
        CoLoRConfig(**kwargs)


def test_routed_construction_defaults_and_errors():
    from avalanche_merge.merging.heads import find_head
    from avalanche_merge.retrieval.routed import CoLoRConfig, RoutedLoRA

    with pytest.raises(ValueError, match=r"matches no nn.Linear layer of Linear"):  # only a head: nothing to adapt
        RoutedLoRA(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"^num_classes must be >= 1, got 0"):
        _routed(num_classes=0)
    model = _routed()
    assert isinstance(model.config, CoLoRConfig) and model.signatures.config.method == "centroid"
    assert not any(p.requires_grad for p in model.backbone.parameters())
    head = find_head(model.backbone, "auto")
    assert model.targets and not any(t == head or t.startswith(head + ".") for t in model.targets)
    assert model.training_task is None and model.oracle_task is None and model.last_routed is None


def test_routed_begin_task_checks_classes_and_freezes_earlier_tasks():
    model = _routed()
    with pytest.raises(ValueError, match="^a task needs at least one class$"):
        model.begin_task([])
    for bad in ([-1], [4]):
        with pytest.raises(ValueError, match=rf"^task classes must lie in \[0, 4\), got \[{bad[0]}\]"):
            model.begin_task(bad)
    model.begin_task([2])  # a single class is a task
    assert model.task_classes[0].tolist() == [2] and model.gates[0].numel() == 0
    model.end_task([_images(0)])
    model.begin_task([0, 1])
    assert model.gates[1].numel() == 0  # CoLoR: no transfer gates
    model.train()
    model(_images(1))
    assert not any(p.requires_grad for p in model.task_parameters(0))
    assert all(p.requires_grad for p in model.task_parameters(1)[:-1])


def test_routed_route_before_and_after_signatures_and_oracle_clamping():
    from avalanche_merge.retrieval.routed import CoLoRConfig

    model = _routed(CoLoRConfig(n_components=1))
    x = _images(0)
    model.begin_task([0, 1])
    empty = model.route(x)  # no signature yet: nothing to route to
    assert empty.numel() == 0 and empty.dtype == torch.long
    model.end_task([x])
    routed = model.route(x)
    assert routed.tolist() == [0] * len(x) and model.last_routed is routed
    oracle = _routed(CoLoRConfig(router="oracle", n_components=1))
    oracle.begin_task([0, 1])
    with pytest.raises(ValueError, match=r"^router 'oracle' needs task_ids \(or oracle_task set\)$"):
        oracle.route(x)
    oracle.oracle_task = 0
    assert oracle.route(x).tolist() == [0] * len(x)  # before any signature: the oracle still routes
    oracle.end_task([x])
    oracle.begin_task([2, 3])
    ids = oracle.route(x[:4], torch.tensor([-1.0, 0.0, 1.0, 5.0]))
    assert ids.tolist() == [0, 0, 1, 1] and ids.dtype == torch.long


def test_routed_evaluation_during_a_task_routes_instead_of_using_the_task_being_trained():
    from avalanche_merge.retrieval.routed import FILL, CoLoRConfig

    model = _routed(CoLoRConfig(router="oracle", n_components=1))
    model.begin_task([0, 1])
    model.end_task([_images(0)])
    model.begin_task([2, 3])
    model.eval()
    out = model(_images(1), torch.zeros(6, dtype=torch.long))  # routed to task 0 by the oracle
    assert (out[:, 2:] == FILL).all() and (out[:, :2] != FILL).all()


def test_routed_penalty_terms_switch_on_separately():
    from avalanche_merge.lora.adapters import lora_layers
    from avalanche_merge.retrieval.routed import ProteusConfig

    assert _routed(ProteusConfig()).penalty() is None  # no task yet
    only_l2 = _routed(ProteusConfig(lambda_orth=0.0, lambda_l1=0.0, lambda_l2=0.5, head_type="linear"))
    only_l2.begin_task([0, 1])
    expected = sum(0.5 * (layer.lora_A["task0"].weight.pow(2).sum() + layer.lora_B["task0"].weight.pow(2).sum())
                   for layer in lora_layers(only_l2.backbone).values())
    assert torch.allclose(only_l2.penalty(), expected)
    only_l1 = _routed(ProteusConfig(lambda_orth=0.0, lambda_l1=0.3, lambda_l2=0.0, head_type="linear"))
    only_l1.begin_task([0, 1])
    penalty = only_l1.penalty()
    assert penalty is not None and float(penalty) == 0.0  # no earlier task: no gates yet
