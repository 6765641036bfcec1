"""The held-out retention vs learning half of ``sparse_memory_regime.py`` (Lin et al.'s protocol on the TinyViT).

Learning: the mean over experiences of ``R[i][i]``, the accuracy on experience ``i`` right after training it.
Retention: the mean accuracy on the held-out probe tasks (never trained on) after the last experience, and its
drop relative to the pretrained model (Lin et al. report the relative drop of held-out NaturalQuestions F1).
"""

from __future__ import annotations

import json
from pathlib import Path

from avalanche_merge.runner.plan import load_experiment
from avalanche_merge.runner.suite import run_experiment

SEED = 0
LRS = {  # train.lr for naive/lora, the method's own lr option for sparse_memory
    "naive": [1e-4, 3e-4, 1e-3],
    "lora": [3e-4, 1e-3, 3e-3],
    "sparse_memory": [3e-3, 1e-2, 3e-2],
    "sparse_memory_paper": [3e-3, 1e-2, 3e-2],
}
COLORS = {"naive": "tab:gray", "lora": "tab:blue", "sparse_memory": "tab:orange", "sparse_memory_paper": "tab:green"}


def _experiment(lr: float, methods: list, bench: dict, held_out: list[str]) -> dict:
    return {"name": "sparse_memory_regime", "benchmarks": [{"name": "domain_mnist", "options": bench}],
            "methods": methods, "seeds": [SEED], "loggers": [],
            "train": {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": lr},
            "model": {"name": "tiny_vit", "options": {"head": "auto"}},
            "analysis": {"geometry": False, "drift": False, "held_out_domains": held_out, "held_out_samples": 200}}


def _summarise(result: dict, method: str, lr: float) -> dict:
    R = result["accuracy_matrix"]
    cont = result["analysis"]["continual"]
    held_pre = cont["held_out_pretrained"]
    held_final = cont["held_out_accuracy"][-1]
    ret_pre = sum(held_pre) / len(held_pre)
    ret = sum(held_final) / len(held_final)
    return {"method": method, "lr": lr, "learning": sum(R[i][i] for i in range(len(R))) / len(R),
            "final_acc": sum(R[-1]) / len(R[-1]), "retention_pretrained": ret_pre, "retention": ret,
            "retention_drop_rel": (ret_pre - ret) / ret_pre, "held_out_final": held_final,
            "run_id": result["run_id"]}


def run_protocol(out: Path, overlap_rows: list[dict]) -> None:
    from sparse_memory_regime import BENCH, HELD_OUT, PAPER_REGIME

    runs_dir = out / "runs"
    rows = []
    for i in range(3):
        methods = [{"name": "naive", "label": "naive"}, {"name": "lora", "label": "lora"}]
        for m in ("naive", "lora"):
            exp = load_experiment(_experiment(LRS[m][i], [e for e in methods if e["label"] == m], BENCH, HELD_OUT))
            for r in run_experiment(exp, runs_dir, progress=False, plots=False)[0]:
                rows.append(_summarise(r, m, LRS[m][i]))
        for m, opts in (("sparse_memory", {}), ("sparse_memory_paper", dict(PAPER_REGIME))):
            lr = LRS[m][i]
            entry = {"name": "sparse_memory", "label": m, "options": {**opts, "lr": lr}}
            exp = load_experiment(_experiment(1e-3, [entry], BENCH, HELD_OUT))
            for r in run_experiment(exp, runs_dir, progress=False, plots=False)[0]:
                rows.append(_summarise(r, m, lr))
        print(json.dumps(rows[-4:]), flush=True)
    (out / "protocol.json").write_text(json.dumps(rows, indent=1))
    write_table(out, overlap_rows, rows)
    plot(out, rows)


def write_table(out: Path, overlap_rows: list[dict], rows: list[dict]) -> None:
    lines = ["# Sparse memory fine-tuning: regime and held-out retention (domain_mnist, bench TinyViT, seed 0)", "",
             "## (a) Overlap of the slots updated for experience 1 with the background documents", "",
             "| config | background | slots | heads x top_k | top_t | docs | updated | read by >= half | read by all |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in overlap_rows:
        lines.append(f"| {r['config']} | {r['background']} | {r['n_slots']} | {r['heads']} x {r['top_k']} | "
                     f"{r['top_t']} | {r['background_docs']} | {r['updated']} | {100 * r['read_by_half']:.1f}% | "
                     f"{100 * r['read_by_all']:.1f}% |")
    lines += ["", "## (b) Held-out retention vs learning", "",
              "learning = mean_i R[i][i]; retention = mean held-out accuracy after the last experience "
              "(pretrained value in the column before); drop = relative.", "",
              "| method | lr | learning | final acc | held-out pretrained | held-out final | drop |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["lr"])):
        lines.append(f"| {r['method']} | {r['lr']:g} | {100 * r['learning']:.1f} | {100 * r['final_acc']:.1f} | "
                     f"{100 * r['retention_pretrained']:.1f} | {100 * r['retention']:.1f} | "
                     f"{100 * r['retention_drop_rel']:.1f}% |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for m, color in COLORS.items():
        pts = sorted((r["learning"], r["retention"], r["lr"]) for r in rows if r["method"] == m)
        if not pts:
            continue
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=color, label=m)
        for x, y, lr in pts:
            ax.annotate(f"{lr:g}", (100 * x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    pre = rows[0]["retention_pretrained"]
    ax.axhline(100 * pre, color="black", ls="--", lw=1, label="pretrained")
    ax.set_xlabel("learning: mean accuracy on each new experience after training it (%)")
    ax.set_ylabel("held-out accuracy after the stream (%)")
    ax.set_title("domain_mnist (3 exps), TinyViT, seed 0; labels: lr")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "retention_vs_learning.png", dpi=130)
    plt.close(fig)
