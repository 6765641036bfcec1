"""Compact storage of a stream's step task vectors for the geometry analysis (bounded memory on large models).

Keeping one full fp32 copy of the weights per experience, and rebuilding every step and cumulative vector after
each experience, costs about ``2T + 1`` model copies at experience ``T`` (+477 MiB at 12 experiences for a
7.6 MiB model; tens of GB for a ViT-B/16). :class:`StepStore` keeps only the step vectors
``theta_i - theta_{i-1}``:

- ``storage="memory"``: in RAM; ``storage="disk"``: one safetensors file per step in a temporary folder, read back
  one tensor at a time (RAM then holds a single parameter of every step at once);
- ``dtype="float32"``: exact; ``"float16"``: each tensor divided by its largest magnitude before the cast (so no
  update underflows or overflows; relative error <= 2^-11 of that tensor's largest entry), half the bytes.

Vectors come back as lazy :class:`~avalanche_merge.merging.task_vector.TaskVector` objects whose tensors are
read (and de-scaled) on access; cumulative vectors are prefix sums of the steps, computed per tensor on access.
The geometry functions iterate tensor by tensor, so a report streams through the store.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..config import check_choice
from ..merging.task_vector import TaskVector

STORAGES = ("memory", "disk")
DTYPES = ("float32", "float16")


class _Lazy(Mapping):
    """name -> fp32 tensor, computed by ``load(name)`` on every access (nothing cached)."""

    def __init__(self, names: Sequence[str], load) -> None:
        self._names, self._load = list(names), load

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


class StepStore:
    """Step task vectors of a stream, kept in memory or on disk, in fp32 or scaled fp16 (see the module doc).

    Args:
        storage: ``"memory"`` or ``"disk"``.
        dtype: ``"float32"`` or ``"float16"``.
        folder: where ``disk`` storage writes (a fresh temporary folder inside it; default: the system's temporary
            folder); removed by :meth:`close`.
    """

    def __init__(self, *, storage: str = "memory", dtype: str = "float32", folder: str | Path | None = None) -> None:
        check_choice("storage", storage, STORAGES)
        check_choice("dtype", dtype, DTYPES)
        self.storage, self.dtype = storage, dtype
        self._parent = folder
        self._dir: Path | None = None
        self._steps: list[dict[str, torch.Tensor] | Path] = []
        self._scales: list[dict[str, float]] = []  # per step, per tensor (float16 only; empty for float32)

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, step: Mapping[str, torch.Tensor]) -> None:
        """Store one step vector (name -> tensor; converted, never kept by reference)."""
        packed, scales = {}, {}
        for name, t in step.items():
            t = t.detach().to("cpu", torch.float32)
            if self.dtype == "float16":
                peak = float(t.abs().max()) if t.numel() else 0.0
                scales[name] = peak if 0 < peak < float("inf") else 1.0
                packed[name] = (t / scales[name]).to(torch.float16).contiguous()
            else:
                packed[name] = t.clone().contiguous()
        if self.storage == "disk":
            from safetensors.torch import save_file

            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="geometry-", dir=self._parent))
            path = self._dir / f"step{len(self._steps):04d}.safetensors"
            save_file(packed, str(path))
            self._steps.append(path)
        else:
            self._steps.append(packed)
        self._scales.append(scales)

    def tensor(self, i: int, name: str) -> torch.Tensor:
        """Step ``i``'s tensor ``name`` in fp32."""
        stored = self._steps[i]
        if isinstance(stored, Path):
            from safetensors import safe_open

            with safe_open(str(stored), framework="pt") as f:
                t = f.get_tensor(name)
        else:
            t = stored[name]
        return t.to(torch.float32) * self._scales[i][name] if self.dtype == "float16" else t

    def steps(self, names: Sequence[str]) -> list[TaskVector]:
        """Lazy step vectors over ``names``."""
        return [TaskVector._trusted(_Lazy(names, lambda n, i=i: self.tensor(i, n))) for i in range(len(self))]

    def cumulative(self, names: Sequence[str]) -> list[TaskVector]:
        """Lazy cumulative vectors ``theta_{i+1} - theta_0`` (prefix sums of the steps) over ``names``."""
        def prefix(i: int, name: str) -> torch.Tensor:
            total = self.tensor(0, name).clone()
            for k in range(1, i + 1):
                total += self.tensor(k, name)
            return total

        return [TaskVector._trusted(_Lazy(names, lambda n, i=i: prefix(i, n))) for i in range(len(self))]

    def nbytes_in_memory(self) -> int:
        """Bytes of step data held in RAM (0 for disk storage)."""
        return sum(t.numel() * t.element_size() for s in self._steps if isinstance(s, dict) for t in s.values())

    def close(self) -> None:
        """Delete the disk folder (if any) and forget the steps."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir, self._steps, self._scales = None, [], []

    def __del__(self) -> None:  # a run that dies mid-stream leaves no folder behind
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()
