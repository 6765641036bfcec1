"""Per-task density signatures of embeddings, for task retrieval (pure torch / numpy / scikit-learn).

Each task seen so far gets a *signature* fitted on its embeddings: either a Dirichlet-process Gaussian mixture
(scikit-learn's ``BayesianGaussianMixture`` with ``weight_concentration_prior_type="dirichlet_process"``; its
``n_components`` is an upper bound, unused components get ~0 weight) or k-means centroids. A query embedding is
scored against every signature and routed to the best-scoring task.

Covariance (dpgmm). ``covariance_type="oas"`` (the default) or ``"ledoit_wolf"`` fits full-covariance components
regularised by shrinkage: the ridge added to each component's covariance diagonal is ``reg_covar + a * mu``, where
``mu`` is the task's mean per-dimension variance and ``a`` the shrinkage intensity that scikit-learn's Oracle
Approximating Shrinkage estimator (Chen et al., "Shrinkage algorithms for MMSE covariance estimation", IEEE TSP
2010; derived for Gaussian data, the signature's own model) or Ledoit-Wolf estimator (Ledoit & Wolf, "A
well-conditioned estimator for large-dimensional covariance matrices", J. Multivariate Anal. 2004) chooses for the
task's pooled covariance. OAS is the default because it routed at least as well as Ledoit-Wolf on every case
measured by ``experiments/signature_retrieval.py``. With one component the covariance is the shrunk estimate
``(1 - a) S + a mu I`` up to the factor ``1 - a`` on the sample covariance ``S`` (and up to the mixture's Wishart
prior). A ridge is used rather than the shrunk matrix itself because the mixture re-estimates each component's
covariance in every EM step, where only ``reg_covar`` reaches it. The estimate is well-conditioned with fewer
samples than dimensions, so no fallback is needed. ``"full"`` (sample covariance + ``reg_covar``) and ``"diag"``
are kept as options. Cost: a full covariance per component makes fitting and routing O(d^2) per component (at
d = 768 with 10 tasks x 5 components, about 2.5 s of fitting per task and 0.5 s per batch of 256 queries on one
thread; ``n_components=1`` is about 3-5x cheaper, ``reduce="pca"`` or ``"diag"`` much cheaper but lossy).

Reduction. By default (``reduce=None``) signatures live in the embedding space itself: nothing is dropped. A
log-density is only comparable across tasks when every task's density is defined over the same coordinates (a
per-task PCA would give each task its own subspace, dimension and volume), so the optional projection
(``reduce="pca"``, or ``"whiten"`` = PCA with unit-variance components) is fitted once, **on the first task's
embeddings only**, and frozen: directions along which only a later task varies are dropped when ``dim`` is
smaller than the embedding dimension (tasks that differ only there become indistinguishable). It is an option for
large embeddings where speed matters more than retrieval accuracy.

Robustness. Nothing falls back silently: when a requested setting cannot be used, a :class:`UserWarning` names the
task, the sizes and the setting used instead, and the change is recorded in :attr:`TaskSignatures.fitted`. The
shrinkage covariances never need one except for a task whose samples are (numerically) identical (the ridge is
then 1e-2 times the first task's mean variance). ``covariance_type="full"`` with no more samples than dimensions
falls back to a diagonal covariance (its sample covariance is singular); a mixture fit that fails is retried with a
diagonal covariance, fewer components and a larger ``reg_covar``. ``n_components`` is an upper bound: it is
clipped to the number of distinct samples, and to about two samples per component when a task has no more
samples than dimensions.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.covariance import OAS, LedoitWolf
from sklearn.decomposition import PCA
from sklearn.mixture import BayesianGaussianMixture

from ..config import check_range

METHODS = ("dpgmm", "centroid")
SHRINKAGE = {"oas": OAS, "ledoit_wolf": LedoitWolf}
COVARIANCE_TYPES = ("oas", "ledoit_wolf", "full", "diag")
REDUCTIONS = (None, "pca", "whiten")


def _check_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def shrinkage_ridge(x: np.ndarray, estimator: str) -> tuple[float, float]:
    """The ridge ``a * mu`` that a shrinkage estimator adds to the sample covariance of ``x`` ``[N, d]``.

    ``mu`` is the mean per-dimension (biased) variance of ``x`` and ``a`` the shrinkage intensity chosen by
    scikit-learn's ``OAS`` (Chen et al. 2010) or ``LedoitWolf`` (Ledoit & Wolf 2004): the shrunk covariance is
    ``(1 - a) S + a mu I``.

    Args:
        x: samples, at least two, not all identical.
        estimator: ``"oas"`` or ``"ledoit_wolf"``.

    Returns:
        ``(a * mu, a)``.

    Raises:
        ValueError: unknown ``estimator``.
    """
    _check_choice("estimator", estimator, tuple(SHRINKAGE))
    a = float(SHRINKAGE[estimator]().fit(x).shrinkage_)
    return a * float(x.var(0).mean()), a


@dataclass(kw_only=True)
class SignatureConfig:
    """How task signatures are fitted and scored.

    Args:
        method: ``"dpgmm"`` (Dirichlet-process Gaussian mixture, scored by log-likelihood) or ``"centroid"``
            (k-means centroids, scored by minus the squared distance to the nearest centroid).
        n_components: maximum number of mixture components (dpgmm) or k of k-means (centroid), >= 1; clipped to
            the number of distinct samples of a task.
        covariance_type: covariance of the mixture components (dpgmm only): ``"oas"`` (default) or
            ``"ledoit_wolf"`` (full, regularised by the shrinkage estimator's ridge, see the module docstring),
            ``"full"`` (sample covariance + ``reg_covar``; falls back to diagonal, with a warning, for a task with
            no more samples than dimensions) or ``"diag"``.
        reduce: ``None`` (default: the embeddings themselves, nothing dropped), ``"pca"`` or ``"whiten"``: a
            projection fitted **on the first task only** and shared by all (lossy when ``dim`` is smaller than
            the embedding dimension: directions along which only later tasks vary are dropped).
        dim: PCA dimensions, >= 1 (used with ``reduce`` only); clipped to the embedding dimension and the first
            task's sample count.
        reg_covar: regularisation added to the covariance diagonals, > 0 (with a shrinkage ``covariance_type``,
            added to the shrinkage ridge).
        max_iter: maximum EM (dpgmm) / Lloyd (centroid) iterations, >= 1.
        weight_concentration_prior: Dirichlet-process concentration, > 0; ``None`` is scikit-learn's
            ``1 / n_components``. Smaller values favour fewer active components.
        seed: random state of the PCA, the mixture initialisation and k-means, >= 0.
    """

    method: str = "dpgmm"
    n_components: int = 5
    covariance_type: str = "oas"
    reduce: str | None = None
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
            check_range("weight_concentration_prior", float(self.weight_concentration_prior), 0.0, None, low_open=True)
        _check_int("seed", self.seed, low=0)


class _Centroids:
    """k-means centroids; ``score_samples`` is minus the squared distance to the nearest centroid."""

    def __init__(self, centers: np.ndarray) -> None:
        self.centers = centers

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        d2 = (x * x).sum(1, keepdims=True) - 2.0 * x @ self.centers.T + (self.centers * self.centers).sum(1)
        return -np.maximum(d2.min(1), 0.0)


class TaskSignatures:
    """One density signature per task over a shared embedding space; a :class:`Router`.

    Call :meth:`add_task` with each task's embeddings ``[N, d]`` (in task order), then :meth:`scores` /
    :meth:`route` on query embeddings ``[B, d]`` (torch or numpy). :attr:`fitted` holds, per task, the settings
    actually used (``covariance_type``, ``n_components``, ``reg_covar``, ``shrinkage`` intensity or ``None``, and
    ``fallback``: why a requested setting was changed, or ``None``).
    """

    def __init__(self, *, config: SignatureConfig | None = None) -> None:
        self.config = config if config is not None else SignatureConfig()
        self.models: list[object] = []
        self.fit_seconds: list[float] = []
        self.fitted: list[dict] = []
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
            raise ValueError(f"{what} must have dimension {self.input_dim} (that of the first task), got {x.shape[1]}")
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
            warnings.warn(
                f"task 0 has {n} samples, fewer than the {min(cfg.dim, d)} PCA dimensions requested "
                f"(dim={cfg.dim}, embedding dim {d}); the shared projection keeps only {k} dimensions",
                UserWarning,
                stacklevel=3,
            )
        self.projection = PCA(
            n_components=k, whiten=cfg.reduce == "whiten", svd_solver="full", random_state=cfg.seed
        ).fit(x)
        if cfg.reduce == "whiten":
            # Components with ~zero variance would be blown up by whitening; guard against division by ~0.
            var = self.projection.explained_variance_
            self.projection.explained_variance_ = np.maximum(var, 1e-12 * max(float(var.max()), 1e-12))

    def _fit_dpgmm(self, z: np.ndarray, task: int) -> BayesianGaussianMixture:
        cfg = self.config
        n, dim = z.shape
        requested = cfg.covariance_type
        shrink = requested in SHRINKAGE
        cov = "full" if shrink else requested
        k, reg, a = min(cfg.n_components, len(np.unique(z, axis=0))), cfg.reg_covar, None
        spread = float(z.var(0).mean()) if n > 1 else 0.0
        degenerate = spread <= 1e-12 * self._scale  # (numerically) identical samples
        if n <= dim:
            k = max(1, min(k, n // 2))  # about two samples per component (documented upper bound)
        fallback = None
        if degenerate:
            # No spread to estimate a covariance from: a regulariser scaled to the first task's spread.
            reg = max(reg, 1e-2 * self._scale)
            fallback = f"{n} identical samples"
        elif shrink:
            ridge, a = shrinkage_ridge(z, requested)
            reg = reg + ridge
        elif n <= dim:
            # Sample covariance singular (full) or too noisy (diag): a regulariser scaled to the data.
            reg = max(reg, 1e-2 * spread)
            fallback = f"{n} samples in {dim} dimensions (n <= dim)"
        if fallback is not None:
            how = "diagonal covariance instead of full" if requested == "full" else f"covariance_type={requested}"
            cov = "diag" if requested == "full" else cov
            warnings.warn(
                f"task {task} has {fallback}: using {how}, {k} component(s), reg_covar={reg:.3g}",
                UserWarning,
                stacklevel=3,
            )
        if n == 1:  # scikit-learn needs two samples: a duplicate gives a Gaussian at the sample, variance reg_covar
            z = np.repeat(z, 2, axis=0)
        last_error: Exception | None = None
        for attempt in range(6):
            model = BayesianGaussianMixture(
                n_components=k,
                covariance_type=cov,
                reg_covar=reg,
                max_iter=cfg.max_iter,
                weight_concentration_prior_type="dirichlet_process",
                weight_concentration_prior=cfg.weight_concentration_prior,
                random_state=cfg.seed,
            )
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*did not converge.*")
                    model.fit(z)
                if np.isfinite(model.score_samples(z[:1])).all():
                    self.fitted.append(
                        {
                            "covariance_type": cov,
                            "n_components": k,
                            "reg_covar": reg,
                            "shrinkage": a,
                            "fallback": fallback,
                        }
                    )
                    return model
                last_error = ValueError("non-finite log-likelihood")
            except (ValueError, np.linalg.LinAlgError) as error:
                last_error = error
            old = (cov, k, reg)
            cov, reg = "diag", max(reg * 10.0, 1e-3)
            if attempt >= 2:
                k = max(1, k // 2)
            fallback = f"mixture fit failed ({last_error})"
            warnings.warn(
                f"task {task} ({n} samples, {dim} dimensions): mixture fit with covariance={old[0]}, "
                f"{old[1]} component(s), reg_covar={old[2]:.3g} failed ({last_error}); retrying with "
                f"covariance=diag, {k} component(s), reg_covar={reg:.3g}",
                UserWarning,
                stacklevel=3,
            )
        raise RuntimeError(f"task {task}: could not fit a mixture signature ({last_error})")  # pragma: no cover

    def _fit_centroids(self, z: np.ndarray, task: int) -> _Centroids:
        cfg = self.config
        n, dim = z.shape
        distinct = len(np.unique(z, axis=0))
        k = min(cfg.n_components, distinct)
        if n <= dim:
            k = max(1, min(k, n // 2))  # one centroid per sample would be a nearest-neighbour memory
        if k < cfg.n_components:
            warnings.warn(
                f"task {task} has {n} samples ({distinct} distinct) in {dim} dimensions: using {k} "
                f"centroid(s) instead of n_components={cfg.n_components}",
                UserWarning,
                stacklevel=3,
            )
        km = KMeans(n_clusters=k, n_init=4, max_iter=cfg.max_iter, random_state=cfg.seed).fit(z)
        self.fitted.append(
            {
                "covariance_type": None,
                "n_components": k,
                "reg_covar": None,
                "shrinkage": None,
                "fallback": None if k == cfg.n_components else f"{n} samples ({distinct} distinct)",
            }
        )
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
