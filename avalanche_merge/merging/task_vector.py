"""Task vectors: the parameter change that fine-tuning made to a pretrained model.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023: ``tau = theta_finetuned - theta_pretrained``;
adding ``lambda * sum_t tau_t`` to the pretrained weights merges tasks.

Pure torch; no Avalanche import. Only floating-point tensors enter the arithmetic; integer buffers (e.g.
``num_batches_tracked``) are left out of the task vector and carried from the pretrained state dict by
:meth:`TaskVector.apply_to`. Values are held in fp32 whatever the input dtype (fp32, bf16, fp16), on the input's
device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]


def _state(obj: nn.Module | StateDict) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(obj).__name__}")


def check_scalar(name: str, value: object) -> float:
    """``value`` as a finite float; ``TypeError`` / ``ValueError`` naming ``name`` otherwise (a NaN or infinite
    scaling or weight would write NaN or Inf into every merged weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"parameter {name!r} contains NaN or Inf")


class TaskVector:
    """A mapping from parameter names to fp32 differences, with vector-space operations.

    Args:
        vector: name -> floating tensor. Values are validated (finite) and converted to fp32.

    Raises:
        TypeError: a value is not a floating-point tensor.
        ValueError: a value contains NaN or Inf, or the mapping is empty.
    """

    def __init__(self, vector: Mapping[str, torch.Tensor]) -> None:
        if not vector:
            raise ValueError("a task vector needs at least one parameter")
        self._v: dict[str, torch.Tensor] = {}
        for name, t in vector.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"parameter {name!r} must be a floating-point tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            _check_finite(name, t)
            self._v[name] = t.detach().to(torch.float32)

    # construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_models(cls, pretrained: nn.Module | StateDict, finetuned: nn.Module | StateDict) -> TaskVector:
        """``finetuned - pretrained`` over the floating-point entries of two models or state dicts.

        Raises:
            ValueError: the two have different keys (names the first differing one), or a parameter differs in
                shape or dtype, or holds NaN/Inf.
        """
        pre, fine = _state(pretrained), _state(finetuned)
        _check_same_keys(pre, fine, "pretrained", "fine-tuned")
        diff = {}
        for name, p in pre.items():
            f = fine[name]
            if p.shape != f.shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} in the pretrained model but "
                                 f"{tuple(f.shape)} in the fine-tuned one")
            if p.dtype != f.dtype:
                raise ValueError(f"parameter {name!r} has dtype {p.dtype} in the pretrained model but {f.dtype} "
                                 f"in the fine-tuned one")
            if not p.is_floating_point():
                continue  # integer buffers never enter arithmetic
            _check_finite(name, p)
            _check_finite(name, f)
            diff[name] = f.detach().to(torch.float32) - p.detach().to(torch.float32)
        return cls(diff)

    from_state_dicts = from_models

    @classmethod
    def zeros_like(cls, other: TaskVector) -> TaskVector:
        return cls._trusted({k: torch.zeros_like(v) for k, v in other.items()})

    @classmethod
    def _trusted(cls, vector: dict[str, torch.Tensor]) -> TaskVector:
        """Wrap fp32 tensors computed from validated task vectors without another validation pass."""
        tv = cls.__new__(cls)
        tv._v = vector
        return tv

    # mapping protocol ------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._v)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._v.items())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._v[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._v)

    def __contains__(self, name: object) -> bool:
        return name in self._v

    def __len__(self) -> int:
        return len(self._v)

    def numel(self) -> int:
        return sum(v.numel() for v in self._v.values())

    # arithmetic ------------------------------------------------------------------------------------------------
    def _check_compatible(self, other: TaskVector) -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"expected a TaskVector, got {type(other).__name__}")
        _check_same_keys(self._v, other._v, "left", "right")
        for name, v in self._v.items():
            if v.shape != other._v[name].shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(v.shape)} and {tuple(other._v[name].shape)}")

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> TaskVector:
        """A new task vector with ``fn(name, tensor)`` applied to every entry."""
        return TaskVector({k: fn(k, v) for k, v in self._v.items()})

    def select(self, names: Iterable[str]) -> TaskVector:
        """A task vector holding only ``names`` (in this vector's key order).

        Raises:
            KeyError: a name is not in the task vector.
        """
        wanted = set(names)
        unknown = wanted - set(self._v)
        if unknown:
            raise KeyError(f"parameter {sorted(unknown)[0]!r} is not in the task vector")
        return TaskVector._trusted({k: v for k, v in self._v.items() if k in wanted})

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check_compatible(other)
        return TaskVector._trusted({k: v + other._v[k] for k, v in self._v.items()})

    def __sub__(self, other: TaskVector) -> TaskVector:
        self._check_compatible(other)
        return TaskVector._trusted({k: v - other._v[k] for k, v in self._v.items()})

    def __neg__(self) -> TaskVector:
        return TaskVector._trusted({k: -v for k, v in self._v.items()})

    def __mul__(self, scalar: float) -> TaskVector:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            raise TypeError(f"a task vector can only be scaled by a number, got {type(scalar).__name__}")
        scalar = float(scalar)
        if scalar != scalar or scalar in (float("inf"), float("-inf")):
            raise ValueError(f"a task vector can only be scaled by a finite number, got {scalar}")
        return TaskVector._trusted({k: v * scalar for k, v in self._v.items()})

    __rmul__ = __mul__

    def flatten(self) -> torch.Tensor:
        """All entries concatenated in key order (fp32, 1-D)."""
        return torch.cat([v.reshape(-1) for v in self._v.values()])

    def norm(self) -> float:
        """Global L2 norm."""
        return float(torch.sqrt(sum((v.double() ** 2).sum() for v in self._v.values())))

    def norms(self) -> dict[str, float]:
        """L2 norm of every entry."""
        return {k: float(v.norm()) for k, v in self._v.items()}

    def apply_to(self, pretrained: nn.Module | StateDict, scaling: float = 1.0) -> dict[str, torch.Tensor]:
        """``pretrained + scaling * self`` as a new state dict in the pretrained dtypes.

        Non-floating entries (integer buffers) are copied from ``pretrained``.

        Raises:
            TypeError, ValueError: ``scaling`` is not a finite number.
            ValueError: the floating entries of ``pretrained`` and the task vector differ in keys or shapes, or a
                merged entry does not fit the pretrained dtype (an fp16/bf16 overflow), naming the parameter.
        """
        scaling = check_scalar("scaling", scaling)
        pre = _state(pretrained)
        floats = {k: v for k, v in pre.items() if v.is_floating_point()}
        _check_same_keys(floats, self._v, "pretrained", "task vector")
        out = {}
        for name, p in pre.items():
            if name not in self._v:
                out[name] = p.clone()
                continue
            if p.shape != self._v[name].shape:
                raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} in the pretrained model but "
                                 f"{tuple(self._v[name].shape)} in the task vector")
            merged = p.to(torch.float32) + scaling * self._v[name].to(p.device)  # fp32 accumulation
            cast = merged.to(p.dtype)
            if not torch.isfinite(cast).all():
                raise ValueError(f"parameter {name!r}: the merged weights reach {float(merged.abs().max()):.4g}, "
                                 f"beyond the range of {p.dtype}; lower the scaling or merge in float32")
            out[name] = cast
        return out

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel()} values, norm={self.norm():.4g})"


def _check_same_keys(a: Mapping, b: Mapping, name_a: str, name_b: str) -> None:
    missing = [k for k in a if k not in b]
    extra = [k for k in b if k not in a]
    if missing:
        raise ValueError(f"parameter {missing[0]!r} is in the {name_a} weights but not in the {name_b} ones"
                         + (f" ({len(missing)} keys differ)" if len(missing) > 1 else ""))
    if extra:
        raise ValueError(f"parameter {extra[0]!r} is in the {name_b} weights but not in the {name_a} ones"
                         + (f" ({len(extra)} keys differ)" if len(extra) > 1 else ""))


def check_task_vectors(task_vectors: Sequence[TaskVector]) -> list[TaskVector]:
    """Validate a non-empty list of task vectors with identical keys and shapes."""
    tvs = list(task_vectors)
    if not tvs:
        raise ValueError("need at least one task vector")
    for i, tv in enumerate(tvs):
        if not isinstance(tv, TaskVector):
            raise TypeError(f"task_vectors[{i}] must be a TaskVector, got {type(tv).__name__}")
        if i:
            tvs[0]._check_compatible(tv)
    return tvs


def cosine_similarity_matrix(task_vectors: Sequence[TaskVector]) -> torch.Tensor:
    """``T x T`` cosine similarities between flattened task vectors (0 where a vector is all zeros).

    The Gram matrix is accumulated tensor by tensor (float64), so only one parameter of every vector is stacked
    at a time.
    """
    tvs = check_task_vectors(task_vectors)
    gram = torch.zeros(len(tvs), len(tvs), dtype=torch.float64)
    for name in tvs[0]:
        x = torch.stack([tv[name].reshape(-1) for tv in tvs]).double()
        gram += (x @ x.T).cpu()
    norms = gram.diagonal().sqrt()
    denom = torch.outer(norms, norms)
    unit = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(gram))
    return unit.clamp(-1.0, 1.0).float()
