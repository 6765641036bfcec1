"""Loading untrusted files without executing code: pickles restricted to an allow-list of globals, and model
weights through safetensors or ``torch.load(weights_only=True)`` only.

A pickle can name any importable callable and call it while it loads (``os.system``, ...); data sets distributed
as pickles (CIFAR's python archives) and ``.pt`` checkpoints are therefore read here with an unpickler that refuses
every global outside an explicit allow-list, whatever the environment says (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
only affects calls that do not pass ``weights_only`` explicitly).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

#: the globals a pickled NumPy array needs (CIFAR's data batches), under NumPy 1 and 2 module names
NUMPY_ARRAY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the ``(module, name)`` globals of ``allowed``."""

    def __init__(self, file: Any, *, allowed: Iterable[tuple[str, str]] = (), **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.allowed = frozenset(allowed)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not an allowed data type)")
        return super().find_class(module, name)


def safe_unpickle(path: str | Path, *, allowed: Iterable[tuple[str, str]] = (), encoding: str = "latin1") -> Any:
    """The object pickled in ``path``, loaded with :class:`RestrictedUnpickler`.

    Raises:
        ValueError: the file names a global outside ``allowed``, or is not a valid pickle (the path is named).
    """
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, allowed=allowed, encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as exc:
        raise ValueError(f"{path}: not a plain data pickle ({exc})") from exc


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a torch checkpoint read with ``weights_only=True``.

    A checkpoint holding ``{"state_dict": ...}`` is unwrapped and a ``module.`` prefix (DataParallel) removed.

    Raises:
        ValueError: the file cannot be read as weights (the path and the reason are named).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the file's fault: say which file
        raise ValueError(f"{path}: cannot be loaded as model weights without executing code ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def open_safetensors(path: str | Path, *, device: str = "cpu"):
    """``safetensors.safe_open(path)``, with a file that is missing or not safetensors reported by name.

    Use as a context manager (``with open_safetensors(p) as f: ...``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: ``path`` is not a readable safetensors file (the path and the reason are named).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None

