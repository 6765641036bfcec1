"""Parameter-space geometry of sequential training: the task vector of every experience and how they relate.

After experience ``i`` of a stream the weights are ``theta_i`` (``theta_0``: before the first experience, the
pretrained weights). Two task vectors per experience (Ilharco et al., "Editing Models with Task Arithmetic",
ICLR 2023):

- the *step* vector ``theta_i - theta_{i-1}``: what experience ``i`` changed;
- the *cumulative* vector ``theta_i - theta_0``: everything learned so far, relative to the pretrained model.

Measured on them:

- per-layer L2 norms;
- the cosine-similarity matrix across experiences (flattened over all compared parameters);
- the sign-conflict rate, the quantity TIES resolves (Yadav et al., "TIES-Merging", NeurIPS 2023): among the
  entries where two (or several) vectors are non-zero, the fraction whose signs disagree. ``density`` first keeps
  each tensor's top-magnitude fraction, as TIES' trim step does before it elects signs;
- per weight matrix: the effective rank of each update (Roy & Vetterli, "The effective rank: a measure of
  effective dimensionality", EUSIPCO 2007: ``exp`` of the entropy of the normalised singular values) and the
  principal angles between the experiences' update subspaces (Björck & Golub 1973; the row space of ``delta W``
  truncated to a fraction ``energy`` of its squared singular values, as GPM does, since a full fine-tuning update
  is numerically full rank).

Pure torch / numpy; no Avalanche import. Matrices over experiences are accumulated tensor by tensor, so only one
parameter of every experience is stacked at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..merging.steps import check_density, trim
from ..merging.task_vector import TaskVector, check_task_vectors, cosine_similarity_matrix
from .subspace import principal_angles, update_subspace

_LORA_MARKERS = ("lora_", "base_layer.")


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with, as fp32 CPU clones keyed by the plain parameter names.

    Every floating-point parameter and buffer, except that a peft LoRA layer contributes one entry, its base
    weight plus the ``delta W`` of its active, unmerged adapters, under the base layer's own name (peft's
    ``...q.base_layer.weight`` becomes ``...q.weight``); the adapter factors themselves are left out. So LoRA,
    sparse and full fine-tuning yield task vectors over the same names and can be compared.
    """
    from ..lora.adapters import delta_weight, lora_layers

    layers = lora_layers(model)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=False).items():
            if not t.is_floating_point() or any(m in name for m in _LORA_MARKERS):
                continue
            state[name] = t.detach().to("cpu", torch.float32, copy=True)
        for lname, layer in layers.items():
            base = layer.get_base_layer()
            for pname, p in base.named_parameters(recurse=False):
                w = p.detach().to(torch.float32).clone()
                if pname == "weight" and not getattr(layer, "merged", False) and not getattr(
                        layer, "disable_adapters", False):
                    for a in layer.active_adapters:
                        if a in getattr(layer, "lora_A", {}):
                            w += delta_weight(layer, a).detach().to(torch.float32).reshape(w.shape)
                state[f"{lname}.{pname}"] = w.cpu()
    return state


def task_vectors(snapshots: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[TaskVector], list[TaskVector]]:
    """Step and cumulative task vectors from weight snapshots ``[theta_0, theta_1, ..., theta_T]``.

    Only names present with the same shape in every snapshot are compared (a head that grows, an adapter added
    later, is left out; :func:`shared_names` lists what is kept).

    Returns:
        ``(steps, cumulative)``: ``steps[i] = theta_{i+1} - theta_i``, ``cumulative[i] = theta_{i+1} - theta_0``.

    Raises:
        ValueError: fewer than two snapshots, or no parameter common to all of them.
    """
    if len(snapshots) < 2:
        raise ValueError(f"need at least two weight snapshots (before and after an experience), got {len(snapshots)}")
    names = shared_names(snapshots)
    if not names:
        raise ValueError("the snapshots share no floating-point parameter of equal shape")
    sel = [{n: s[n] for n in names} for s in snapshots]
    steps = [TaskVector.from_models(sel[i], sel[i + 1]) for i in range(len(sel) - 1)]
    cumulative = [TaskVector.from_models(sel[0], sel[i + 1]) for i in range(len(sel) - 1)]
    return steps, cumulative


def shared_names(snapshots: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Floating-point names present with one shape in every snapshot, in the first snapshot's order."""
    first = snapshots[0]
    return [n for n, t in first.items() if t.is_floating_point()
            and all(n in s and s[n].shape == t.shape for s in snapshots[1:])]


def layer_norms(tv: TaskVector) -> dict[str, float]:
    """L2 norm of every tensor of a task vector."""
    return tv.norms()


def _stacks(tvs: Sequence[TaskVector], density: float | None):
    tvs = check_task_vectors(tvs)
    for name in tvs[0]:
        x = torch.stack([tv[name].reshape(-1) for tv in tvs]).double()
        if density is not None:
            x = torch.stack([trim(row, density) for row in x])
        yield name, x


def cosine_matrix(tvs: Sequence[TaskVector]) -> np.ndarray:
    """``T x T`` cosine similarities of the flattened task vectors (0 where a vector is all zeros)."""
    return cosine_similarity_matrix(tvs).double().numpy()


def sign_conflict_matrix(tvs: Sequence[TaskVector], *, density: float | None = None) -> np.ndarray:
    """``C[a, b]``: among entries where vectors ``a`` and ``b`` are both non-zero, the fraction of opposite sign.

    The diagonal is 0; ``nan`` where two vectors share no non-zero entry. ``density`` trims every tensor of
    every vector to its top-magnitude fraction first (TIES' trim step).
    """
    if density is not None:
        check_density(density)
    both = conflict = None
    for _, x in _stacks(tvs, density):
        s = x.sign()
        nz = (s != 0).double()
        b, c = nz @ nz.T, (s.clamp(min=0) @ s.clamp(max=0).abs().T)
        c = c + c.T
        both = b if both is None else both + b
        conflict = c if conflict is None else conflict + c
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(both.numpy() > 0, conflict.numpy() / both.numpy(), np.nan)
    np.fill_diagonal(out, 0.0)
    return out


def sign_conflict_rate(tvs: Sequence[TaskVector], *, density: float | None = None) -> float:
    """Over the entries where at least two of the vectors are non-zero, the fraction whose signs are not unanimous.

    This is the share of parameters on which TIES' sign election overrules some task. ``nan`` when no entry is
    non-zero in two vectors.
    """
    if density is not None:
        check_density(density)
    shared = conflicted = 0
    for _, x in _stacks(tvs, density):
        pos, neg = (x > 0).sum(0), (x < 0).sum(0)
        multi = (pos + neg) >= 2
        shared += int(multi.sum())
        conflicted += int((multi & (pos > 0) & (neg > 0)).sum())
    return conflicted / shared if shared else math.nan


def effective_rank(matrix: torch.Tensor | np.ndarray) -> float:
    """Roy & Vetterli (2007): ``exp(-sum p_k log p_k)`` with ``p_k = sigma_k / sum sigma``; 0 for a zero matrix.

    Between 1 (rank one) and ``min(shape)`` (all singular values equal). More than two dims are flattened to
    ``(shape[0], -1)`` (a conv kernel as ``out x (in * kh * kw)``).
    """
    m = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix.detach())
    if m.ndim < 2:
        raise ValueError(f"effective rank needs a matrix, got shape {tuple(m.shape)}")
    s = torch.linalg.svdvals(m.reshape(m.shape[0], -1).double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def matrix_names(tv: TaskVector) -> list[str]:
    """The tensors of a task vector that are weight matrices (2-D or conv kernels), where ranks and angles apply."""
    return [n for n, t in tv.items() if t.ndim >= 2 and min(t.shape[0], t[0].numel()) >= 2]


def update_angles(tvs: Sequence[TaskVector], name: str, *, energy: float = 0.9) -> np.ndarray:
    """Mean principal angle (degrees) between the input subspaces of tensor ``name``'s updates, ``T x T``.

    Each update's subspace is its row space truncated to ``energy`` of ``sum sigma^2``; ``nan`` where an update
    is zero. 0 means one subspace contains the other, 90 that they are orthogonal.
    """
    bases = []
    for tv in tvs:
        t = tv[name]
        bases.append(update_subspace(t, energy=energy) if bool(t.any()) else None)
    n = len(bases)
    out = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(a, n):
            if bases[a] is None or bases[b] is None or not bases[a].shape[1] or not bases[b].shape[1]:
                continue
            out[a, b] = out[b, a] = float(np.degrees(principal_angles(bases[a], bases[b])).mean())
    return out


def _mean_offdiag(m: np.ndarray) -> float:
    if m.shape[0] < 2:
        return math.nan
    vals = m[~np.eye(m.shape[0], dtype=bool)]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else math.nan


def geometry_report(snapshots: Sequence[Mapping[str, torch.Tensor]], *, density: float | None = 0.2,
                    energy: float = 0.9) -> dict:
    """Everything this module measures, for snapshots ``[theta_0, ..., theta_T]``, as JSON-ready lists.

    Keys: ``names`` (compared tensors), ``step_norms`` / ``cumulative_norms`` (``T x names``), ``step_cosine`` /
    ``cumulative_cosine`` (``T x T``), ``step_sign_conflict`` (``T x T``, after trimming to ``density``; ``None``
    where undefined, here and in every other entry, so the report is strict JSON),
    ``sign_conflict_rate`` (all step vectors, trimmed), ``effective_rank`` (``T x matrices``), ``matrices``,
    ``angles`` (per matrix, ``T x T`` mean principal angle in degrees), and the scalars ``mean_step_cosine``,
    ``mean_sign_conflict``, ``mean_angle``, ``mean_effective_rank``.
    """
    steps, cumulative = task_vectors(snapshots)
    return steps_report(steps, cumulative, density=density, energy=energy)


def steps_report(steps: Sequence[TaskVector], cumulative: Sequence[TaskVector], *, density: float | None = 0.2,
                 energy: float = 0.9) -> dict:
    """:func:`geometry_report` from the step and cumulative task vectors themselves (e.g. the lazy vectors of
    :class:`~avalanche_merge.analysis.step_store.StepStore`, which are read one tensor at a time)."""
    names = steps[0].keys()
    mats = matrix_names(steps[0])
    step_cos, sign = cosine_matrix(steps), sign_conflict_matrix(steps, density=density)
    angles = {n: update_angles(steps, n, energy=energy) for n in mats}
    eranks = [[effective_rank(tv[n]) for n in mats] for tv in steps]
    finite_angles = [_mean_offdiag(a) for a in angles.values()]
    finite_angles = [a for a in finite_angles if not math.isnan(a)]

    def rows(m: np.ndarray) -> list:
        return [[None if not np.isfinite(v) else float(v) for v in r] for r in m]

    def num(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v)

    return {
        "names": names, "matrices": mats, "density": density, "energy": energy,
        "step_norms": [list(tv.norms().values()) for tv in steps],  # in ``names`` order: the vectors' own order
        "cumulative_norms": [list(tv.norms().values()) for tv in cumulative],
        "step_total_norm": [tv.norm() for tv in steps],
        "cumulative_total_norm": [tv.norm() for tv in cumulative],
        "step_cosine": rows(step_cos), "cumulative_cosine": rows(cosine_matrix(cumulative)),
        "step_sign_conflict": rows(sign),
        "sign_conflict_rate": num(sign_conflict_rate(steps, density=density)) if len(steps) > 1 else None,
        "effective_rank": eranks,
        "angles": {n: rows(a) for n, a in angles.items()},
        "mean_step_cosine": num(_mean_offdiag(step_cos)),
        "mean_sign_conflict": num(_mean_offdiag(sign)),
        "mean_angle": float(np.mean(finite_angles)) if finite_angles else None,
        "mean_effective_rank": float(np.mean(eranks)) if mats else None,
    }


__all__ = ["cosine_matrix", "effective_rank", "effective_state", "geometry_report", "layer_norms", "matrix_names",
           "shared_names", "sign_conflict_matrix", "sign_conflict_rate", "steps_report", "task_vectors",
           "update_angles"]
