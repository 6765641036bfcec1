"""CODA-Prompt's decomposed, attention-weighted prompts (pure torch).

Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning"
(CVPR 2023); reference code read: GT-RIPL/CODA-Prompt (``models/zoo.py``: ``CodaPrompt``). Per prompted layer, ``M``
components ``P_m`` (``[length, width]``), keys ``K_m`` and attention vectors ``A_m`` (``[key_dim]``); for a query
``q`` the weights are ``alpha_m = cos(q * A_m, K_m)`` (no softmax) and the prompt is ``sum_m alpha_m P_m``, split into
a key prefix (first half of its rows) and a value prefix (second half). Each task adds a slice of components
initialised by Gram-Schmidt against the existing ones (random normal vectors, orthogonalised, unit norm); only the
current slice trains, older slices enter the sum detached.

Deviation: the slices live in separate parameters and old ones are frozen (``requires_grad=False``), so no optimizer
setting (weight decay, a stale moment) can move them; the reference keeps one tensor and detaches old rows in the
forward. The new slice is orthogonalised against an orthonormal basis of the old slices' span (computed in float64),
so it is orthogonal to them even after training has made the old vectors non-orthogonal (the reference projects on
the old vectors one by one, exact only while they stay orthogonal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .pool import l2_normalize


def gram_schmidt_new(old: torch.Tensor | None, n_new: int, dim: int, *, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, tol: float = 1e-8) -> torch.Tensor:
    """``n_new`` unit vectors ``[n_new, dim]`` orthogonal to each other and to the rows of ``old`` ``[m, dim]``.

    Random normal vectors, orthogonalised (twice, for float64 accuracy) against an orthonormal basis of the old
    rows and the new vectors made so far; a draw whose residual norm falls below ``tol`` is redrawn.

    Raises:
        ValueError: ``m + n_new > dim`` (no room for that many orthogonal vectors).
    """
    m = 0 if old is None else old.shape[0]
    if m + n_new > dim:
        raise ValueError(f"cannot make {n_new} new components orthogonal to {m} old ones in {dim} dimensions: "
                         f"components per task x tasks must be <= {dim} (the key / prompt width)")
    basis = []
    if m:
        q, r = torch.linalg.qr(old.detach().double().reshape(m, dim).t())
        keep = r.diagonal().abs() > tol * max(1.0, float(r.diagonal().abs().max()))
        basis = list(q.t()[keep])
    out = []
    while len(out) < n_new:
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
        for _ in range(2):
            for u in basis:
                v = v - (v @ u) * u
        if v.norm() < tol:
            continue
        v = v / v.norm()
        basis.append(v)
        out.append(v)
    return torch.stack(out).to(dtype)


class CodaLayer(nn.Module):
    """The components, keys and attention vectors of one prompted layer, one slice per task.

    Args:
        key_dim: the query's width.
        length: prompt length (even: half key prefix, half value prefix).
        width: token width of the layer's attention.
    """

    def __init__(self, key_dim: int, length: int, width: int) -> None:
        super().__init__()
        if length < 2 or length % 2:
            raise ValueError(f"CODA prompt length must be even and >= 2 (half key, half value prefix), got {length}")
        self.key_dim, self.length, self.width = key_dim, length, width
        self.P, self.K, self.A = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()

    @property
    def n_components(self) -> int:
        return sum(p.shape[0] for p in self.P)

    def add_slice(self, n: int, generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """Freeze the existing slices and add ``n`` Gram-Schmidt components; returns the new parameters."""
        for plist in (self.P, self.K, self.A):
            for p in plist:
                p.requires_grad_(False)
        new = []
        for plist, dim in ((self.P, self.length * self.width), (self.K, self.key_dim), (self.A, self.key_dim)):
            old = torch.cat([p.reshape(p.shape[0], -1) for p in plist]) if len(plist) else None
            ref = plist[0] if len(plist) else None
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
            v = gram_schmidt_new(old, n, dim, generator=generator, dtype=dtype)
            p = nn.Parameter(v.reshape(n, self.length, self.width) if plist is self.P else v)
            if ref is not None:
                p.data = p.data.to(ref.device)
            plist.append(p)
            new.append(p)
        return new

    def weights(self, query: torch.Tensor) -> torch.Tensor:
        """``alpha [batch, M] = cos(q * A_m, K_m)`` over every slice (older slices detached)."""
        K, A = self._cat(self.K), self._cat(self.A)
        return (l2_normalize(query.unsqueeze(1) * A.unsqueeze(0)) * l2_normalize(K).unsqueeze(0)).sum(-1)

    def _cat(self, plist: nn.ParameterList) -> torch.Tensor:
        last = len(plist) - 1
        return torch.cat([p if i == last else p.detach() for i, p in enumerate(plist)])

    def forward(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value prefixes ``[batch, length / 2, width]`` for queries ``[batch, key_dim]``."""
        if not len(self.P):
            raise RuntimeError("CODA layer has no components: call add_slice() at the start of each task")
        prompt = torch.einsum("bm,mlw->blw", self.weights(query), self._cat(self.P))
        half = self.length // 2
        return prompt[:, :half], prompt[:, half:]


class CodaPrompt(nn.Module):
    """CODA-Prompt's prompts for several layers (one :class:`CodaLayer` each).

    Args:
        layers: block indices that get prefixes.
        key_dim: the query's width.
        length: prompt length per layer (8 in the paper: 4 key + 4 value rows).
        width: token width.
        per_task: components added per task (M / tasks; 10 in the paper).
    """

    def __init__(self, layers: Sequence[int], key_dim: int, length: int, width: int, per_task: int) -> None:
        super().__init__()
        if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
            raise ValueError(f"components per task must be an int >= 1, got {per_task!r}")
        self.layer_ids = list(layers)
        self.per_task = per_task
        self.layers = nn.ModuleList(CodaLayer(key_dim, length, width) for _ in self.layer_ids)

    def check_capacity(self, n_tasks: int) -> None:
        """``ValueError`` unless ``n_tasks`` slices fit (components x tasks <= key width and prompt size)."""
        total = self.per_task * n_tasks
        layer = self.layers[0] if len(self.layers) else None
        if layer is not None and total > min(layer.key_dim, layer.length * layer.width):
            raise ValueError(f"CODA needs {total} orthogonal components ({self.per_task} per task x {n_tasks} "
                             f"tasks) but the keys have {layer.key_dim} dimensions: lower components_per_task")

    def add_task(self, generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """Add one slice to every layer; returns the new (trainable) parameters."""
        return [p for layer in self.layers for p in layer.add_slice(self.per_task, generator)]

    def forward(self, query: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{block index: (key prefix, value prefix)}``."""
        return {i: layer(query) for i, layer in zip(self.layer_ids, self.layers, strict=True)}
