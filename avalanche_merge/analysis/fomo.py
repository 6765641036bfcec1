"""Table and KA-vs-ZS plot of runs made under the ``fomo`` protocol (FoMo-in-Flux, Roth et al. 2024).

``fomo_table(results)`` summarises, per method label, the mean and standard deviation over seeds of the final
knowledge accumulation ``A_KA``, zero-shot retention ``A_ZS``, their geometric mean, the mean geometric mean over
the update steps, and the budget (steps per task, memory ratio, FLOPs per step). ``plot_ka_zs`` draws each
method's seed-averaged trajectory in the (A_KA, A_ZS) plane from the shared zero-shot point.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .plots import _pyplot


def load_fomo_results(runs_dir: str | Path) -> list[dict]:
    """Every ``result.json`` under ``runs_dir`` that has a ``fomo`` record (sorted by run id)."""
    out = []
    for path in sorted(Path(runs_dir).glob("*/result.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("status") == "complete" and "fomo" in result:
            out.append(result)
    return out


def _by_label(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r["label"]].append(r)
    return dict(groups)


def fomo_table(results: list[dict]) -> list[dict]:
    """One row per method label (in order of first appearance): mean and std over seeds of the final
    ``A_KA``/``A_ZS``/``GM``, the mean ``GM`` over update steps, and the budget figures of the first seed."""
    rows = []
    for label, runs in _by_label(results).items():
        f = [r["fomo"] for r in runs]
        row = {"method": label, "seeds": len(runs)}
        for key in ("final_A_KA", "final_A_ZS", "final_GM", "mean_GM"):
            vals = np.asarray([x[key] for x in f], dtype=float)
            row[key] = float(vals.mean())
            row[key + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        budget = f[0].get("budget") or {}
        cost = budget.get("cost") or {}
        row["steps_per_task"] = budget.get("steps_per_task")
        row["memory_ratio"] = budget.get("memory_ratio")
        row["flops_per_step"] = cost.get("flops")
        row["gradient_free"] = budget.get("gradient_free", False)
        rows.append(row)
    return rows


def fomo_markdown(rows: list[dict]) -> str:
    """The table of :func:`fomo_table` as Markdown (accuracies in %, mean +- std over seeds)."""
    lines = ["| method | steps/task | memory ratio | MFLOPs/step | final A_KA | final A_ZS | final GM | mean GM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = "single pass (gradient-free)" if r["gradient_free"] else r["steps_per_task"]
        mem = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        flops = "-" if r["flops_per_step"] is None else f"{r['flops_per_step'] / 1e6:.1f}"
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k + '_std']:.1f}"
                 for k in ("final_A_KA", "final_A_ZS", "final_GM", "mean_GM")]
        lines.append(f"| {r['method']} | {steps} | {mem} | {flops} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ka_zs(results: list[dict], path: str | Path, *, title: str = "", labels: list[str] | None = None) -> Path:
    """Seed-averaged (A_KA, A_ZS) after every step, one line per method, from the zero-shot point (star).

    Dotted grey curves of constant geometric mean help read the trade-off. Each method keeps the colour it has in
    every other figure (:func:`~avalanche_merge.analysis.family_plots.method_style`); ``labels`` orders the legend
    (labels not in it follow). Saved to ``path`` (PNG or PDF).
    """
    from .family_plots import method_families, method_style

    plt = _pyplot()
    groups = _by_label(results)
    order = [lab for lab in (labels or []) if lab in groups] + [lab for lab in groups if lab not in (labels or [])]
    groups = {lab: groups[lab] for lab in order}
    method_of = {lab: runs[0].get("method", lab) for lab, runs in groups.items()}
    families = method_families(set(method_of.values()))
    styles = {lab: method_style(method_of[lab], families[method_of[lab]], lab) for lab in groups}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    zero = None
    for label, runs in groups.items():
        color, dash, marker = styles[label]
        ka = 100 * np.mean([r["fomo"]["A_KA"] for r in runs], axis=0)
        zs = 100 * np.mean([r["fomo"]["A_ZS"] for r in runs], axis=0)
        zero = (ka[0], zs[0])
        ax.plot(ka, zs, ls=dash, marker=marker, ms=4, color=color, lw=1.4, label=label)
        ax.plot(ka[-1], zs[-1], marker="o", ms=9, mfc="none", color=color)
    if zero is not None:
        ax.plot(*zero, marker="*", ms=16, color="black", ls="none", label="zero-shot (step 0)")
    lo, hi = ax.get_xlim()
    lo2, hi2 = ax.get_ylim()
    xs = np.linspace(max(lo, 1e-3), hi, 200)
    for gm in np.arange(10, 100, 5):
        ax.plot(xs, gm**2 / xs, ls=":", lw=0.6, color="0.75", zorder=0)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo2, hi2)
    ax.set_xlabel("knowledge accumulation A_KA (%)")
    ax.set_ylabel("zero-shot retention A_ZS (%)")
    ax.set_title(title or "A_KA vs A_ZS after every step (circle: after the last task)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


__all__ = ["fomo_markdown", "fomo_table", "load_fomo_results", "plot_ka_zs"]
