"""Process helpers shared by the benchmark scripts in ``experiments/``: memory probes (Linux ``/proc``; fallbacks
elsewhere), the peak-memory record of a worker, and running each method in its own worker process."""

from __future__ import annotations

import json
import subprocess
import sys


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so it cannot hide part of the next peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_record(device: str, rss0: int | None, reset_ok: bool) -> dict:
    """``peak_mb`` and ``peak_method`` of a worker: CUDA peak allocation, or RSS peak over ``rss0``."""
    import torch

    if device.startswith("cuda"):
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_method": "torch.cuda.max_memory_allocated"}
    return {"peak_mb": (peak_rss_bytes() - rss0) / 2**20,
            "peak_method": "VmHWM - VmRSS after model build" if reset_ok else "peak RSS increase (no reset)"}


def add_worker_arguments(parser, *, tasks: int, methods_help: str) -> None:
    """The options shared by the step-time scripts: TinyViT size, batch, tasks, timed steps, threads, device,
    methods, output file and the hidden ``--worker`` that :func:`run_workers` passes."""
    import argparse

    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=tasks)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=None, help=methods_help)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def run_workers(script: str, methods: list[str], args) -> list[dict]:
    """Run ``script --worker <method>`` with ``args`` for each method in a fresh process; its last stdout line is
    the JSON row (a failure becomes ``{"method", "error"}``). Rows are printed as they come."""
    rows = []
    for method in methods:
        cmd = [sys.executable, script, "--worker", method] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "out", "methods") and v is not None]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            rows.append({"method": method, "error": done.stderr.strip().splitlines()[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows
