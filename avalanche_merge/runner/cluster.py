"""Grids on a cluster through submitit (https://github.com/facebookincubator/submitit): one job array whose task
k runs shard k/N of the plan.

submitit submits the array to SLURM (``cluster="slurm"``), or runs its tasks as local processes
(``cluster="local"``, what the tests use) or in this process (``cluster="debug"``). Every task is an ordinary
``--shard k/N`` worker on the shared results folder: runs are claimed through claim files (:mod:`.claims`), so
tasks that fail or are pre-empted leave their runs to a re-submission, and the task that finishes last writes
the folder summary (``avalanche-merge summarize OUT`` does it at any time). Install with
``pip install avalanche-merge[cluster]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from .claims import DEFAULT_TTL_S, check_ttl
from .parallel import available_cores, check_jobs, check_threads, default_threads, thread_limit
from .plan import ExperimentConfig

CLUSTERS = ("auto", "slurm", "local", "debug")


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings as submitit parameters (values that read as integers or floats become numbers)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--executor-param must be KEY=VALUE (e.g. slurm_partition=gpu), got {item!r}")
        for cast in (int, float):
            try:
                params[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            params[key.strip()] = value
    return params


def run_shard(config: ExperimentConfig, out: str, shard: tuple[int, int], threads: int | None, claim_ttl: float,
              keep_going: bool) -> dict:
    """One array task: shard ``k/n`` of ``config`` in this process, with ``threads`` (default: the CPUs this
    task may use); returns how many runs it stored."""
    from .suite import run_experiment

    with thread_limit(threads or available_cores()):
        results, _ = run_experiment(config, out, progress=False, plots=True, keep_going=keep_going, shard=shard,
                                    claim_ttl=claim_ttl)
    return {"shard": list(shard), "runs": len(results)}


def submit_grid(config: ExperimentConfig, out: str | Path, *, jobs: int, cluster: str = "auto",
                params: dict[str, Any] | None = None, threads: int | None = None,
                claim_ttl: float = DEFAULT_TTL_S, keep_going: bool = False) -> list:
    """Submit ``config`` as a job array of ``jobs`` shard workers; returns the submitit jobs.

    Args:
        config: the experiment (planned and checked by the caller before submission).
        out: the results folder, shared by every task (submitit's logs go to ``out/submitit``).
        jobs: number of array tasks (shards).
        cluster: ``auto`` (SLURM when available, else local), ``slurm``, ``local`` or ``debug``.
        params: submitit parameters, e.g. ``timeout_min``, ``cpus_per_task``, ``gpus_per_node``,
            ``slurm_partition``, ``slurm_array_parallelism``.
        threads: threads per task; None: the task's CPUs (``cores // jobs`` for the local cluster).
        claim_ttl: seconds after which a silent task's claim on a run expires.
        keep_going: a failing run does not end its task.

    Raises:
        ConfigError: submitit is not installed, or ``cluster`` / ``params`` are not valid for it.
    """
    jobs, claim_ttl, threads = check_jobs(jobs), check_ttl(claim_ttl), check_threads(threads)
    if cluster not in CLUSTERS:
        raise ConfigError(f"--cluster must be one of {list(CLUSTERS)}, got {cluster!r}")
    try:
        import submitit
    except ImportError:
        raise ConfigError("--backend submitit needs submitit: pip install 'avalanche-merge[cluster]'") from None
    folder = Path(out) / "submitit"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "auto" else cluster)
        executor.update_parameters(name="avalanche-merge", **(params or {}))
    except (NameError, ValueError, TypeError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"submitit ({cluster}): {exc}") from None
    if threads is None and executor.cluster in ("local", "debug"):
        threads = default_threads(jobs)  # the tasks share this machine
    shards = [(k, jobs) for k in range(1, jobs + 1)]
    n = len(shards)
    return executor.map_array(run_shard, [config] * n, [str(out)] * n, shards, [threads] * n, [claim_ttl] * n,
                              [keep_going] * n)
