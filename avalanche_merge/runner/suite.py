"""Run every (benchmark, method, seed) of an experiment, skipping completed runs, then summarise and plot.

Reliability: each run's result is written atomically to ``<out>/runs/<run_id>/result.json`` only when it has
finished, so an interrupted experiment (Ctrl-C, crash) keeps every completed run and a re-run resumes with the
first missing one. A run is identified by the hash of its full resolved config and seed.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from tqdm.auto import tqdm

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


def run_experiment(config: ExperimentConfig, out_dir: str | Path = "results", *, progress: bool = True,
                   plots: bool = True, keep_going: bool = False) -> tuple[list[dict], list[dict]]:
    """Run (or resume) ``config`` under ``out_dir``; write the summary and plots.

    Runs another process is computing in the same folder (several runners may share one ``out_dir``, e.g. one
    per machine or GPU) are left to it and read back once it has finished; see :mod:`.store`.

    Args:
        config: the experiment.
        out_dir: results folder (``runs/``, ``summary.csv``, ``summary.md``, ``plots/``). The summary and plots
            cover every complete run stored in the folder (as ``avalanche-merge report`` does), so experiments
            that share a folder never overwrite each other's rows.
        progress: show a progress bar over runs.
        plots: write plots: ``True`` (PNG), ``False``, or a sequence of formats (``png``, ``pdf``, ``svg``).
        keep_going: on a failing run, record the error and continue instead of stopping.

    Returns:
        ``(results, summary_rows)`` for this experiment's runs that completed.
    """
    out = Path(out_dir)
    plans = plan_experiment(config)  # validates everything before any training
    preflight(plans)  # shapes, paths, LoRA targets, analysis layers
    done: dict[str, dict] = {}
    failures: list[tuple[str, str]] = []
    busy: list[RunPlan] = []

    def attempt(plan: RunPlan, *, wait: bool) -> None:
        stored = load_result(out, plan)
        if stored is not None:
            done[plan.run_id] = stored
            return
        with run_lock(out, plan.run_id, blocking=wait) as mine:
            if not mine:
                busy.append(plan)
                tqdm.write(f"  {plan.run_id}: another runner is computing it; its result is read when it ends")
                return
            stored = load_result(out, plan, quiet=True)  # finished by another runner meanwhile
            if stored is not None:
                done[plan.run_id] = stored
                return
            try:
                done[plan.run_id] = _compute(plan, out, progress)
            except Exception as exc:  # noqa: BLE001 - recorded in error.json, re-raised unless keep_going
                failures.append((plan.run_id, repr(exc)))
                if not keep_going:
                    raise

    bar = tqdm(plans, desc=config.name, unit="run", disable=not progress)
    try:
        for plan in bar:
            bar.set_postfix_str(f"{plan.benchmark}/{plan.label}/seed{plan.seed}")
            attempt(plan, wait=False)
        for plan in list(busy):
            tqdm.write(f"  waiting for another runner to finish {plan.run_id}")
            attempt(plan, wait=True)
    finally:
        results = [done[p.run_id] for p in plans if p.run_id in done]
        rows = summarize(results) if results else []
        if results:
            _write_folder_summary(out, plots)
    if failures:
        tqdm.write(f"{len(failures)} run(s) failed: " + "; ".join(f"{rid}: {err}" for rid, err in failures))
    return results, rows


def _write_folder_summary(out: Path, plots) -> None:
    """Summary and plots of every complete run stored in ``out``, rebuilt under the folder's lock."""
    with folder_lock(out / ".summary.lock"):
        remove_temp_files(out)
        everything = stored_results(out, warn=lambda msg: tqdm.write(f"  {msg}"))
        if not everything:
            return
        write_summary(summarize(everything), out)
        if plots:
            from ..analysis.plots import plot_runs

            if (out / "plots").is_dir():
                remove_temp_files(out / "plots")
            plot_runs(split_labels(everything), out / "plots", formats=None if plots is True else plots)


def print_table(rows: list[dict]) -> None:
    """Print the summary table (mean ± std over seeds)."""
    print(format_table(rows))
