"""Aggregate stored runs into ``summary.csv`` and ``summary.md``: one row per (benchmark, method).

Accuracy metrics are recomputed from each run's stored accuracy matrix (never read from its ``metrics`` field), by
the same function as ``avalanche-merge report``, so the two can never disagree. Metrics that vary over seeds get
``_mean`` and ``_std`` columns (sample standard deviation, 0 for one seed); values that are the same for every
seed (e.g. ``trainable_params``) get one column. Accuracies are fractions in [0, 1] in the CSV and percentages in
the markdown table. Time per run is split into training (``train_time_s``), evaluation of the test stream
(``eval_time_s``, the pretrained row included) and set-up before the first evaluation (``setup_time_s``: data,
model, strategy); ``wall_time_s`` is their sum plus bookkeeping.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..evaluation.matrix import summarize_matrix

VARYING = ("final_acc", "avg_inc_acc", "bwt", "forgetting", "pretrained_acc", "train_time_s", "eval_time_s",
           "setup_time_s", "wall_time_s", "cpu_time_s", "peak_rss_mb", "retrieval_acc", "within_task_acc")
# what varies with the machine and its load, not with the config
TIMINGS = ("train_time_s", "eval_time_s", "setup_time_s", "wall_time_s", "cpu_time_s", "peak_rss_mb")
CONSTANT = ("trainable_params", "n_experiences")
PERCENT = ("final_acc", "avg_inc_acc", "bwt", "forgetting", "pretrained_acc", "retrieval_acc", "within_task_acc")
RETRIEVAL_KEY = "RetrievalAcc_Stream/eval_phase/test_stream"  # after the last experience, over the whole stream
WITHIN_TASK_KEY = "WithinTaskAcc_Stream/eval_phase/test_stream"


def _run_values(result: dict) -> dict:
    m = summarize_matrix(result["accuracy_matrix"])  # the matrix is the one source of truth (as in the report)
    pre = result.get("pretrained_accuracy")
    return {
        "final_acc": m["final_acc"], "avg_inc_acc": m["avg_inc_acc"], "bwt": m["bwt"],
        "forgetting": m["forgetting"], "pretrained_acc": float(np.mean(pre)) if pre else None,
        "train_time_s": result["train_time_s"], "wall_time_s": result["wall_time_s"],
        # per-run overhead (runs stored before they were recorded have none)
        "eval_time_s": result.get("eval_time_s"), "setup_time_s": result.get("setup_time_s"),
        "cpu_time_s": result.get("cpu_time_s"),
        "peak_rss_mb": result["peak_rss_mb"], "trainable_params": result["trainable_params"],
        "n_experiences": len(result["accuracy_matrix"][0]),
        "retrieval_acc": (result.get("avalanche_metrics") or {}).get(RETRIEVAL_KEY),
        # class-incremental only: with every class in every experience it is the ordinary accuracy
        "within_task_acc": ((result.get("avalanche_metrics") or {}).get(WITHIN_TASK_KEY)
                            if result.get("scenario_type") == "class_incremental" else None),
    }


def run_protocol(result: dict) -> str:
    """The head protocol a stored run used. Runs stored before protocols existed trained one shared head, or, for
    methods that own their classifier (``prototype``, ``routed``), that method's own."""
    protocol = result.get("protocol") or (result.get("config") or {}).get("protocol")
    if protocol is None:
        from ..strategies import METHODS

        declared = METHODS.get(result["method"]).protocol if result.get("method") in METHODS else "shared"
        protocol = declared if declared in ("prototype", "routed") else "shared"
    if (result.get("config") or {}).get("prototypes"):
        protocol += "+prototypes"
    return protocol


def config_key(result: dict) -> str:
    """A short hash of a stored run's config without its seed and label: runs of one config share it."""
    config = {k: v for k, v in (result.get("config") or {}).items() if k not in ("seed", "label")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:6]


def split_labels(results: list[dict]) -> list[dict]:
    """``results`` where a (benchmark, label) holds runs of different configs: their labels become
    ``<label>@<config key>``, so that no summary averages different configs as seeds of one (issue 15)."""
    keys: dict[tuple, set] = {}
    for r in results:
        keys.setdefault((r["benchmark"], r["label"]), set()).add(config_key(r))
    return [{**r, "label": f"{r['label']}@{config_key(r)}"} if len(keys[(r["benchmark"], r["label"])]) > 1 else r
            for r in results]


def _stats(values: list) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def summarize(results: list[dict]) -> list[dict]:
    """One row per (benchmark, method label, head protocol), in first-seen order, with mean/std over seeds."""
    groups: OrderedDict[tuple[str, str, str], list[dict]] = OrderedDict()
    for r in split_labels(results):
        groups.setdefault((r["benchmark"], r["label"], run_protocol(r)), []).append(r)
    rows = []
    for (bench, label, protocol), runs in groups.items():
        values = [_run_values(r) for r in runs]
        row = {"benchmark": bench, "method": label, "protocol": protocol, "n_seeds": len(runs),
               "seeds": " ".join(str(r["seed"]) for r in runs)}
        for key in VARYING:
            row[f"{key}_mean"], row[f"{key}_std"] = _stats([v[key] for v in values])
        for key in CONSTANT:
            distinct = {v[key] for v in values}
            if len(distinct) == 1:
                row[key] = distinct.pop()
            else:
                row[f"{key}_mean"], row[f"{key}_std"] = _stats([v[key] for v in values])
        rows.append(row)
    return rows


def _fmt(row: dict, key: str) -> str:
    if key in row:
        return str(row[key])
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if math.isnan(mean):
        return "-"
    if key in PERCENT:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.1f} ± {std:.1f}"


def write_summary(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` under ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    csv_path = out_dir / "summary.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    md_path = out_dir / "summary.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(format_table(rows))
    return csv_path, md_path


def format_table(rows: list[dict]) -> str:
    """Markdown table (mean ± std over seeds; accuracies in %)."""
    keys = ("final_acc", "avg_inc_acc", "bwt", "forgetting", "pretrained_acc", "train_time_s", "eval_time_s",
            "setup_time_s", "peak_rss_mb", "trainable_params")
    if any(not math.isnan(row.get("within_task_acc_mean", math.nan)) for row in rows):
        keys = keys[:4] + ("within_task_acc",) + keys[4:]  # only tables with a class-incremental benchmark
    if any(not math.isnan(row.get("retrieval_acc_mean", math.nan)) for row in rows):
        keys = keys[:4] + ("retrieval_acc",) + keys[4:]  # only tables with a retrieval-routed method
    header = ["benchmark", "method", "protocol", "seeds"] + list(keys)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["benchmark"], row["method"], row.get("protocol", "shared"), str(row["n_seeds"])]
        cells += [_fmt(row, k) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

