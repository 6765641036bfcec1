"""Compare Avalanche baselines on the offline class-incremental benchmark, from Python.

Run: python examples/compare_baselines.py   (about a minute on 2 CPU cores)
"""

from avalanche_merge.runner import load_experiment, run_experiment
from avalanche_merge.runner.suite import print_table

config = load_experiment({
    "name": "example",
    "benchmarks": [{"name": "split_mnist"}],
    "methods": ["naive", {"name": "replay", "options": {"mem_size": 100}}, "slda"],
    "seeds": [0],
})
results, rows = run_experiment(config, "results/example")
print_table(rows)
print("accuracy matrix of", results[0]["label"], "(rows: after experience i, columns: test experience j):")
for row in results[0]["accuracy_matrix"]:
    print("  " + "  ".join(f"{100 * a:5.1f}" for a in row))
