"""Grids on several processes and machines: worker processes (``--jobs``), shards of the plan (``--shard``) and
thread limits per worker.

Workers never coordinate through a scheduler of their own: each run is claimed through a claim file in the
results folder (:mod:`.claims`), so any mix of ``--jobs`` pools, ``--shard`` workers and cluster jobs
(:mod:`.cluster`, through submitit) can share one folder, on one machine or on a shared file system.

- ``jobs``: a :class:`concurrent.futures.ProcessPoolExecutor` of ``spawn``-ed workers, one run per task; each
  worker limits torch's and the BLAS libraries' threads to ``threads`` (default ``max(1, cores // jobs)``) so
  that the workers together do not oversubscribe the cores. A worker keeps its imports and in-memory data
  between runs.
- ``shard k/n``: the runs at positions ``k-1, k-1+n, k-1+2n, ...`` of the plan (its order is deterministic: the
  config's benchmarks x methods x seeds), so the n shards partition the plan, each run in exactly one shard, with
  sizes that differ by at most one.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import signal
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from ..config import ConfigError
from ..notices import quiet_avalanche_notices
from .plan import ExperimentConfig, RunPlan, plan_experiment

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def check_jobs(jobs: int) -> int:
    """``jobs`` if it is an integer >= 1, else :class:`ConfigError`."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)``, with 1 <= K <= N; :class:`ConfigError` otherwise."""
    m = _SHARD.match(text) if isinstance(text, str) else None
    if m is None:
        raise ConfigError(f"--shard must be K/N with integers 1 <= K <= N (e.g. 2/4), got {text!r}")
    return check_shard((int(m.group(1)), int(m.group(2))))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """``shard`` if it is ``(k, n)`` with integers 1 <= k <= n, else :class:`ConfigError`."""
    try:
        k, n = shard
    except (TypeError, ValueError):
        raise ConfigError(f"shard must be a pair (k, n), got {shard!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (k, n)) or n < 1:
        raise ConfigError(f"shard must be integers k/n with n >= 1, got {shard!r}")
    if not 1 <= k <= n:
        raise ConfigError(f"shard {k}/{n}: k must be in 1..{n}")
    return k, n


def select_shard(plans: list[RunPlan], shard: tuple[int, int]) -> list[RunPlan]:
    """The runs of shard ``k`` of ``n``: every n-th run of the plan, starting at the k-th."""
    k, n = check_shard(shard)
    return plans[k - 1::n]


def default_threads(jobs: int) -> int:
    """Threads per worker so that ``jobs`` workers share the cores: ``max(1, cores // jobs)``."""
    return max(1, available_cores() // jobs)


def check_threads(threads: int | None) -> int | None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1, got {threads!r}")
    return threads


@contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """Limit torch's intra-op threads and the BLAS / OpenMP pools (threadpoolctl) to ``threads`` while the
    block runs; None: no change."""
    if check_threads(threads) is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def _init_worker(threads: int) -> None:
    """Start of a pool worker: Ctrl-C is the parent's to handle; thread pools limited for the worker's life."""
    import torch
    from threadpoolctl import threadpool_limits

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
    quiet_avalanche_notices()  # the parent's (cli.main) does not reach spawned workers


_PLANS: dict[str, dict[str, RunPlan]] = {}  # a worker's plans, by config


def _worker_plan(config: ExperimentConfig, run_id: str) -> RunPlan:
    """``run_id``'s plan, planned in the worker from the config (plans hold options classes that registries make
    at run time, which cannot be pickled; the config can)."""
    key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    if key not in _PLANS:
        _PLANS[key] = {p.run_id: p for p in plan_experiment(config)}
    return _PLANS[key][run_id]


def task_args(config: ExperimentConfig, plan: RunPlan, out: Path, wait_for_others: bool, claim_ttl: float) -> tuple:
    """What is sent to a worker for ``plan``: picklable (the config and the run id, not the plan)."""
    return config, plan.run_id, str(out), wait_for_others, claim_ttl


def _work(config: ExperimentConfig, run_id: str, out: str, wait_for_others: bool, claim_ttl: float) -> bool:
    """A pool task: True when the run is stored (computed here or by another worker), False while another
    worker holds it; the parent reads the stored result."""
    from .suite import attempt_run

    plan = _worker_plan(config, run_id)
    return attempt_run(plan, Path(out), progress=False, wait=wait_for_others, claim_ttl=claim_ttl) is not None


def _stop_workers(executor: ProcessPoolExecutor) -> None:
    """Cancel queued runs and end the pool's worker processes (their claims then read as stale at once)."""
    executor.shutdown(wait=False, cancel_futures=True)
    terminate = getattr(executor, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for proc in list((getattr(executor, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def run_pool(config: ExperimentConfig, plans: list[RunPlan], out: Path, *, jobs: int, threads: int | None,
             progress: bool, keep_going: bool, claim_ttl: float, done: dict[str, dict],
             failures: list[tuple[str, str]]) -> None:
    """Run ``plans`` (of ``config``) on ``jobs`` worker processes; fills ``done`` (run id -> result) and
    ``failures``.

    Stored runs are read here without starting a worker. Runs another worker holds are tried again, waiting for
    them, once the free ones are done. A failing run stops the pool (queued runs are cancelled, running ones
    finish) unless ``keep_going``; an interrupt ends the workers at once.
    """
    from .suite import load_result

    threads = check_threads(threads) or default_threads(jobs)
    todo = []
    for plan in plans:
        stored = load_result(out, plan)
        if stored is not None:
            done[plan.run_id] = stored
        else:
            todo.append(plan)
    if not todo:
        return
    bar = tqdm(total=len(plans), initial=len(done), desc=config.name, unit="run", disable=not progress)
    executor = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads,))
    if progress:
        tqdm.write(f"{min(jobs, len(todo))} worker processes, {threads} thread(s) each, {len(todo)} runs to compute")
    try:
        for wait_for_others in (False, True):
            futures = {executor.submit(_work, *task_args(config, plan, out, wait_for_others, claim_ttl)): plan
                       for plan in todo}
            todo = []
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    plan = futures[future]
                    try:
                        stored = future.result()
                    except BrokenProcessPool:
                        raise RuntimeError("a worker process died (killed, or out of memory); the runs it held are "
                                           "released, run the same command again to resume") from None
                    except Exception as exc:  # noqa: BLE001 - recorded in error.json by the worker
                        failures.append((plan.run_id, repr(exc)))
                        tqdm.write(f"  {plan.run_id}: failed ({exc!r}); see its error.json")
                        if not keep_going:
                            executor.shutdown(wait=True, cancel_futures=True)
                            raise
                        continue
                    result = load_result(out, plan) if stored else None
                    if result is None:
                        todo.append(plan)
                        tqdm.write(f"  {plan.run_id}: another worker is computing it; its result is read when it "
                                   f"ends")
                        continue
                    done[plan.run_id] = result
                    bar.update(1)
                    if progress:
                        tqdm.write(f"  {plan.run_id}: final acc {100 * result['metrics']['final_acc']:.1f}% "
                                   f"({result['wall_time_s']:.1f} s)")
            if not todo:
                break
        executor.shutdown(wait=True)
    except BaseException:
        _stop_workers(executor)
        raise
    finally:
        bar.close()
