"""Merge checkpoints stored as safetensors, one tensor name at a time.

Each input file is memory-mapped with ``safetensors.safe_open``; for every parameter name the pretrained tensor
and the ``T`` fine-tuned tensors are read, merged with the same offline merge used in memory (so both paths give
identical results), and the merged tensor is kept in the pretrained dtype. Peak memory is about one model (the
output) plus one tensor per input, instead of ``T + 1`` models.

Merges that need the whole model at once (TIES with ``trim_scope="model"``) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..safe_load import open_safetensors
from .registry import OFFLINE_MERGES
from .task_vector import TaskVector, check_scalar


def _open_all(stack: ExitStack, paths: Sequence[Path], device: str) -> list:
    handles = []
    for p in paths:
        handles.append(stack.enter_context(open_safetensors(p, device=device)))
    return handles


def _check_unchanged(name: str, pre: torch.Tensor, finetuned: list) -> None:
    """A non-floating tensor (integer, bool, complex) is not merged: it must equal the pretrained one in every
    fine-tuned file, except an integer counter of one element (e.g. BatchNorm's ``num_batches_tracked``), which
    keeps the pretrained value. Anything else (int8 weights, complex tensors) that changed would be silently
    dropped, so it is refused."""
    counter = pre.numel() == 1 and not pre.is_complex() and pre.dtype != torch.bool
    for path, t in finetuned:
        if t.dtype != pre.dtype or t.shape != pre.shape:
            raise ValueError(f"parameter {name!r} is {t.dtype} {tuple(t.shape)} in {path} but {pre.dtype} "
                             f"{tuple(pre.shape)} in the pretrained file")
        if not counter and not torch.equal(t, pre):
            raise ValueError(f"parameter {name!r} ({pre.dtype}) differs between the pretrained file and {path}; "
                             f"non-floating tensors are not merged (only integer counters of one element keep the "
                             f"pretrained value)")


def merge_safetensors(pretrained: str | Path, finetuned: Sequence[str | Path], out: str | Path, *,
                      merge: str | Callable[..., TaskVector] = "task_arithmetic", scaling: float = 1.0,
                      options: dict | None = None, device: str = "cpu", progress: bool = True) -> Path:
    """Write ``pretrained + scaling * merge(task vectors)`` to ``out`` (safetensors), tensor by tensor.

    Args:
        pretrained: the pretrained checkpoint.
        finetuned: the fine-tuned checkpoints (same names, shapes and dtypes).
        out: output path (written atomically).
        merge: an offline merge name (see ``OFFLINE_MERGES``) or function; it must work tensor by tensor.
        scaling: lambda applied to the merged task vector.
        options: keyword options of the merge (e.g. ``{"density": 0.2}``).
        device: where tensors are loaded and merged (``"cpu"``, ``"cuda:0"``).
        progress: show a tqdm bar over tensor names.

    Returns:
        ``out`` as a Path.

    Raises:
        FileNotFoundError: a checkpoint is missing.
        ValueError: no fine-tuned checkpoints, names differ between files, a tensor differs in shape or dtype,
            or the merge needs the whole model.
    """
    options = dict(options or {})
    scaling = check_scalar("scaling", scaling)
    fn = OFFLINE_MERGES.get(merge) if isinstance(merge, str) else merge
    if options.get("trim_scope") == "model":
        raise ValueError("trim_scope='model' needs the whole model at once; use trim_scope='tensor' to stream")
    paths = [Path(p) for p in finetuned]
    if not paths:
        raise ValueError("need at least one fine-tuned checkpoint")
    out = Path(out)
    merged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        pre_f, *fine_fs = _open_all(stack, [Path(pretrained), *paths], device)
        names = list(pre_f.keys())
        for path, f in zip(paths, fine_fs):
            keys = set(f.keys())
            if keys != set(names):
                diff = sorted(keys.symmetric_difference(names))[0]
                raise ValueError(f"parameter {diff!r} is in only one of {pretrained} and {path}")
        if not names:
            raise ValueError(f"{pretrained} holds no tensors: nothing to merge")
        metadata = pre_f.metadata()
        for name in tqdm(names, desc="merging tensors", disable=not progress):
            pre = pre_f.get_tensor(name)
            if not pre.is_floating_point():
                _check_unchanged(name, pre, [(path, f.get_tensor(name)) for path, f in zip(paths, fine_fs)])
                merged[name] = pre
                continue
            tvs = [TaskVector.from_state_dicts({name: pre}, {name: f.get_tensor(name)}) for f in fine_fs]
            merged[name] = fn(tvs, **options).apply_to({name: pre}, scaling=scaling)[name]
            del tvs
    with atomic_path(out) as tmp:
        save_file(merged, str(tmp), metadata=metadata)
    return out
