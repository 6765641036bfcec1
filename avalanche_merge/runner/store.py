"""Stored runs of a results folder: reading and checking ``result.json`` files, per-run locks, temp-file cleanup.

Layout: ``<out>/runs/<run_id>/result.json`` (written atomically when the run has finished), ``error.json`` (the
last failure), ``.lock`` (held while a process computes the run). Every reader of stored runs (the resume, the
summary, ``avalanche-merge report``) goes through :func:`read_result`, so a corrupt file is treated the same way
everywhere: named, skipped, and (by the runner) computed again.

Concurrency: :func:`run_lock` takes an exclusive ``flock`` on the run's ``.lock`` file. The kernel releases it
when the holder exits, even on ``SIGKILL``, so a crashed runner never blocks the run; two runners sharing one
folder never compute the same run twice (the second waits for the first and then reads its result). On file
systems without ``flock`` (some network mounts) the lock is a no-op and a warning says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import folder_lock

REQUIRED = ("status", "accuracy_matrix", "benchmark", "label", "seed", "method")
TEMP_PREFIX = ".tmp-"


class CorruptResult(ValueError):
    """A ``result.json`` that cannot be used (unreadable, not a mapping, missing or malformed fields)."""


def run_dir(out_dir: Path, run_id: str) -> Path:
    return Path(out_dir) / "runs" / run_id


def check_result(result: object, require: tuple[str, ...] = ()) -> dict:
    """``result`` if it is a usable run record (with the fields :data:`REQUIRED` and ``require``), else
    :class:`CorruptResult` naming what is wrong."""
    if not isinstance(result, dict):
        raise CorruptResult(f"not a JSON object but {type(result).__name__}")
    missing = [k for k in REQUIRED + tuple(require) if k not in result]
    if missing:
        raise CorruptResult(f"missing {missing}")
    for key in ("benchmark", "label", "method", "config_hash", "status"):
        if key in result and not isinstance(result[key], str):
            raise CorruptResult(f"{key} is {type(result[key]).__name__}, not a string")
    if isinstance(result["seed"], bool) or not isinstance(result["seed"], int):
        raise CorruptResult(f"seed is {result['seed']!r}, not an integer")
    matrix = result["accuracy_matrix"]
    if (not isinstance(matrix, list) or not matrix or not all(isinstance(row, list) and row for row in matrix)
            or len({len(row) for row in matrix}) != 1):
        raise CorruptResult("accuracy_matrix is not a non-empty list of equal-length rows")
    for row in matrix:
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
                raise CorruptResult(f"accuracy_matrix holds {v!r}, not an accuracy in [0, 1]")
    for key in ("train_time_s", "wall_time_s", "eval_time_s", "setup_time_s", "cpu_time_s", "peak_rss_mb",
                "trainable_params"):
        v = result.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CorruptResult(f"{key} is {v!r}, not a finite number")
    for key in ("metrics", "avalanche_metrics", "config"):
        if not isinstance(result.get(key, {}), dict):
            raise CorruptResult(f"{key} is not a mapping")
    return result


def read_result(path: Path, require: tuple[str, ...] = ()) -> dict:
    """The checked run record stored at ``path``; :class:`CorruptResult` (naming the file) when unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return check_result(json.loads(text), require)
    except UnicodeDecodeError as exc:
        raise CorruptResult(f"{path}: not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise CorruptResult(f"{path}: not valid JSON ({exc})") from None
    except CorruptResult as exc:
        raise CorruptResult(f"{path}: {exc}") from None


def stored_results(out_dir: Path, *, warn=None) -> list[dict]:
    """Every complete, well-formed run stored under ``out_dir/runs``; others are reported through ``warn``."""
    results = []
    for path in sorted((Path(out_dir) / "runs").glob("*/result.json")):
        try:
            result = read_result(path)
        except (CorruptResult, OSError) as exc:
            if warn is not None:
                warn(f"skipping {exc}")
            continue
        if result["status"] != "complete":
            if warn is not None:
                warn(f"skipping {path}: status {result['status']!r}, not 'complete'")
            continue
        results.append(result)
    return results


def run_lock(out_dir: Path, run_id: str, *, blocking: bool = False):
    """:func:`folder_lock` on ``<out>/runs/<run_id>/.lock``."""
    return folder_lock(run_dir(out_dir, run_id) / ".lock", blocking=blocking)


def remove_temp_files(folder: Path) -> int:
    """Delete the temporary files an interrupted atomic write left directly in ``folder`` (call it only while
    holding the lock that guards the folder's writers); returns how many were removed."""
    removed = 0
    for p in Path(folder).glob(TEMP_PREFIX + "*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed
