"""Markdown tables of stored runs by method and head protocol (for the README's protocol comparison).

Reads every ``runs/*/result.json`` under the given results folders and prints, per benchmark, one row per
(method, protocol): final accuracy, average incremental accuracy, BWT, forgetting and, on class-incremental
benchmarks, within-task accuracy (mean ± sample std over seeds, in %).

With ``--plot PATH`` it also draws, for one benchmark, each method's final accuracy under every protocol it
was run with (bars, mean ± std over seeds) with its within-task accuracy (black ticks): the gap between the two
is the confusion between tasks.

Run::

    python experiments/protocol_table.py experiments/results/lora_protocols [--methods lora,inflora,...] \
        [--plot experiments/results/lora_protocols/plots/protocols_split_mnist.png --benchmark split_mnist]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from avalanche_merge.runner.summary import summarize


def load(folders: list[str]) -> list[dict]:
    results = []
    for folder in folders:
        for path in sorted(Path(folder).glob("runs/*/result.json")):
            result = json.loads(path.read_text())
            if result.get("status") == "complete":
                results.append(result)
    return results


def cell(row: dict, key: str) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None or mean != mean:
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def plot(rows: list[dict], methods: list[str], benchmark: str, path: Path) -> None:
    """Grouped bars: per method, final accuracy under each protocol; within-task accuracy as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["benchmark"] == benchmark and r["method"].split("-")[0] in methods]
    variants = list(dict.fromkeys(r["method"].split("-", 1)[1] if "-" in r["method"] else "paper" for r in rows))
    colors = dict(zip(variants, matplotlib.colormaps["tab10"].colors, strict=False))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 3.6))
    present = {m: sorted((r["method"].partition("-")[2] or "paper" for r in rows if r["method"].split("-")[0] == m),
                         key=variants.index) for m in methods}
    width = 0.8 / max(len(v) for v in present.values())
    for r in rows:
        base, _, variant = r["method"].partition("-")
        variant = variant or "paper"
        mine = present[base]  # this method's bars, centred on its tick
        x = methods.index(base) + (mine.index(variant) - (len(mine) - 1) / 2) * width
        ax.bar(x, 100 * r["final_acc_mean"], width * 0.92, yerr=100 * r["final_acc_std"], capsize=2,
               color=colors[variant], label=f"{variant} ({r['protocol']})" if variant != "paper" else
               "paper's protocol")
        within = r.get("within_task_acc_mean")
        if within is not None and within == within:
            ax.plot([x - width * 0.4, x + width * 0.4], [100 * within] * 2, color="black", lw=1.2,
                    label="within-task accuracy")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("final accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{benchmark}: head protocols (3 seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    for target in (path, path.with_suffix(".pdf")):
        fig.savefig(target, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--methods", default="", help="comma-separated method names, in this order")
    parser.add_argument("--plot", type=Path, help="write the protocol bar chart here (and a PDF beside it)")
    parser.add_argument("--benchmark", default="split_mnist", help="benchmark of the plot")
    args = parser.parse_args()
    rows = summarize(load(args.folders))
    if args.plot:
        plot(rows, [m for m in args.methods.split(",") if m], args.benchmark, args.plot)
    order = [m for m in args.methods.split(",") if m]
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        chosen = [r for r in rows if r["benchmark"] == bench]
        if order:
            chosen = [r for r in chosen if r["method"].split("-")[0] in order]
            chosen.sort(key=lambda r: (order.index(r["method"].split("-")[0]), r["method"]))
        within = any(r.get("within_task_acc_mean") == r.get("within_task_acc_mean") and
                     r.get("within_task_acc_mean") is not None for r in chosen)
        keys = ["final_acc", "avg_inc_acc", "bwt", "forgetting"] + (["within_task_acc"] if within else [])
        print(f"\n`{bench}`\n")
        print("| method | protocol | seeds | " + " | ".join(keys) + " |")
        print("|---|---|---|" + "---|" * len(keys))
        for r in chosen:
            cells = " | ".join(cell(r, k) for k in keys)
            print(f"| {r['method']} | {r['protocol']} | {r['n_seeds']} | {cells} |")


if __name__ == "__main__":
    main()
