"""Per-stage forgetting counts of SparCL's data removal on the ``sparcl_published`` schedule.

For the ``sparcl`` entry of ``experiments/configs/sparcl_published.json`` (seed 0, its protocol), train the first two
experiences of each benchmark and record, per removal stage: how many examples it observed, the histogram of
forgetting counts among those it saw learned, how many it never saw learned, how many it removed and the largest
count among the removed; and the TDM updates (epoch, pruned, regrown) of the experience.

Usage: ``python experiments/sparcl_ddr_stages.py experiments/results/sparcl_published/ddr_stages.json``
(about 40 s on one CPU thread).
"""

import json
import sys

import torch

from avalanche_merge.benchmarks import BENCHMARKS
from avalanche_merge.models import BACKBONES
from avalanche_merge.plugins.protocol import HeadProtocolPlugin
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.runner.run import make_evaluator, seed_everything
from avalanche_merge.strategies import METHODS
from avalanche_merge.strategies.registry import BuildContext

out = {}
for plan in plan_experiment(load_experiment("experiments/configs/sparcl_published.json")):
    if plan.label != "sparcl":
        continue
    bench = BENCHMARKS.get(plan.benchmark).build(plan.benchmark_options, plan.seed)
    seed_everything(plan.seed)
    model = BACKBONES.get(plan.model).build(plan.model_options, bench, plan.seed)
    ctx = BuildContext(
        model=model,
        benchmark=bench,
        train=plan.train,
        evaluator=make_evaluator([]),
        plugins=[HeadProtocolPlugin(protocol=plan.protocol)],
        seed=plan.seed,
    )
    strategy = METHODS.get("sparcl").build(ctx, plan.method_options)
    plugin = next(p for p in strategy.plugins if type(p).__name__ == "SparCLPlugin")
    rows = []
    for exp in list(bench.train_stream)[:2]:
        strategy.train(exp)
        r = plugin.removal
        alive = torch.ones(r.n, dtype=torch.bool)
        for s, (counts, learned, removed) in enumerate(zip(r.stage_counts, r.stage_learned, r.removed)):
            hist = torch.bincount(counts[alive & learned]).tolist()
            rows.append(
                {
                    "experience": exp.current_experience,
                    "stage": s,
                    "observed": int(alive.sum()),
                    "learned_count_histogram": hist,
                    "never_learned": int((alive & ~learned).sum()),
                    "removed": len(removed),
                    "max_count_removed": int(counts[removed].max()),
                    "removed_never_learned": int((~learned[removed]).sum()),
                }
            )
            alive[removed] = False
        rows.append({"experience": exp.current_experience, "tdm_updates": plugin.learner.updates})
        rows.append(
            {
                "experience": exp.current_experience,
                "kept_fraction": plugin.kept_fractions[-1],
                "passes": plugin.passes[-1],
            }
        )
    out[plan.benchmark] = rows
    print(plan.benchmark, json.dumps(rows, indent=1), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1)
