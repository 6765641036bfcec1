"""Prototype classifiers on frozen pretrained features (pure torch; no Avalanche import).

- :class:`NearestClassMean`: running class means, cosine or Euclidean nearest-mean prediction.
- :class:`RanPAC`: McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning"
  (NeurIPS 2023), phase 2 only (no first-session parameter-efficient adaptation of the backbone): a fixed
  Gaussian random projection with ReLU, second-order statistics accumulated across tasks, and a ridge
  classifier whose regulariser is chosen on held-out data of each task.

Both are exact under any split of the data into tasks or batches: the statistics they keep (per-class sums and
counts; Gram matrix and feature-label cross-correlation) are sums over samples, so updating task by task gives
the same classifier as one update on the union (up to floating-point summation order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..config import check_range

__all__ = ["NCMConfig", "NearestClassMean", "RanPAC", "RanPACConfig", "default_ridge_grid"]


def _check_batch(features: torch.Tensor, labels: torch.Tensor, dim: int, num_classes: int) -> None:
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"features must have shape (n, {dim}), got {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


@dataclass(kw_only=True)
class NCMConfig:
    """Nearest class mean on frozen features.

    Args:
        metric: ``"cosine"`` (features and means are L2-normalised; logits are cosine similarities) or
            ``"euclidean"`` (logits are negative squared distances to the means).
        normalize_features: with ``metric="euclidean"``, L2-normalise each feature before it enters the means
            and before prediction (ignored for cosine, which always normalises).
    """

    metric: str = "cosine"
    normalize_features: bool = False

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {self.metric!r}")


def _check_sizes(feature_dim: int, num_classes: int) -> None:
    """Raise ``ValueError`` unless both sizes are >= 1."""
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


class NearestClassMean:
    """Running class means of features; predicts the nearest mean.

    Means are exact running averages (per-class feature sums over counts, accumulated in float64), so a class
    met again in a later task (domain-incremental streams) is averaged over all its samples. For cosine, each
    feature is L2-normalised before it is averaged (the prototype is the mean of unit vectors) and the mean is
    normalised again at prediction. Classes never seen get a logit below every seen class (row minimum - 1), so
    they are never predicted once at least one class has been seen; before any update all logits are 0.
    """

    def __init__(self, feature_dim: int, num_classes: int, config: NCMConfig | None = None) -> None:
        _check_sizes(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.config = config or NCMConfig()
        self.sums = torch.zeros(num_classes, feature_dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        features = features.detach().to(torch.float64)
        if self.config.metric == "cosine" or self.config.normalize_features:
            features = F.normalize(features, dim=1)
        return features

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``features`` (n, d) with integer ``labels`` (n,) to the running class means."""
        _check_batch(features, labels, self.feature_dim, self.num_classes)
        labels = labels.detach().to("cpu", torch.long)
        self.sums.index_add_(0, labels, self._prepare(features).cpu())
        self.counts += torch.bincount(labels, minlength=self.num_classes).to(torch.float64)

    @property
    def seen(self) -> torch.Tensor:
        """Boolean mask of the classes with at least one sample."""
        return self.counts > 0

    @property
    def means(self) -> torch.Tensor:
        """Class means, shape (num_classes, d), float64; rows of unseen classes are 0."""
        return self.sums / self.counts.clamp_min(1.0).unsqueeze(1)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores (n, num_classes) in the dtype and device of ``features``; higher is nearer."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape (n, {self.feature_dim}), got {tuple(features.shape)}")
        seen = self.seen
        if not seen.any():
            return features.new_zeros(features.shape[0], self.num_classes)
        x = self._prepare(features).cpu()
        means = self.means
        cosine = self.config.metric == "cosine"
        scores = x @ F.normalize(means, dim=1).T if cosine else -torch.cdist(x, means).pow(2)
        floor = scores[:, seen].min(dim=1, keepdim=True).values - 1.0
        scores = torch.where(seen.unsqueeze(0), scores, floor)
        return scores.to(device=features.device, dtype=features.dtype)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted class of each row of ``features``."""
        return self.logits(features).argmax(dim=1)


def default_ridge_grid() -> tuple[float, ...]:
    """The paper's candidate ridge parameters: 10^-8, 10^-7, ..., 10^8."""
    return tuple(10.0 ** k for k in range(-8, 9))


@dataclass(kw_only=True)
class RanPACConfig:
    """RanPAC (McDonnell et al., NeurIPS 2023), phase 2 on frozen features.

    Args:
        projection_dim: number M of random features (paper: 10000 for ViT-B/16; default 2000 to bound the
            M x M Gram matrix and its solve on CPU); 0 disables the projection and the nonlinearity (ridge
            regression on the raw features, the paper's ablation).
        ridge: fixed ridge parameter lambda > 0; ``None`` selects it on held-out data at each task.
        ridge_grid: candidate lambdas for the selection, all > 0 (default ``default_ridge_grid()``).
        holdout_fraction: fraction of each task's training samples held out for the selection, in (0, 1).
        selection: ``"mse"`` (squared error between the ridge outputs and the one-hot targets, as in the
            official code) or ``"accuracy"`` (ties broken by the lower MSE).
        seed: seed of the random projection and of the held-out split.
    """

    projection_dim: int = 2000
    ridge: float | None = None
    ridge_grid: tuple[float, ...] = field(default_factory=default_ridge_grid)
    holdout_fraction: float = 0.2
    selection: str = "mse"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0 (0 disables the projection), got {self.projection_dim}")
        if self.ridge is not None:
            check_range("ridge", self.ridge, 0.0, None, low_open=True)
        self.ridge_grid = tuple(float(v) for v in self.ridge_grid)
        if not self.ridge_grid:
            raise ValueError("ridge_grid must hold at least one candidate, got ()")
        for value in self.ridge_grid:
            check_range("ridge_grid value", value, 0.0, None, low_open=True)
        check_range("holdout_fraction", self.holdout_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if self.selection not in ("mse", "accuracy"):
            raise ValueError(f"selection must be 'mse' or 'accuracy', got {self.selection!r}")


class RanPAC:
    """Random-projection ridge classifier with statistics accumulated across tasks.

    ``h = ReLU(x W)`` with ``W`` (d x M) i.i.d. N(0, 1), fixed by ``config.seed``. The classifier keeps
    ``G = sum h h^T`` (M x M) and ``C = sum h y^T`` (M x K, y one-hot) over every sample seen, in float64, and its
    output weights are ``W_o = (G + lambda I)^-1 C``; logits are ``h W_o``.

    Ridge selection (``config.ridge is None``), run by :meth:`update` on each task's data before the task is added:

    1. a random permutation of the task's n samples (seeded by ``config.seed`` and the task index) holds out
       ``min(n - 1, max(1, round(holdout_fraction * n)))`` of them (the paper holds out a fraction of the current
       training data); with n < 2 nothing is held out and the previous lambda (for the first task, the grid's
       median) is kept;
    2. for each candidate lambda, ``W_o`` is fitted on the statistics of all previous tasks plus the task's
       non-held-out samples (the official code fits on the current task only; including the past statistics
       scores the candidates on the classifier that will actually be used);
    3. the candidate with the lowest held-out MSE ``mean ||h W_o - y||^2`` wins (``selection="mse"``), or the
       highest held-out accuracy with ties broken by lower MSE (``"accuracy"``); remaining ties go to the first
       candidate in grid order;
    4. all n samples of the task are then added to ``G`` and ``C`` and ``W_o`` is refitted with the chosen lambda.

    The candidates share one eigendecomposition ``G = V diag(s) V^T``: ``W_o(lambda) = V diag(1 / (s + lambda))
    V^T C``.
    """

    def __init__(self, feature_dim: int, num_classes: int, config: RanPACConfig | None = None) -> None:
        _check_sizes(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.config = config or RanPACConfig()
        gen = torch.Generator().manual_seed(self.config.seed)
        m = self.config.projection_dim
        self.projection = torch.randn(feature_dim, m, generator=gen, dtype=torch.float64) if m else None
        self.hidden_dim = m or feature_dim
        self.G = torch.zeros(self.hidden_dim, self.hidden_dim, dtype=torch.float64)
        self.C = torch.zeros(self.hidden_dim, num_classes, dtype=torch.float64)
        self.n_seen = 0
        self.ridge: float | None = self.config.ridge
        self.W_out: torch.Tensor | None = None
        self.selection_history: list[dict] = []
        self._tasks = 0

    @torch.no_grad()
    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        """Random features ``ReLU(x W)`` (float64, cpu), or the raw features when the projection is disabled."""
        x = features.detach().to("cpu", torch.float64)
        if self.projection is None:
            return x
        return torch.relu(x @ self.projection)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        return F.one_hot(labels.to("cpu", torch.long), self.num_classes).to(torch.float64)

    @staticmethod
    def solve(G: torch.Tensor, C: torch.Tensor, ridge: float) -> torch.Tensor:
        """``(G + ridge I)^-1 C``."""
        eye = torch.eye(G.shape[0], dtype=G.dtype)
        return torch.linalg.solve(G + ridge * eye, C)

    @torch.no_grad()
    def select_ridge(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Choose lambda on a held-out part of this task (steps 1-3 of the class docstring); records the scores."""
        _check_batch(features, labels, self.feature_dim, self.num_classes)
        grid = self.config.ridge_grid
        n = features.shape[0]
        if n < 2:
            return self.ridge if self.ridge is not None else grid[len(grid) // 2]
        n_val = min(n - 1, max(1, round(self.config.holdout_fraction * n)))
        gen = torch.Generator().manual_seed(self.config.seed + 1 + self._tasks)
        perm = torch.randperm(n, generator=gen)
        val, fit = perm[:n_val], perm[n_val:]
        h = self.hidden(features)
        y = self._targets(labels)
        G = self.G + h[fit].T @ h[fit]
        C = self.C + h[fit].T @ y[fit]
        s, V = torch.linalg.eigh(G)
        s = s.clamp_min(0.0)
        VtC = V.T @ C
        hV = h[val] @ V
        mses, accs = [], []
        for lam in grid:
            out = hV @ (VtC / (s + lam).unsqueeze(1))
            mses.append(float((out - y[val]).pow(2).sum(dim=1).mean()))
            accs.append(float((out.argmax(dim=1) == labels[val].cpu()).double().mean()))
        if self.config.selection == "mse":
            best = min(range(len(grid)), key=lambda i: (mses[i], i))
        else:
            best = min(range(len(grid)), key=lambda i: (-accs[i], mses[i], i))
        self.selection_history.append({"task": self._tasks, "n_fit": len(fit), "n_val": len(val),
                                       "grid": list(grid), "mse": mses, "accuracy": accs, "ridge": grid[best]})
        return grid[best]

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add samples to ``G`` and ``C`` (no refit)."""
        _check_batch(features, labels, self.feature_dim, self.num_classes)
        h = self.hidden(features)
        self.G += h.T @ h
        self.C += h.T @ self._targets(labels)
        self.n_seen += features.shape[0]

    @torch.no_grad()
    def fit(self, ridge: float | None = None) -> torch.Tensor:
        """Refit ``W_o`` on the accumulated statistics with ``ridge`` (default: the current lambda)."""
        ridge = self.ridge if ridge is None else ridge
        if ridge is None:
            raise ValueError("no ridge parameter: pass one, set config.ridge or call update()")
        check_range("ridge", ridge, 0.0, None, low_open=True)
        self.ridge = float(ridge)
        self.W_out = self.solve(self.G, self.C, self.ridge)
        return self.W_out

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Learn one task: select lambda (unless fixed), accumulate all its samples, refit."""
        _check_batch(features, labels, self.feature_dim, self.num_classes)
        if features.shape[0] == 0:
            return
        if self.config.ridge is None:
            self.ridge = self.select_ridge(features, labels)
        self.accumulate(features, labels)
        self.fit()
        self._tasks += 1

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Ridge outputs (n, num_classes) in the dtype and device of ``features``; zeros before any update."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape (n, {self.feature_dim}), got {tuple(features.shape)}")
        if self.W_out is None:
            return features.new_zeros(features.shape[0], self.num_classes)
        return (self.hidden(features) @ self.W_out).to(device=features.device, dtype=features.dtype)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted class of each row of ``features``."""
        return self.logits(features).argmax(dim=1)
