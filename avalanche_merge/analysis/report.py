"""``avalanche-merge report RESULTS_DIR``: tables, correlations and plots of the stored runs of an experiment.

Reads ``RESULTS_DIR/runs/<run_id>/result.json``, aggregates one row per (benchmark, method label) with the mean
and sample standard deviation over seeds of the continual-learning metrics (recomputed from the stored accuracy
matrix with :mod:`avalanche_merge.evaluation.matrix`) and, for runs with an ``analysis`` record, of held-out
retention, task-vector geometry and representation drift; correlates geometry with forgetting across methods;
and writes ``report.md``, ``report.csv`` and PNG plots under ``RESULTS_DIR/report`` (or ``out_dir``).
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections import Counter, OrderedDict
from functools import partial
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..evaluation.matrix import forward_transfer, summarize_matrix

STREAM_FORGETTING = "StreamForgetting/eval_phase/test_stream"

# key -> (column header, scale for display, decimals, legend text)
COLUMNS: dict[str, tuple[str, float, int, str]] = {
    "final_acc": ("final acc", 100, 1, "mean accuracy over all experiences after the last one, `mean_j R[T-1][j]` (%)"),
    "avg_inc_acc": ("avg inc acc", 100, 1, "average incremental accuracy (iCaRL): mean over steps of the accuracy "
                                           "on the experiences seen so far (%)"),
    "bwt": ("BWT", 100, 1, "backward transfer (GEM): `mean_{j<T-1} R[T-1][j] - R[j][j]` (%)"),
    "forgetting": ("forgetting", 100, 1, "Chaudhry et al. 2018 forgetting, max-based: best accuracy on `j` after "
                                         "learning it minus final accuracy, mean over `j < T-1` (%)"),
    "stream_forgetting": ("StreamForgetting", 100, 1, "Avalanche's `StreamForgetting` metric, initial-minus-last: "
                                                      "`R[j][j] - R[T-1][j]` averaged, i.e. GEM's -BWT; `-` for "
                                                      "methods trained once (%)"),
    "fwt": ("FWT", 100, 1, "forward transfer vs the pretrained row: `mean_{j>=1} R[j-1][j] - pretrained[j]`; "
                           "`-` when the matrix is not square or there is no pretrained row (%)"),
    "accumulation": ("accumulation", 100, 1, "knowledge accumulation (Roth et al. 2024): mean accuracy on the "
                                             "adaptation tasks after the last step (%)"),
    "retention": ("retention", 100, 1, "mean accuracy on the held-out tasks (never trained on) after the last "
                                       "step (%)"),
    "geometric_mean": ("geo mean", 100, 1, "geometric mean of accumulation and retention (%)"),
    "retention_change": ("retention change", 100, 1, "retention minus the pretrained model's (%)"),
    "mean_step_cosine": ("step cosine", 1, 3, "mean off-diagonal cosine similarity of the experiences' step "
                                              "task vectors"),
    "sign_conflict_rate": ("sign conflict", 100, 1, "TIES sign-conflict rate among the step task vectors, after "
                                                    "trimming to the top-density entries (%)"),
    "mean_angle": ("principal angle (deg)", 1, 1, "mean principal angle between the update subspaces of different "
                                            "experiences, over weight matrices (degrees)"),
    "mean_effective_rank": ("eff. rank", 1, 1, "mean effective rank of the per-matrix step updates"),
    "cka_pretrained": ("CKA vs pretrained", 1, 3, "linear CKA between pretrained and final features, last probed "
                                                  "layer, mean over probes (1 = no drift)"),
    "cka_learned": ("CKA learned", 1, 3, "linear CKA between the features right after each earlier experience was "
                                         "learned and the final ones, last probed layer, mean over earlier probes"),
    "cumulative_norm": ("cum. norm", 1, 3, "L2 norm of the cumulative task vector `theta_T - theta_0`"),
}
METRIC_KEYS = ("final_acc", "avg_inc_acc", "bwt", "forgetting", "stream_forgetting", "fwt")
ANALYSIS_KEYS = ("accumulation", "retention", "geometric_mean", "retention_change", "mean_step_cosine",
                 "sign_conflict_rate", "mean_angle", "mean_effective_rank", "cka_pretrained", "cka_learned",
                 "cumulative_norm")
EXTRA_KEYS = ("pretrained_accumulation", "pretrained_retention")  # for the pretrained point of the scatter
FINDINGS: tuple[tuple[str, str], ...] = (
    ("mean_step_cosine", "forgetting"), ("sign_conflict_rate", "forgetting"), ("mean_angle", "forgetting"),
    ("cumulative_norm", "forgetting"), ("cka_pretrained", "forgetting"), ("cka_pretrained", "retention"),
    ("cumulative_norm", "retention_change"))
VS_FORGETTING = ("mean_step_cosine", "sign_conflict_rate", "mean_angle", "cumulative_norm", "cka_pretrained")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def load_results(results_dir: str | Path) -> list[dict]:
    """The complete runs of ``results_dir/runs/*/result.json``, sorted by benchmark, label and seed. Files that
    fail to parse or check, or whose ``status`` is not ``complete``, are skipped with a warning line on stderr
    (the same reader as the runner's resume and summary). Raises ``FileNotFoundError`` when the folder has no
    ``runs/*/result.json``."""
    from ..runner.store import stored_results
    from ..runner.summary import split_labels

    if not any((Path(results_dir) / "runs").glob("*/result.json")):
        raise FileNotFoundError(f"no runs/<run_id>/result.json under {results_dir} (is it an experiment's results "
                                "folder?)")
    results = split_labels(stored_results(Path(results_dir), warn=_warn))  # different configs: not seeds of one
    results.sort(key=lambda r: (str(r.get("benchmark")), str(r.get("label")), r.get("seed", 0)))
    return results


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _nanmean(values) -> float:
    vals = [_num(v) for v in values]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _last_layer_mean(cka) -> float:
    """Mean over the defined probes of the last layer at the last step of a ``T x L x P`` record."""
    try:
        return _nanmean(cka[-1][-1])
    except (IndexError, TypeError):
        return math.nan


def run_values(result: dict) -> dict[str, float]:
    """The per-run numbers of a report row (fractions, ``nan`` where a run does not define them): the matrix
    metrics, Avalanche's ``StreamForgetting``, FWT vs the pretrained row and the ``analysis`` summaries."""
    R = result["accuracy_matrix"]
    out = {k: _num(v) for k, v in summarize_matrix(R).items()}
    single = len(R) == 1  # trained once: Avalanche's 0 forgetting is not a measurement
    out["stream_forgetting"] = math.nan if single else _num((result.get("avalanche_metrics") or {}).get(
        STREAM_FORGETTING))
    analysis = result.get("analysis") or {}
    cont, geo, drift = (analysis.get(k) or {} for k in ("continual", "geometry", "drift"))
    pre = result.get("pretrained_accuracy") or cont.get("pretrained_accuracy")
    try:
        out["fwt"] = _num(forward_transfer(R, pre)) if pre else math.nan
    except ValueError:  # not square, or a pretrained row of another length
        out["fwt"] = math.nan
    for key in ("accumulation", "retention", "geometric_mean"):
        out[key] = _num(cont.get(f"final_{key}"))
    for key in ("retention_change", "pretrained_accumulation", "pretrained_retention"):
        out[key] = _num(cont.get(key))
    for key in ("mean_step_cosine", "mean_angle", "mean_effective_rank"):
        out[key] = _num(geo.get(key))
    out["sign_conflict_rate"] = _num(geo.get("sign_conflict_rate", geo.get("mean_sign_conflict")))
    out["cumulative_norm"] = _num((geo.get("cumulative_total_norm") or [None])[-1])
    out["cka_pretrained"] = _last_layer_mean(drift.get("cka_pretrained"))
    out["cka_learned"] = _last_layer_mean(drift.get("cka_learned"))
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def _groups(results: list[dict]) -> OrderedDict[tuple[str, str], list[dict]]:
    groups: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
    for r in results:
        groups.setdefault((r["benchmark"], r["label"]), []).append(r)
    return groups


def report_rows(results: list[dict]) -> list[dict]:
    """One row per (benchmark, method label), in input order: ``benchmark``, ``method``, ``n_seeds``, ``seeds``,
    ``n_analysis`` (runs with an analysis record) and ``<key>_mean`` / ``<key>_std`` (sample std over seeds, 0 for
    one seed, ``nan`` when no seed defines it) for every key of :data:`COLUMNS` and :data:`EXTRA_KEYS`."""
    rows = []
    for (bench, label), runs in _groups(results).items():
        values = [run_values(r) for r in runs]
        row: dict = {"benchmark": bench, "method": label, "n_seeds": len(runs),
                     "seeds": " ".join(str(r.get("seed")) for r in runs),
                     "n_analysis": sum(bool(r.get("analysis")) for r in runs)}
        for key in (*METRIC_KEYS, *ANALYSIS_KEYS, *EXTRA_KEYS):
            row[f"{key}_mean"], row[f"{key}_std"] = _stats([v[key] for v in values])
        rows.append(row)
    return rows


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def correlations(rows: list[dict], x_key: str, y_key: str) -> dict:
    """Pearson r and Spearman rho (Pearson of average ranks) of ``<x_key>_mean`` against ``<y_key>_mean`` over the
    given rows (pass one benchmark's rows: the methods), skipping rows where either is undefined. Returns
    ``{"x", "y", "pearson", "spearman", "n"}``; the coefficients are ``nan`` for ``n < 3`` or a constant variable."""
    pts = [(_num(r.get(f"{x_key}_mean")), _num(r.get(f"{y_key}_mean"))) for r in rows]
    pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    spearman = _pearson(_ranks(x), _ranks(y)) if len(pts) >= 3 else math.nan
    return {"x": x_key, "y": y_key, "pearson": _pearson(x, y), "spearman": spearman, "n": len(pts)}


def _cell(row: dict, key: str) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if math.isnan(mean):
        return "-"
    _, scale, d, _ = COLUMNS[key]
    return f"{scale * mean:.{d}f} ± {scale * std:.{d}f}"


def _table(rows: list[dict], keys: tuple[str, ...] | list[str]) -> list[str]:
    header = ["method", "seeds"] + [COLUMNS[k][0] for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["method"], str(row["n_seeds"])] + [_cell(row, k) for k in keys]) + " |")
    return lines


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"mean of {n} seeds"


def _common(arrays: list) -> list:
    """The per-seed arrays that have the most common shape (ragged ones dropped)."""
    shaped = []
    for a in arrays:
        try:
            shaped.append((np.array(a, dtype=float).shape, a))
        except (TypeError, ValueError):
            continue
    if not shaped:
        return []
    best = Counter(s for s, _ in shaped).most_common(1)[0][0]
    return [a for s, a in shaped if s == best]


def _plot_jobs(results: list[dict], rows: list[dict], plots: Path) -> list[tuple[str, str, Path, partial]]:
    """``(benchmark, caption, path, call)`` for every plot the report draws."""
    from . import analysis_plots as ap
    from .family_plots import plot_family_curves
    from .plots import plot_accuracy_matrix

    jobs: list = []
    curves: set[str] = set()

    def add(bench: str, caption: str, name: str, fn, *args, **kwargs) -> None:
        path = plots / f"{_safe(bench)}_{name}.png"
        jobs.append((bench, caption, path, partial(fn, *args, path, **kwargs)))

    for (bench, label), runs in _groups(results).items():
        tag = f"{bench} / {label}"
        if bench not in curves:  # small multiples: one row per family, the reference baselines on every row
            curves.add(bench)
            add(bench, f"{bench}: accuracy curves by family", "accuracy_curves", plot_family_curves,
                [r for r in results if r["benchmark"] == bench], title=bench)
        mats = _common([r["accuracy_matrix"] for r in runs])
        names = {tuple(r.get("experience_names") or ()) for r in runs}
        exp_names = list(names.pop()) if len(names) == 1 else None  # class orders differ across seeds
        if exp_names is not None and len(exp_names) != np.shape(mats[0])[1]:
            exp_names = None
        add(bench, f"{tag}: accuracy matrix", f"{_safe(label)}_matrix", plot_accuracy_matrix,
            np.mean(np.array(mats, dtype=float), axis=0), title=f"{tag} ({_seeds(len(mats))})",
            experience_names=exp_names)
        geos = [r["analysis"]["geometry"] for r in runs if (r.get("analysis") or {}).get("geometry")]
        cos = _common([g["step_cosine"] for g in geos if g.get("step_cosine")])
        if cos:
            add(bench, f"{tag}: task-vector cosine", f"{_safe(label)}_cosine", ap.plot_cosine_heatmap, cos,
                title=f"{tag}\nstep task-vector cosine ({_seeds(len(cos))})")
        name_sets = Counter(tuple(g.get("names") or ()) for g in geos if g.get("step_norms"))
        if name_sets:
            names_ = name_sets.most_common(1)[0][0]
            norms = _common([g["step_norms"] for g in geos if tuple(g.get("names") or ()) == names_])
            if norms and names_:
                add(bench, f"{tag}: per-layer step norms", f"{_safe(label)}_layer_norms", ap.plot_layer_norms, norms,
                    list(names_), title=f"{tag}: step update norm ({_seeds(len(norms))})")
        drifts = [r["analysis"]["drift"] for r in runs if (r.get("analysis") or {}).get("drift")]
        layer_sets = Counter(tuple(d.get("layers") or ()) for d in drifts)
        if layer_sets and layer_sets.most_common(1)[0][0]:
            layers = layer_sets.most_common(1)[0][0]
            same = [d for d in drifts if tuple(d.get("layers") or ()) == layers]
            pre = _common([d["cka_pretrained"] for d in same if d.get("cka_pretrained")])
            learned = _common([d["cka_learned"] for d in same if d.get("cka_learned")])
            if pre:
                learned_ok = learned and np.shape(np.array(learned, dtype=float)) == np.shape(np.array(pre, float))
                add(bench, f"{tag}: CKA drift", f"{_safe(label)}_cka", ap.plot_cka_curves, pre, list(layers),
                    title=f"{tag}: representation drift ({_seeds(len(pre))})",
                    learned=learned if learned_ok else None)
    for bench in OrderedDict.fromkeys(r["benchmark"] for r in rows):
        brows = [r for r in rows if r["benchmark"] == bench]
        if sum(not math.isnan(r["accumulation_mean"]) and not math.isnan(r["retention_mean"]) for r in brows):
            add(bench, f"{bench}: accumulation vs retention", "accumulation_retention", ap.plot_accumulation_retention,
                brows, title=f"{bench}: knowledge accumulation vs retention (Roth et al. 2024)")
        for key in VS_FORGETTING:
            if correlations(brows, key, "forgetting")["n"] >= 2:
                add(bench, f"{bench}: {COLUMNS[key][0]} vs forgetting", f"{key}_vs_forgetting",
                    ap.plot_geometry_vs_forgetting, brows, key, title=f"{bench}: {COLUMNS[key][0]} vs forgetting",
                    xlabel=f"{COLUMNS[key][0]}" + (" (fraction)" if COLUMNS[key][1] == 100 else ""))
    return jobs


def _fmt_r(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:+.2f}"


def _markdown(results_dir: Path, results: list[dict], rows: list[dict], plotted: list, out: Path) -> str:
    benches = list(OrderedDict.fromkeys(r["benchmark"] for r in rows))
    lines = [f"# Report: `{results_dir}`", "",
             f"{len(results)} complete runs, {len(rows)} (benchmark, method) rows over {len(benches)} benchmark(s): "
             f"{', '.join(benches)}. Values are the mean ± sample standard deviation over seeds; accuracy-based "
             "columns in %. Generated by `avalanche-merge report`.", "", "## Columns", ""]
    for head, _, _, text in COLUMNS.values():
        lines.append(f"- **{head}**: {text}.")
    lines += ["", "Chaudhry forgetting is max-based (never below Avalanche's StreamForgetting, which is "
              "initial-minus-last, GEM's -BWT). Matrix metrics are recomputed from each run's stored accuracy "
              "matrix; `-` marks values a method does not define (e.g. BWT for a method trained once)."]
    for bench in benches:
        brows = [r for r in rows if r["benchmark"] == bench]
        lines += ["", f"## {bench}", "", "### Continual-learning metrics", "", *_table(brows, METRIC_KEYS)]
        keys = [k for k in ANALYSIS_KEYS if any(not math.isnan(r[f"{k}_mean"]) for r in brows)]
        if keys:
            lines += ["", "### Held-out retention, task-vector geometry, representation drift", "",
                      *_table(brows, keys), "", "### Correlations across methods", "",
                      "| x | y | Pearson r | Spearman rho | n methods |", "|---|---|---|---|---|"]
            for x, y in FINDINGS:
                c = correlations(brows, x, y)
                if c["n"]:
                    lines.append(f"| {COLUMNS[x][0]} | {COLUMNS[y][0]} | {_fmt_r(c['pearson'])} | "
                                 f"{_fmt_r(c['spearman'])} | {c['n']} |")
            lines += ["", "Coefficients need at least 3 methods with both values (`-` otherwise)."]
        else:
            lines += ["", "No analysis record in these runs (add an `\"analysis\"` section to the experiment config "
                      "for geometry, drift and retention)."]
        mine = [(cap, p) for b, cap, p in plotted if b == bench]
        if mine:
            lines += ["", "### Plots", ""]
            lines += [f"- ![{cap}]({p.relative_to(out).as_posix()})" for cap, p in mine]
    return "\n".join(lines) + "\n"


def generate_report(results_dir: str | Path, out_dir: str | Path | None = None, *, progress: bool = True,
                    formats=("png",)) -> dict:
    """Load the runs of ``results_dir``, draw the plots (tqdm progress bar when there are many) and write
    ``report.md`` and ``report.csv`` under ``out_dir`` (default ``results_dir/report``). Returns ``{"report",
    "csv", "plots", "runs", "rows"}`` (paths, the written plot paths, the number of runs, the rows). Raises
    ``FileNotFoundError`` when ``results_dir`` has no runs; a plot that fails on its data is skipped with a
    warning. ``formats``: figure formats (``png``, ``pdf``, ``svg``); the report links the first one."""
    from tqdm.auto import tqdm

    from .plots import check_formats, figure_formats

    formats = check_formats(formats)
    results_dir = Path(results_dir)
    results = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    rows = report_rows(results)
    jobs = _plot_jobs(results, rows, out / "plots")
    plotted = []
    with figure_formats(formats):
        for bench, caption, path, call in tqdm(jobs, desc="plots", unit="plot",
                                               disable=not progress or len(jobs) < 10):
            try:
                written = call()
            except ValueError as exc:
                _warn(f"plot {path.name} skipped: {exc}")
                continue
            plotted.append((bench, caption, path.with_suffix(f".{formats[0]}") if written else path))
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "report.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    md_path = out / "report.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(_markdown(results_dir, results, rows, plotted, out))
    return {"report": md_path, "csv": csv_path, "plots": [p for _, _, p in plotted], "runs": len(results),
            "rows": rows}


def write_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.csv`` and ``plots/*.png`` for the runs of ``results_dir`` (see
    :func:`generate_report`) and return the path of ``report.md``."""
    return generate_report(results_dir, out_dir)["report"]


__all__ = ["COLUMNS", "correlations", "generate_report", "load_results", "report_rows", "run_values",
           "write_report"]
