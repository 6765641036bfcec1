"""Claim files: which worker computes a run, visible to every worker on a shared file system.

A worker that starts a run creates ``<out>/runs/<run_id>/claim.json`` atomically (written to a temporary file,
then hard-linked to its name, which fails when the name exists: two workers never both create it, also over
NFS). The file names its holder (host, process id and start time, a random token) and the holder touches it
every ``ttl / 5`` seconds while it computes (a heartbeat thread). Another worker treats the claim as *live*, and
leaves the run alone, unless it is *stale*:

- its holder ran on this host and that process is gone (killed, crashed, rebooted): stale at once;
- its modification time is more than ``ttl`` seconds old (no heartbeat: the holder or its host died, or the
  file system lost it): stale on any host.

A stale claim is taken over: under a short take-over lock (``.claim-takeover``, created the same way), it is
renamed to a unique name, then the run is claimed anew; of several workers racing for it, one gets it. The
claim is removed when the run ends (completed or failed). Compared with the per-run ``flock`` of :mod:`.store`
(also taken; the kernel drops it when its holder dies, but only on one machine, and some network file systems do
not share it), claims work across hosts and say who holds a run.

Choose ``ttl`` well above the clock skew between hosts and the longest pause of a live worker (swap, a
suspended job): a holder silent for longer than ``ttl`` loses its run to another worker, which then computes it
a second time (the result is identical and written atomically, so nothing is corrupted, but time is lost).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

CLAIM_NAME = "claim.json"
DEFAULT_TTL_S = 300.0


def check_ttl(ttl: float) -> float:
    """``ttl`` as a float, refused (ValueError) unless it is a finite number of seconds >= 1."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1.0 <= ttl < float("inf"):
        raise ValueError(f"claim ttl must be a number of seconds >= 1, got {ttl!r}")
    return float(ttl)


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid())}


@dataclass(frozen=True)
class ClaimState:
    """What a worker sees at a claim path: ``absent``, ``live`` or ``stale`` (with why), and the holder."""

    status: str
    reason: str = ""
    holder: dict | None = None


def read_claim(path: Path, ttl: float) -> ClaimState:
    """The state of the claim at ``path`` for a worker on this host (see the module docstring)."""
    try:
        mtime = os.stat(path).st_mtime
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(holder, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return ClaimState("absent")
    except (OSError, ValueError) as exc:  # unreadable: judged by its age alone
        holder = {"unreadable": str(exc)}
    age = time.time() - mtime
    if age > ttl:
        return ClaimState("stale", f"no heartbeat for {age:.0f} s (ttl {ttl:.0f} s)", holder)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        start = _process_start(holder["pid"])
        if start is None or (holder.get("pid_start") is not None and abs(start - holder["pid_start"]) > 1e-3):
            return ClaimState("stale", f"process {holder['pid']} on this host is gone", holder)
    return ClaimState("live", "", holder)


def _create(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` if no file has that name (atomic, also on NFS); True when created."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-claim-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL creation, then the content
            try:
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w") as f:
                json.dump(record, f)
        return True
    finally:
        os.unlink(tmp)


def _take_over(path: Path, stale: ClaimState, ttl: float) -> None:
    """Move the stale claim at ``path`` aside, holding the folder's take-over lock (a file created like a claim)
    so that workers racing for it do not move each other's fresh claims; a moved claim that is not the one
    judged stale (released and re-created meanwhile) is put back."""
    lock = path.with_name(".claim-takeover")
    if not _create(lock, _me()):
        with contextlib.suppress(FileNotFoundError):  # a taker that died within these few lines
            if time.time() - os.stat(lock).st_mtime > min(ttl, 60.0):
                lock.unlink(missing_ok=True)
        return
    try:
        judged = (stale.holder or {}).get("token")
        now = read_claim(path, ttl)
        if now.status != "stale" or (now.holder or {}).get("token") != judged:
            return
        grave = path.with_name(f".claim-expired-{uuid.uuid4().hex}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(grave.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = None
        if isinstance(moved, dict) and moved.get("token") != judged:
            with contextlib.suppress(OSError):
                os.link(grave, path)  # not the claim judged stale: restore it
        grave.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


class Claim:
    """A claim this process holds; :meth:`release` removes it. While :meth:`heartbeat` runs, its file is
    touched every ``ttl / 5`` seconds; ``lost`` becomes True if another worker replaced it."""

    def __init__(self, path: Path, record: dict, ttl: float):
        self.path, self.record, self.ttl = path, record, ttl
        self.lost = False

    def _mine(self) -> bool:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")).get("token") == self.record["token"]
        except (OSError, ValueError, AttributeError):
            return False

    def touch(self) -> bool:
        """Refresh the heartbeat; False (and ``lost``) when the file is no longer this claim."""
        if self._mine():
            with contextlib.suppress(OSError):
                os.utime(self.path)
            return True
        if not self.lost:
            warnings.warn(f"{self.path}: this worker's claim was taken over (its heartbeat stopped for longer "
                          f"than {self.ttl:.0f} s?); the run may be computed twice", stacklevel=2)
        self.lost = True
        return False

    @contextlib.contextmanager
    def heartbeat(self) -> Iterator[Claim]:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl / 5):
                self.touch()

        thread = threading.Thread(target=beat, daemon=True, name="claim-heartbeat")
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def release(self) -> None:
        if self._mine():
            self.path.unlink(missing_ok=True)


def try_claim(folder: Path, *, ttl: float = DEFAULT_TTL_S) -> Claim | None:
    """Claim the run stored in ``folder``: a :class:`Claim`, or None while another worker's claim is live."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM_NAME
    record = {**_me(), "token": uuid.uuid4().hex, "claimed_at": time.time()}
    for _ in range(3):  # create; else take a stale claim over and create again
        if _create(path, record):
            return Claim(path, record, ttl)
        state = read_claim(path, ttl)
        if state.status == "live":
            return None
        if state.status == "stale":
            _take_over(path, state, ttl)
    return None
