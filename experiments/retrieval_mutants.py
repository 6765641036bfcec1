"""Hand-written mutants of the retrieval cores (issue 14): each must make at least one test of its file fail.

Each mutant is one text replacement (a plausible wrong implementation: a flipped sign, a dropped scaling, ignored
gates, a stale input). The script copies the repository (without ``.git`` and results) to a scratch directory,
applies one replacement, runs the matching test file there (``-x``, without the Avalanche end-to-end runs) and
prints KILLED or SURVIVED with the first failing test. Complements ``experiments/mutation.py`` (mutmut), which
generates mutants mechanically.

Run (about 8 minutes on one core)::

    OMP_NUM_THREADS=1 python experiments/retrieval_mutants.py [NAME_SUBSTRING ...]
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
DST = Path(tempfile.mkdtemp(prefix="retrieval_mutants_")) / "repo"
R, S, P = (
    "avalanche_merge/retrieval/routed.py",
    "avalanche_merge/retrieval/signatures.py",
    "avalanche_merge/retrieval/prototypes.py",
)
TR, TS, TP = (
    "tests/retrieval/test_routed.py",
    "tests/retrieval/test_signatures.py",
    "tests/retrieval/test_prototypes.py",
)
MUTANTS = [
    ("lda bias sign flipped", R, "head.bias.copy_((-0.5 *", "head.bias.copy_((0.5 *", TR),
    (
        "lda shrinkage removed",
        R,
        "ridge = self.config.lda_shrinkage * max(float(cov.diagonal().mean()), 1e-8) + 1e-8",
        "ridge = 1e-8",
        TR,
    ),
    (
        "lda shrinkage not scaled by mean variance",
        R,
        "ridge = self.config.lda_shrinkage * max(float(cov.diagonal().mean()), 1e-8) + 1e-8",
        "ridge = self.config.lda_shrinkage + 1e-8",
        TR,
    ),
    (
        "lda covariance divided by N",
        R,
        "cov = z.T @ z / max(z.shape[0] - 1, 1)",
        "cov = z.T @ z / max(z.shape[0], 1)",
        TR,
    ),
    (
        "lda fitted on pretrained features",
        R,
        "feats = torch.cat([self._task_features(x, t) for x in inputs])",
        "feats = torch.cat([self.embed(x) for x in inputs])",
        TR,
    ),
    ("gates ignored", R, "return None if gate is None else output * gate", "return None", TR),
    (
        "gates detached",
        R,
        "return None if gate is None else output * gate",
        "return None if gate is None else output * gate.detach()",
        TR,
    ),
    ("default reduce pca", S, "    reduce: str | None = None", '    reduce: str | None = "pca"', TS),
    ("shrinkage ridge without mean variance", S, "return a * float(x.var(0).mean()), a", "return a, a", TS),
    (
        "estimators swapped",
        S,
        'SHRINKAGE = {"oas": OAS, "ledoit_wolf": LedoitWolf}',
        'SHRINKAGE = {"oas": LedoitWolf, "ledoit_wolf": OAS}',
        TS,
    ),
    (
        "shrinkage silently diagonal when n <= dim",
        S,
        "            k = max(1, min(k, n // 2))  # about two",
        "            cov = 'diag'; k = max(1, min(k, n // 2))  # about two",
        TS,
    ),
    ("ncm cosine means not normalised", P, "x @ F.normalize(means, dim=1).T", "x @ means.T", TP),
    (
        "ncm normalize_features ignored",
        P,
        'if self.config.metric == "cosine" or self.config.normalize_features:',
        'if self.config.metric == "cosine":',
        TP,
    ),
    (
        "ranpac selection ignores past statistics",
        P,
        "G = self.G + h[fit].T @ h[fit]\n        C = self.C + h[fit].T @ y[fit]",
        "G = h[fit].T @ h[fit]\n        C = h[fit].T @ y[fit]",
        TP,
    ),
    (
        "ranpac split seed constant",
        P,
        "manual_seed(self.config.seed + 1 + self._tasks)",
        "manual_seed(self.config.seed + 1)",
        TP,
    ),
    (
        "ranpac relu without projection",
        P,
        "        if self.projection is None:\n            return x",
        "        if self.projection is None:\n            return torch.relu(x)",
        TP,
    ),
]
only = sys.argv[1:]
for name, path, old, new, tests in MUTANTS:
    if only and not any(o in name for o in only):
        continue
    if DST.exists():
        shutil.rmtree(DST)
    shutil.copytree(SRC, DST, ignore=shutil.ignore_patterns(".git", "results", "__pycache__"))
    text = (DST / path).read_text()
    assert text.count(old) == 1, (name, text.count(old))
    (DST / path).write_text(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=str(DST), OMP_NUM_THREADS="1")
    args = ["-q", "-x", "-p", "no:cacheprovider", "-k", "not tiny_avalanche_run and not refuse"]
    r = subprocess.run([sys.executable, "-m", "pytest", tests, *args], cwd=DST, env=env, capture_output=True, text=True)
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    status = {1: "KILLED", 0: "SURVIVED"}.get(r.returncode, f"rc={r.returncode}")
    print(f"{status:8s} {name}: {failed[:1]}", flush=True)
shutil.rmtree(DST.parent, ignore_errors=True)
