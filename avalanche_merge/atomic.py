"""Atomic file writes (a temporary file in the target folder, then ``os.replace``: never a half-written file), the
check that a folder can receive them, and an exclusive ``flock`` on a file (released when its holder dies)."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an output folder, or None: a file is in the way, or the folder (or the
    nearest existing parent it would be created in) cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"cannot be written ({probe} is not writable)"
    return None


@contextmanager
def folder_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); yields False when ``blocking`` is False and
    another process holds it. Released when the block ends or the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            except OSError as exc:  # a file system without flock
                warnings.warn(f"cannot lock {path} ({exc}); concurrent runners may repeat work", stacklevel=3)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
        yield True
    finally:
        os.close(fd)
