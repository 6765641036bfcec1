#!/usr/bin/env bash
# Time the README's main job, `avalanche-merge bench`, from a fresh clone and an empty checkpoint cache (issue 19):
# wall clock, CPU time and peak memory from /usr/bin/time -v, and the per-run split of training, evaluation and
# set-up from the summary. Run it on a quiet machine; extra arguments go to `bench` (e.g. --full, --jobs 1).
#
#   bash experiments/main_job_time.sh            # the default bench (target: <= 10 min on 2 cores)
#   bash experiments/main_job_time.sh --full     # the full table
#   PYTHON=/path/to/venv/bin/python bash experiments/main_job_time.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/main-job-XXXXXX")
git clone -q --no-checkout "$repo" "$work/clone"
git -C "$work/clone" checkout -q "$(git -C "$repo" rev-parse HEAD)"
cd "$work/clone"
export PYTHONPATH="$work/clone" AVALANCHE_MERGE_CACHE="$work/cache"
echo "clone: $work/clone (commit $(git rev-parse --short HEAD)); cache: $AVALANCHE_MERGE_CACHE (empty); $(getconf _NPROCESSORS_ONLN) cores"
/usr/bin/time -v -o "$work/time.txt" "$python" -m avalanche_merge.cli bench --quiet --out "$work/bench" "$@"
grep -E "Elapsed|User time|System time|Percent of CPU|Maximum resident" "$work/time.txt"
"$python" - "$work/bench/summary.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
runs = sum(int(r["n_seeds"]) for r in rows)
tot = {k: sum(float(r[f"{k}_mean"]) * int(r["n_seeds"]) for r in rows) for k in
       ("train_time_s", "eval_time_s", "setup_time_s", "wall_time_s")}
print(f"{runs} runs; summed over runs: " + ", ".join(f"{k} {v:.0f} s" for k, v in tot.items()))
print(f"per run: training {tot['train_time_s'] / runs:.1f} s, evaluation {tot['eval_time_s'] / runs:.1f} s, "
      f"set-up {tot['setup_time_s'] / runs:.1f} s (overhead/training {(tot['eval_time_s'] + tot['setup_time_s']) / tot['train_time_s']:.2f})")
PY
echo "results: $work/bench; /usr/bin/time report: $work/time.txt"
