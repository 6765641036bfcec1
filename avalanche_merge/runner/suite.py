"""Run every (benchmark, method, seed) of an experiment, skipping completed runs, then summarise and plot.

Reliability: each run's result is written atomically to ``<out>/runs/<run_id>/result.json`` only when it has
finished, so an interrupted experiment (Ctrl-C, crash) keeps every completed run and a re-run resumes with the
first missing one. A run is identified by the hash of its full resolved config and seed.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from tqdm.auto import tqdm

from .plan import ExperimentConfig, RunPlan, plan_experiment
from .preflight import preflight
from .run import execute_run, write_json_atomic
from .summary import format_table, split_labels, summarize, write_summary


def result_path(out_dir: Path, plan: RunPlan) -> Path:
    return out_dir / "runs" / plan.run_id / "result.json"


def load_result(out_dir: Path, plan: RunPlan) -> dict | None:
    """The stored result of ``plan`` if it completed with the same config hash, else None."""
    path = result_path(out_dir, plan)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        tqdm.write(f"  {plan.run_id}: stored result.json is unreadable ({type(exc).__name__}); running it again")
        return None
    required = ("status", "config_hash", "accuracy_matrix", "metrics", "benchmark", "label", "seed")
    if not isinstance(result, dict) or any(k not in result for k in required):
        tqdm.write(f"  {plan.run_id}: stored result.json is incomplete or corrupt; running it again")
        return None
    if result.get("status") != "complete" or result.get("config_hash") != plan.config_hash:
        return None
    return result


def run_experiment(config: ExperimentConfig, out_dir: str | Path = "results", *, progress: bool = True,
                   plots: bool = True, keep_going: bool = False) -> tuple[list[dict], list[dict]]:
    """Run (or resume) ``config`` under ``out_dir``; write the summary and plots.

    Args:
        config: the experiment.
        out_dir: results folder (``runs/``, ``summary.csv``, ``summary.md``, ``plots/``).
        progress: show a progress bar over runs.
        plots: write PNG plots.
        keep_going: on a failing run, record the error and continue instead of stopping.

    Returns:
        ``(results, summary_rows)`` for the runs that completed.
    """
    out = Path(out_dir)
    plans = plan_experiment(config)  # validates everything before any training
    preflight(plans)  # shapes, paths, LoRA targets, analysis layers
    results: list[dict] = []
    failures: list[tuple[str, str]] = []
    bar = tqdm(plans, desc=config.name, unit="run", disable=not progress)
    try:
        for plan in bar:
            bar.set_postfix_str(f"{plan.benchmark}/{plan.label}/seed{plan.seed}")
            done = load_result(out, plan)
            if done is not None:
                results.append(done)
                continue
            t0 = time.perf_counter()
            try:
                result = execute_run(plan, result_path(out, plan).parent)
            except Exception as exc:  # noqa: BLE001 - recorded, then re-raised unless keep_going
                failures.append((plan.run_id, repr(exc)))
                write_json_atomic(out / "runs" / plan.run_id / "error.json",
                                  {"run_id": plan.run_id, "error": repr(exc), "traceback": traceback.format_exc()})
                if not keep_going:
                    raise
                continue
            write_json_atomic(result_path(out, plan), result)
            (result_path(out, plan).parent / "error.json").unlink(missing_ok=True)  # a failure it replaces
            results.append(result)
            if progress:
                tqdm.write(f"  {plan.run_id}: final acc {100 * result['metrics']['final_acc']:.1f}% "
                           f"({time.perf_counter() - t0:.1f} s)")
    finally:
        rows = summarize(results) if results else []
        if rows:
            write_summary(rows, out)
            if plots:
                from ..analysis.plots import plot_runs

                plot_runs(split_labels(results), out / "plots")
    if failures:
        tqdm.write(f"{len(failures)} run(s) failed: " + "; ".join(f"{rid}: {err}" for rid, err in failures))
    return results, rows


def print_table(rows: list[dict]) -> None:
    """Print the summary table (mean ± std over seeds)."""
    print(format_table(rows))
