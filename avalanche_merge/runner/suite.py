"""Run every (benchmark, method, seed) of an experiment, skipping completed runs, then summarise and plot.

Reliability: each run's result is written atomically to ``<out>/runs/<run_id>/result.json`` only when it has
finished, so an interrupted experiment (Ctrl-C, crash) keeps every completed run and a re-run resumes with the
first missing one. A run is identified by the hash of its full resolved config and seed. A worker computes a run
only while it holds the run's claim (:mod:`.claims`), so any number of workers (``jobs`` processes, ``shard``
workers, cluster tasks) can share one results folder without computing a run twice.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from .claims import DEFAULT_TTL_S, Claim, check_ttl, try_claim
from .plan import ExperimentConfig, RunPlan, plan_experiment
from .preflight import preflight
from .run import execute_run, write_json_atomic
from .store import CorruptResult, folder_lock, read_result, remove_temp_files, run_dir, run_lock, stored_results
from .summary import format_table, split_labels, summarize, write_summary


def result_path(out_dir: Path, plan: RunPlan) -> Path:
    return run_dir(out_dir, plan.run_id) / "result.json"


def load_result(out_dir: Path, plan: RunPlan, *, quiet: bool = False) -> dict | None:
    """The stored result of ``plan`` if it completed with the same config hash, else None (a corrupt file is
    named on the console and the run is computed again)."""
    path = result_path(out_dir, plan)
    if not path.is_file():
        return None
    try:
        result = read_result(path, require=("config_hash", "metrics"))  # what the runner itself writes
    except (CorruptResult, OSError) as exc:
        if not quiet:
            tqdm.write(f"  {plan.run_id}: stored result is unusable ({exc}); running it again")
        return None
    if result["status"] != "complete" or result.get("config_hash") != plan.config_hash:
        return None
    return result


def _compute(plan: RunPlan, out: Path, progress: bool) -> dict:
    """Execute ``plan`` (its lock held) and store its result; an ``error.json`` is written on failure."""
    folder = run_dir(out, plan.run_id)
    if remove_temp_files(folder):
        tqdm.write(f"  {plan.run_id}: removed temporary files of an interrupted write")
    t0 = time.perf_counter()
    try:
        result = execute_run(plan, folder)
    except Exception as exc:
        write_json_atomic(folder / "error.json",
                          {"run_id": plan.run_id, "error": repr(exc), "traceback": traceback.format_exc()})
        raise
    write_json_atomic(result_path(out, plan), result)
    (folder / "error.json").unlink(missing_ok=True)  # a failure it replaces
    if progress:
        tqdm.write(f"  {plan.run_id}: final acc {100 * result['metrics']['final_acc']:.1f}% "
                   f"({time.perf_counter() - t0:.1f} s)")
    return result


@contextmanager
def claim_run(out: Path, plan: RunPlan, *, ttl: float = DEFAULT_TTL_S) -> Iterator[Claim | None]:
    """Hold ``plan``'s run for this process: its ``flock`` and its claim file (see :mod:`.claims`), with a
    heartbeat while the block runs; yields None when another worker holds it."""
    with run_lock(out, plan.run_id, blocking=False) as locked:
        claim = try_claim(run_dir(out, plan.run_id), ttl=ttl) if locked else None
        if claim is None:
            yield None
            return
        try:
            with claim.heartbeat():
                yield claim
        finally:
            claim.release()


def attempt_run(plan: RunPlan, out: Path, *, progress: bool = True, wait: bool = False,
                claim_ttl: float = DEFAULT_TTL_S) -> dict | None:
    """The result of ``plan``: stored, or computed now under a claim. While another worker holds the run, None
    (``wait=False``), or poll until its result is stored or its claim is released or expires (``wait=True``).
    A failing run raises (its ``error.json`` written)."""
    poll = 0.2  # doubling up to max_poll: short waits are seen at once, long ones cost few file reads
    max_poll = min(5.0, max(0.2, claim_ttl / 30))
    while True:
        stored = load_result(out, plan)
        if stored is not None:
            return stored
        with claim_run(out, plan, ttl=claim_ttl) as claim:
            if claim is not None:
                stored = load_result(out, plan, quiet=True)  # finished by another worker meanwhile
                return stored if stored is not None else _compute(plan, out, progress)
        if not wait:
            return None
        time.sleep(poll)
        poll = min(2 * poll, max_poll)


def run_experiment(config: ExperimentConfig, out_dir: str | Path = "results", *, progress: bool = True,
                   plots: bool = True, keep_going: bool = False, jobs: int = 1, shard: tuple[int, int] | None = None,
                   threads: int | None = None, claim_ttl: float = DEFAULT_TTL_S) -> tuple[list[dict], list[dict]]:
    """Run (or resume) ``config`` under ``out_dir``; write the summary and plots.

    Any number of workers may share one ``out_dir`` (processes of ``jobs``, ``shard`` workers, runners on other
    machines of a shared file system): each run is claimed by one of them (:mod:`.claims`); runs another worker
    holds are left to it and read back once it has finished.

    Args:
        config: the experiment.
        out_dir: results folder (``runs/``, ``summary.csv``, ``summary.md``, ``plots/``). The summary and plots
            cover every complete run stored in the folder (as ``avalanche-merge report`` does), so experiments
            that share a folder never overwrite each other's rows.
        progress: show a progress bar over runs.
        plots: write plots: ``True`` (PNG), ``False``, or a sequence of formats (``png``, ``pdf``, ``svg``).
        keep_going: on a failing run, record the error and continue instead of stopping.
        jobs: worker processes on this machine, one run each at a time (>= 1; 1: runs in this process).
        shard: ``(k, n)``: compute only the k-th of n deterministic parts of the plan (1 <= k <= n); the folder
            summary is then written only by the worker that finds every planned run stored (else run
            ``avalanche-merge summarize``).
        threads: torch (and BLAS) threads per worker; None: ``max(1, cores // jobs)`` with several jobs, torch's
            default with one.
        claim_ttl: seconds without heartbeat after which another worker's claim on a run expires.

    Returns:
        ``(results, summary_rows)`` for this worker's runs (this shard's) that completed.
    """
    from .parallel import check_jobs, check_shard, run_pool, select_shard, thread_limit

    out = Path(out_dir)
    jobs, claim_ttl = check_jobs(jobs), check_ttl(claim_ttl)
    all_plans = plan_experiment(config)  # validates everything before any training
    plans = select_shard(all_plans, check_shard(shard)) if shard is not None else all_plans
    preflight(all_plans)  # shapes, paths, LoRA targets, analysis layers
    done: dict[str, dict] = {}
    failures: list[tuple[str, str]] = []
    try:
        if jobs > 1:
            run_pool(config, plans, out, jobs=jobs, threads=threads, progress=progress, keep_going=keep_going,
                     claim_ttl=claim_ttl, done=done, failures=failures)
        else:
            with thread_limit(threads):
                _run_here(plans, out, progress=progress, keep_going=keep_going, claim_ttl=claim_ttl,
                          desc=config.name, done=done, failures=failures)
    finally:
        results = [done[p.run_id] for p in plans if p.run_id in done]
        rows = summarize(results) if results else []
        if shard is None and results:
            write_folder_summary(out, plots)
        elif shard is not None:
            missing = sum(load_result(out, p, quiet=True) is None for p in all_plans)
            if missing == 0:
                write_folder_summary(out, plots)  # the last worker to finish
            elif progress:
                tqdm.write(f"{missing} of {len(all_plans)} planned runs are not stored yet (other shards); the "
                           f"folder summary is written by the last worker, or by: avalanche-merge summarize {out}")
    if failures:
        tqdm.write(f"{len(failures)} run(s) failed: " + "; ".join(f"{rid}: {err}" for rid, err in failures))
    return results, rows


def _run_here(plans: list[RunPlan], out: Path, *, progress: bool, keep_going: bool, claim_ttl: float, desc: str,
              done: dict[str, dict], failures: list[tuple[str, str]]) -> None:
    """Run ``plans`` in this process: each free run now, then wait for those other workers hold."""
    busy: list[RunPlan] = []

    def attempt(plan: RunPlan, *, wait: bool) -> None:
        try:
            result = attempt_run(plan, out, progress=progress, wait=wait, claim_ttl=claim_ttl)
        except Exception as exc:  # noqa: BLE001 - recorded in error.json, re-raised unless keep_going
            failures.append((plan.run_id, repr(exc)))
            if not keep_going:
                raise
            return
        if result is not None:
            done[plan.run_id] = result
        else:
            busy.append(plan)
            tqdm.write(f"  {plan.run_id}: another worker is computing it; its result is read when it ends")

    bar = tqdm(plans, desc=desc, unit="run", disable=not progress)
    for plan in bar:
        bar.set_postfix_str(f"{plan.benchmark}/{plan.label}/seed{plan.seed}")
        attempt(plan, wait=False)
    for plan in list(busy):
        tqdm.write(f"  waiting for another worker to finish {plan.run_id}")
        attempt(plan, wait=True)


def write_folder_summary(out: Path, plots=True) -> int:
    """Summary and plots of every complete run stored in ``out``, rebuilt under the folder's lock from the stored
    runs only (idempotent: ``avalanche-merge summarize``); returns how many runs it covers. ``plots``: ``True``
    (PNG), ``False``, or a sequence of formats."""
    with folder_lock(out / ".summary.lock"):
        remove_temp_files(out)
        everything = stored_results(out, warn=lambda msg: tqdm.write(f"  {msg}"))
        if not everything:
            return 0
        write_summary(summarize(everything), out)
        if plots:
            from ..analysis.plots import plot_runs

            if (out / "plots").is_dir():
                remove_temp_files(out / "plots")
            plot_runs(split_labels(everything), out / "plots", formats=None if plots is True else plots)
        return len(everything)


def print_table(rows: list[dict]) -> None:
    """Print the summary table (mean ± std over seeds)."""
    print(format_table(rows))
