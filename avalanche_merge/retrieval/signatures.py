"""Per-task density signatures of embeddings, for task retrieval (pure torch / numpy / scikit-learn).

Each task seen so far gets a *signature* fitted on its embeddings: either a Dirichlet-process Gaussian mixture
(scikit-learn's ``BayesianGaussianMixture`` with ``weight_concentration_prior_type="dirichlet_process"``; its
``n_components`` is an upper bound, unused components get ~0 weight) or k-means centroids. A query embedding is
scored against every signature and routed to the best-scoring task.

Reduction. All signatures live in **one shared space**, so that their scores are comparable: a log-density is
only comparable across tasks when every task's density is defined over the same coordinates (a per-task PCA
would give each task its own subspace, dimension and volume, and its log-likelihoods would not be comparable).
The projection (``reduce="pca"``, or ``"whiten"`` = PCA with unit-variance components) is therefore fitted
once, on the **first task's** embeddings, and frozen; later tasks are projected with it. The cost: directions
along which only a later task varies are dropped when ``dim`` is smaller than the embedding dimension (with
``dim >= d`` the projection is a rotation and nothing is lost). ``reduce=None`` keeps the raw embeddings.

Robustness. A task with no more samples than (reduced) dimensions, or whose mixture fit fails on an ill-defined
covariance, triggers a :class:`UserWarning` naming the task and sizes and falls back to a diagonal covariance,
fewer components and a larger ``reg_covar``; fitting never raises on such data.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import BayesianGaussianMixture

from ..config import check_range

METHODS = ("dpgmm", "centroid")
COVARIANCE_TYPES = ("diag", "full")
REDUCTIONS = (None, "pca", "whiten")


def _check_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(kw_only=True)
class SignatureConfig:
    """How task signatures are fitted and scored.

    Args:
        method: ``"dpgmm"`` (Dirichlet-process Gaussian mixture, scored by log-likelihood) or ``"centroid"``
            (k-means centroids, scored by minus the squared distance to the nearest centroid).
        n_components: maximum number of mixture components (dpgmm) or k of k-means (centroid), >= 1; clipped to
            the number of samples of a task.
        covariance_type: ``"diag"`` or ``"full"`` covariance of the mixture components (dpgmm only).
        reduce: ``None``, ``"pca"`` or ``"whiten"``: a projection fitted on the first task and shared by all.
        dim: PCA dimensions, >= 1; clipped to the embedding dimension and the first task's sample count.
        reg_covar: non-negative regularisation added to the covariance diagonals, > 0.
        max_iter: maximum EM (dpgmm) / Lloyd (centroid) iterations, >= 1.
        weight_concentration_prior: Dirichlet-process concentration, > 0; ``None`` is scikit-learn's
            ``1 / n_components``. Smaller values favour fewer active components.
        seed: random state of the PCA, the mixture initialisation and k-means, >= 0.
    """

    method: str = "dpgmm"
    n_components: int = 5
    covariance_type: str = "diag"
    reduce: str | None = "pca"
    dim: int = 32
    reg_covar: float = 1e-4
    max_iter: int = 200
    weight_concentration_prior: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_int("n_components", self.n_components)
        _check_choice("covariance_type", self.covariance_type, COVARIANCE_TYPES)
        _check_choice("reduce", self.reduce, REDUCTIONS)
        _check_int("dim", self.dim)
        check_range("reg_covar", float(self.reg_covar), 0.0, None, low_open=True)
        _check_int("max_iter", self.max_iter)
        if self.weight_concentration_prior is not None:
            check_range("weight_concentration_prior", float(self.weight_concentration_prior), 0.0, None,
                        low_open=True)
        _check_int("seed", self.seed, low=0)


class _Centroids:
    """k-means centroids; ``score_samples`` is minus the squared distance to the nearest centroid."""

    def __init__(self, centers: np.ndarray) -> None:
        self.centers = centers

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        d2 = (x * x).sum(1, keepdims=True) - 2.0 * x @ self.centers.T + (self.centers * self.centers).sum(1)
        return -np.maximum(d2.min(1), 0.0)


class TaskSignatures:
    """One density signature per task over a shared (optionally reduced) embedding space; a :class:`Router`.

    Call :meth:`add_task` with each task's embeddings ``[N, d]`` (in task order), then :meth:`scores` /
    :meth:`route` on query embeddings ``[B, d]`` (torch or numpy).
    """

    def __init__(self, *, config: SignatureConfig | None = None) -> None:
        self.config = config if config is not None else SignatureConfig()
        self.models: list[object] = []
        self.fit_seconds: list[float] = []
        self.input_dim: int | None = None
        self.projection: PCA | None = None
        self._scale = 1.0  # mean per-dimension variance of the first task in the shared space

    @property
    def num_tasks(self) -> int:
        return len(self.models)

    # ---------------------------------------------------------------- inputs
    def _as_array(self, embeddings: object, what: str) -> np.ndarray:
        if isinstance(embeddings, torch.Tensor):
            if not embeddings.is_floating_point():
                raise ValueError(f"{what} must be a float tensor, got dtype {embeddings.dtype}")
            x = embeddings.detach().to("cpu", torch.float64).numpy()
        else:
            x = np.asarray(embeddings)
            if not np.issubdtype(x.dtype, np.floating):
                raise ValueError(f"{what} must be a float array, got dtype {x.dtype}")
            x = x.astype(np.float64, copy=False)
        if x.ndim != 2:
            raise ValueError(f"{what} must be 2-D [N, d], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{what} must contain at least one sample, got shape {tuple(x.shape)}")
        if self.input_dim is not None and x.shape[1] != self.input_dim:
            raise ValueError(f"{what} must have dimension {self.input_dim} (that of the first task), "
                             f"got {x.shape[1]}")
        if not np.isfinite(x).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return x

    def _project(self, x: np.ndarray) -> np.ndarray:
        return x if self.projection is None else self.projection.transform(x)

    # ---------------------------------------------------------------- fitting
    def add_task(self, embeddings: object) -> None:
        """Fit the next task's signature on its embeddings ``[N, d]``."""
        task = self.num_tasks
        x = self._as_array(embeddings, f"embeddings of task {task}")
        start = time.perf_counter()
        if task == 0:
            self.input_dim = x.shape[1]
            self._fit_projection(x)
        z = self._project(x)
        if task == 0:
            spread = float(z.var(0).mean())
            self._scale = spread if spread > 0 else 1.0
        fit = self._fit_dpgmm if self.config.method == "dpgmm" else self._fit_centroids
        model = fit(z, task)
        self.models.append(model)
        self.fit_seconds.append(time.perf_counter() - start)

    def _fit_projection(self, x: np.ndarray) -> None:
        cfg = self.config
        if cfg.reduce is None:
            return
        n, d = x.shape
        k = min(cfg.dim, d, n)
        if k < min(cfg.dim, d):
            warnings.warn(f"task 0 has {n} samples, fewer than the {min(cfg.dim, d)} PCA dimensions requested "
                          f"(dim={cfg.dim}, embedding dim {d}); the shared projection keeps only {k} dimensions",
                          UserWarning, stacklevel=3)
        self.projection = PCA(n_components=k, whiten=cfg.reduce == "whiten", svd_solver="full",
                              random_state=cfg.seed).fit(x)
        if cfg.reduce == "whiten":
            # Components with ~zero variance would be blown up by whitening; guard against division by ~0.
            var = self.projection.explained_variance_
            self.projection.explained_variance_ = np.maximum(var, 1e-12 * max(float(var.max()), 1e-12))

    def _fit_dpgmm(self, z: np.ndarray, task: int) -> BayesianGaussianMixture:
        cfg = self.config
        n, dim = z.shape
        distinct = len(np.unique(z, axis=0))
        cov, k, reg = cfg.covariance_type, min(cfg.n_components, distinct), cfg.reg_covar
        spread = float(z.var(0).mean()) if n > 1 else 0.0
        degenerate = spread <= 1e-12 * self._scale  # (numerically) identical samples
        if n <= dim or degenerate:
            # Too few samples for a full covariance, and one point per component would give zero variances:
            # diagonal covariances, about two samples per component, and a regulariser scaled to the data (to
            # the first task's when this task has no spread).
            k = max(1, min(k, n // 2))
            reg = max(reg, 1e-2 * (self._scale if degenerate else spread))
            why = f"{n} samples in {dim} dimensions (n <= dim)" if n <= dim else f"{n} identical samples"
            warnings.warn(f"task {task} has {why}: falling back to diagonal covariance, {k} component(s), "
                          f"reg_covar={reg:.3g}", UserWarning, stacklevel=3)
            cov = "diag"
        if n == 1:  # scikit-learn needs two samples: a duplicate gives a Gaussian at the sample, variance reg_covar
            z = np.repeat(z, 2, axis=0)
        last_error: Exception | None = None
        for attempt in range(6):
            model = BayesianGaussianMixture(
                n_components=k, covariance_type=cov, reg_covar=reg, max_iter=cfg.max_iter,
                weight_concentration_prior_type="dirichlet_process",
                weight_concentration_prior=cfg.weight_concentration_prior, random_state=cfg.seed)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*did not converge.*")
                    model.fit(z)
                if np.isfinite(model.score_samples(z[:1])).all():
                    return model
                last_error = ValueError("non-finite log-likelihood")
            except (ValueError, np.linalg.LinAlgError) as error:
                last_error = error
            old = (cov, k, reg)
            cov, reg = "diag", max(reg * 10.0, 1e-3)
            if attempt >= 2:
                k = max(1, k // 2)
            warnings.warn(f"task {task} ({n} samples, {dim} dimensions): mixture fit with covariance={old[0]}, "
                          f"{old[1]} component(s), reg_covar={old[2]:.3g} failed ({last_error}); retrying with "
                          f"covariance=diag, {k} component(s), reg_covar={reg:.3g}", UserWarning, stacklevel=3)
        raise RuntimeError(f"task {task}: could not fit a mixture signature ({last_error})")  # pragma: no cover

    def _fit_centroids(self, z: np.ndarray, task: int) -> _Centroids:
        cfg = self.config
        n, dim = z.shape
        distinct = len(np.unique(z, axis=0))
        k = min(cfg.n_components, distinct)
        if n <= dim:
            k = max(1, min(k, n // 2))  # one centroid per sample would be a nearest-neighbour memory
        if k < cfg.n_components:
            warnings.warn(f"task {task} has {n} samples ({distinct} distinct) in {dim} dimensions: using {k} "
                          f"centroid(s) instead of n_components={cfg.n_components}", UserWarning, stacklevel=3)
        km = KMeans(n_clusters=k, n_init=4, max_iter=cfg.max_iter, random_state=cfg.seed).fit(z)
        return _Centroids(km.cluster_centers_)

    # ---------------------------------------------------------------- scoring
    def scores(self, embeddings: object) -> torch.Tensor:
        """Per-task scores ``[B, T]`` (float64): log-likelihood (dpgmm) or minus nearest squared distance."""
        if not self.models:
            raise RuntimeError("no task signatures fitted yet: call add_task first")
        z = self._project(self._as_array(embeddings, "embeddings"))
        out = np.stack([m.score_samples(z) for m in self.models], axis=1)
        return torch.from_numpy(np.ascontiguousarray(out))

    def route(self, embeddings: object) -> torch.Tensor:
        """Index of the best-scoring task per embedding (``LongTensor[B]``, on the input's device if a tensor)."""
        idx = self.scores(embeddings).argmax(1)
        if isinstance(embeddings, torch.Tensor):
            idx = idx.to(embeddings.device)
        return idx
