"""Mutation testing of chosen modules with mutmut 3, with a per-module JSON + markdown report.

Usage (from the repository root, with the ``mutation`` extra installed: ``pip install -e .[mutation]``)::

    python experiments/mutation.py avalanche_merge/evaluation/matrix.py \
        --tests tests/evaluation/test_matrix.py tests/evaluation/test_matrix_transfer.py --workers 2

    # a different test selection per module: MODULE=TEST[,TEST...]
    python experiments/mutation.py \
        avalanche_merge/lora/projection.py=tests/lora/test_projection.py \
        avalanche_merge/evaluation/matrix.py=tests/evaluation/test_matrix.py,tests/evaluation/test_matrix_transfer.py

    # leave slow tests out of every run (stats run and per mutant)
    python experiments/mutation.py avalanche_merge/lora/cllora.py --tests tests/lora/test_cllora.py \
        --pytest-arg=-k --pytest-arg="not runs_inside_avalanche"

How it runs: mutmut 3 reads its configuration only from ``[tool.mutmut]`` in ``pyproject.toml`` (or ``[mutmut]`` in
``setup.cfg``) of the current directory and writes its ``mutants/`` tree there. So that the repository's own
configuration is never touched, each module runs in a scratch directory (a temporary one, or ``--workdir``) that
holds a snapshot of the package, the tests (and ``--also-copy`` paths), and a ``pyproject.toml`` made of the
repository's one (pytest options, filter warnings) plus a generated ``[tool.mutmut]`` section. The scratch
directory is deleted afterwards unless ``--keep`` is given (then ``cd`` there and use ``mutmut browse`` /
``mutmut show NAME``). Each run starts from a fresh ``mutants/`` so no stale mutmut cache can leak in.

mutmut 3 maps every function of the mutated module to the tests that call it (directly or through other functions
of the module) during a traced run of the selected tests, and runs only those tests against each mutant: the test
selection (``--tests``) bounds both the stats run and, per mutant, the worst case.

Score: ``killed / (total - equivalent)``, where ``equivalent`` are the mutants listed in
``experiments/mutation_equivalent.json`` (``{"mutant name": "reason"}``) that were not killed. Timeouts,
suspicious results and mutants no selected test reaches ("no tests") count as not killed. Every mutant that was
not killed is listed with its diff so that a human can either write a test that kills it or record it as
equivalent with a reason. Mutant names are ``<module>.x_<function>__mutmut_<n>``, numbered per function: editing
one function renumbers only that function's mutants, so re-check its entries in the equivalents file.

Reports: ``experiments/results/mutation/<module>.json`` and ``<module>.md`` (module with dots, e.g.
``avalanche_merge.evaluation.matrix.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "results" / "mutation"
DEFAULT_EQUIVALENT = REPO / "experiments" / "mutation_equivalent.json"

# mutmut.stats.status_by_exit_code (3.8); anything else is "suspicious"
STATUS_BY_EXIT_CODE = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 2: "interrupted", None: "not checked",
                       33: "no tests", 34: "skipped", 35: "suspicious", 36: "timeout", 37: "caught by type check",
                       -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault",
                       -9: "segfault"}
STATUSES = ["killed", "survived", "timeout", "suspicious", "no tests", "skipped", "caught by type check",
            "segfault", "interrupted", "not checked"]

_DIFF_HELPER = r"""
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
path, names = sys.argv[1], json.loads(sys.stdin.read())
out = {}
for name in names:
    try:
        out[name] = get_diff_for_mutant(name, path=path)
    except Exception as e:  # noqa: BLE001
        out[name] = f"<no diff: {type(e).__name__}: {e}>"
print(json.dumps(out))
"""


def _status(code) -> str:
    return STATUS_BY_EXIT_CODE.get(code, "suspicious")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _strip_toml_table(text: str, table: str) -> str:
    """Remove ``[table]`` and its ``[table.*]`` sub-tables from a TOML document (line based)."""
    out, skipping = [], False
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    for line in text.splitlines():
        m = header.match(line)
        if m:
            name = m.group(1).strip().strip('"')
            skipping = name == table or name.startswith(table + ".")
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _module_name(path: Path) -> str:
    return ".".join(path.with_suffix("").parts).removesuffix(".__init__")


def _clean_log(text: str) -> str:
    """Drop the spinner frames mutmut writes with carriage returns: keep the last frame of every line."""
    return "\n".join(line.split("\r")[-1] for line in text.splitlines())


def _git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None}


def _load_equivalent(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
        raise SystemExit(f"{path} must map mutant names to a non-empty reason string")
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys are allowed


def _copy_tree(src: Path, dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutants")
    if src.is_dir():
        shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def prepare_workdir(work: Path, module: Path, tests: list[str], args) -> dict:
    """Fill ``work`` with the package, tests and a pyproject.toml whose ``[tool.mutmut]`` is ours; return it."""
    package = module.parts[0]
    for rel in dict.fromkeys([package, "tests", *args.also_copy]):
        if (REPO / rel).exists():
            _copy_tree(REPO / rel, work / rel)
    mutmut_conf = {
        "source_paths": [package],
        "only_mutate": [module.as_posix()],
        "pytest_add_cli_args_test_selection": list(tests),
        # no cache, no durations table, quiet: the runs are many and short
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", "-o", "addopts=", *args.pytest_arg],
        "use_git_change_detection": False,
        "use_setproctitle": False,
    }
    if args.only_covered:
        mutmut_conf["mutate_only_covered_lines"] = True
    mutmut_conf.update(_parse_set(args.set))
    base = (REPO / "pyproject.toml").read_text() if (REPO / "pyproject.toml").exists() else ""
    base = _strip_toml_table(base, "tool.mutmut")
    section = "\n[tool.mutmut]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in mutmut_conf.items())
    (work / "pyproject.toml").write_text(base + section)
    if (REPO / "setup.cfg").exists():  # copied for completeness; [tool.mutmut] in pyproject.toml takes precedence
        shutil.copy2(REPO / "setup.cfg", work / "setup.cfg")
    return mutmut_conf


def run_mutmut(work: Path, workers: int, log_path: Path, env: dict, timeout: float | None) -> int:
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(workers)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGTERM)  # mutmut's own process group: the run and its workers only
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise


def read_results(work: Path, module: Path) -> tuple[dict, dict]:
    meta = json.loads((work / "mutants" / (module.as_posix() + ".meta")).read_text())
    stats_path = work / "mutants" / "mutmut-stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return meta, stats


def diffs_for(work: Path, module: Path, names: list[str], env: dict) -> dict[str, str]:
    if not names:
        return {}
    proc = subprocess.run([sys.executable, "-c", _DIFF_HELPER, module.as_posix()], cwd=work, env=env,
                          input=json.dumps(names), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {n: f"<no diff: {proc.stderr.strip()[-500:]}>" for n in names}
    return json.loads(proc.stdout)


def build_report(module: Path, tests: list[str], meta: dict, stats: dict, diffs: dict, equivalent: dict,
                 duration_s: float, args, mutmut_conf: dict) -> dict:
    mod = _module_name(module)
    codes = meta["exit_code_by_key"]
    status = {name: _status(code) for name, code in codes.items()}
    counts = {s: 0 for s in STATUSES}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    total = len(status)
    # mutmut names functions ``<mod>.x_<name>`` and methods ``<mod>.xǁ<Class>ǁ<name>``
    eq_here = {n: r for n, r in equivalent.items() if n.startswith((mod + ".x_", mod + ".xǁ"))}
    equivalent_not_killed = {n: r for n, r in eq_here.items() if n in status and status[n] != "killed"}
    killed_but_marked = sorted(n for n, r in eq_here.items() if status.get(n) == "killed")
    stale = sorted(n for n in eq_here if n not in status)
    denominator = total - len(equivalent_not_killed)
    killed = counts["killed"]
    not_killed = []
    for name in sorted(status, key=_natural_key):
        if status[name] == "killed":
            continue
        not_killed.append({"name": name, "status": status[name], "equivalent": name in equivalent_not_killed,
                           "reason": equivalent_not_killed.get(name), "diff": diffs.get(name, "")})
    tests_by_fn = stats.get("tests_by_mangled_function_name", {})
    durations = stats.get("duration_by_test", {})
    per_function = {}
    for name in status:
        fn = name.rsplit("__mutmut_", 1)[0]
        row = per_function.setdefault(fn.split(".x_", 1)[-1], {"mutants": 0, "killed": 0, "tests": 0,
                                                               "test_seconds": 0.0})
        row["mutants"] += 1
        row["killed"] += status[name] == "killed"
        row["tests"] = len(tests_by_fn.get(fn, []))
        row["test_seconds"] = round(sum(durations.get(t, 0.0) for t in tests_by_fn.get(fn, [])), 4)
    return {
        "module": mod,
        "path": module.as_posix(),
        "tests": tests,
        "workers": args.workers,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git": _git_state(),
        "mutmut_version": _mutmut_version(),
        "mutmut_config": mutmut_conf,
        "duration_s": round(duration_s, 1),
        "stats_run_s": round(stats.get("stats_time", 0.0), 2),
        "total": total,
        "counts": {k: v for k, v in counts.items() if v or k in ("killed", "survived", "timeout", "suspicious")},
        "killed": killed,
        "survived": counts["survived"],
        "timeout": counts["timeout"],
        "suspicious": counts["suspicious"],
        "no_tests": counts["no tests"],
        "equivalent": len(equivalent_not_killed),
        "score": killed / denominator if denominator else None,
        "score_without_equivalents": killed / total if total else None,
        "not_killed": not_killed,
        "equivalent_marked_but_killed": killed_but_marked,
        "equivalent_stale": stale,
        "per_function": per_function,
    }


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _mutmut_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("mutmut")
    except Exception:  # noqa: BLE001
        return None


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def to_markdown(r: dict) -> str:
    lines = [f"# Mutation testing: `{r['path']}`", "",
             f"- date: {r['date']}, commit `{(r['git'].get('commit') or '?')[:12]}`, mutmut {r['mutmut_version']}, "
             f"{r['workers']} worker(s), {r['duration_s']} s (stats run {r['stats_run_s']} s)",
             f"- tests: {', '.join(f'`{t}`' for t in r['tests'])}", "",
             "| total | killed | survived | timeout | suspicious | no tests | equivalent | score |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {r['total']} | {r['killed']} | {r['survived']} | {r['timeout']} | {r['suspicious']} | "
             f"{r['no_tests']} | {r['equivalent']} | **{_pct(r['score'])}** |", "",
             f"score = killed / (total - equivalent) = {r['killed']} / ({r['total']} - {r['equivalent']}); "
             f"without the equivalents file: {_pct(r['score_without_equivalents'])}.", "",
             "## Per function", "", "| function | mutants | killed | tests reaching it | their run time (s) |",
             "|---|---:|---:|---:|---:|"]
    for fn, row in r["per_function"].items():
        lines.append(f"| `{fn}` | {row['mutants']} | {row['killed']} | {row['tests']} | {row['test_seconds']} |")
    open_ = [m for m in r["not_killed"] if not m["equivalent"]]
    eq = [m for m in r["not_killed"] if m["equivalent"]]
    lines += ["", f"## Not killed and not marked equivalent ({len(open_)})", ""]
    if not open_:
        lines.append("None.")
    for m in open_:
        lines += [f"### `{m['name']}` ({m['status']})", "", "```diff", m["diff"], "```", ""]
    lines += ["", f"## Equivalent (excluded from the score, {len(eq)})", ""]
    if not eq:
        lines.append("None.")
    for m in eq:
        lines += [f"### `{m['name']}` ({m['status']})", "", f"Reason: {m['reason']}", "", "```diff", m["diff"],
                  "```", ""]
    if r["equivalent_marked_but_killed"] or r["equivalent_stale"]:
        lines += ["", "## Equivalents file entries to revisit", ""]
        lines += [f"- `{n}`: marked equivalent but killed" for n in r["equivalent_marked_but_killed"]]
        lines += [f"- `{n}`: no such mutant any more" for n in r["equivalent_stale"]]
    return "\n".join(lines).rstrip() + "\n"


def print_summary(r: dict) -> None:
    print(f"\n== {r['path']}: {r['total']} mutants, killed {r['killed']}, survived {r['survived']}, "
          f"timeout {r['timeout']}, suspicious {r['suspicious']}, no tests {r['no_tests']}, "
          f"equivalent {r['equivalent']} -> score {_pct(r['score'])} ({r['duration_s']} s)")
    for m in r["not_killed"]:
        tag = f"EQUIVALENT: {m['reason']}" if m["equivalent"] else m["status"].upper()
        print(f"\n-- {m['name']} [{tag}]")
        if not m["equivalent"]:
            print(m["diff"])
    for n in r["equivalent_marked_but_killed"]:
        print(f"note: {n} is in the equivalents file but was killed")
    for n in r["equivalent_stale"]:
        print(f"note: {n} is in the equivalents file but no longer exists")


def parse_targets(args) -> list[tuple[Path, list[str]]]:
    targets = []
    for item in args.modules:
        path, sep, tests = item.partition("=")
        module = Path(path)
        if module.is_absolute():
            module = module.relative_to(REPO)
        if module.suffix != ".py" or not (REPO / module).is_file():
            raise SystemExit(f"not a Python file of the repository: {path}")
        selected = [t for t in tests.split(",") if t] if sep else list(args.tests)
        for t in selected:
            if not (REPO / t.split("::")[0]).exists():
                raise SystemExit(f"no such test path: {t}")
        targets.append((module, selected))
    return targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="+", help="module file(s) to mutate, optionally MODULE=TEST[,TEST...]")
    p.add_argument("--tests", nargs="+", default=["tests"],
                   help="pytest paths / node ids run against the mutants of modules given without '=' "
                        "(default: tests)")
    p.add_argument("--workers", type=int, default=2, help="mutmut --max-children (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL/torch threads per worker (default 1: workers x threads <= cores)")
    p.add_argument("--equivalent", type=Path, default=DEFAULT_EQUIVALENT,
                   help="JSON {mutant name: reason} excluded from the score's denominator")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch folder (default: a temporary one); it is wiped before the run")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (mutmut browse / show there)")
    p.add_argument("--also-copy", nargs="*", default=[], help="extra repo paths the tests need (e.g. examples)")
    p.add_argument("--only-covered", action="store_true",
                   help="mutmut mutate_only_covered_lines: skip lines the selected tests never execute")
    p.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                   help="extra pytest argument for every run (repeat), e.g. --pytest-arg=-k --pytest-arg='not slow'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra [tool.mutmut] option (JSON value), e.g. --set process_isolation=forkserver")
    p.add_argument("--timeout", type=float, default=None, help="wall-clock limit per module run (s)")
    p.add_argument("--min-score", type=float, default=None, help="exit 1 if a module scores below this (0-1)")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise SystemExit("--workers must be >= 1")
    try:
        import mutmut  # noqa: F401
    except ImportError:
        raise SystemExit("mutmut is not installed: pip install -e .[mutation]") from None

    targets = parse_targets(args)
    equivalent = _load_equivalent(args.equivalent)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env.pop("MUTANT_UNDER_TEST", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    worst = 1.0
    failed = False
    for module, tests in targets:
        if args.workdir:
            work = args.workdir.resolve() / _module_name(module)
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
        else:
            work = Path(tempfile.mkdtemp(prefix=f"mutmut-{_module_name(module)}-"))
        print(f"mutating {module} against {' '.join(tests)} ({args.workers} workers) in {work}", flush=True)
        try:
            conf = prepare_workdir(work, module, tests, args)
            t0 = time.monotonic()
            log_path = work / "mutmut.log"
            rc = run_mutmut(work, args.workers, log_path, env, args.timeout)
            duration = time.monotonic() - t0
            log = _clean_log(log_path.read_text(errors="replace"))
            meta_file = work / "mutants" / (module.as_posix() + ".meta")
            if rc != 0 or not meta_file.exists():
                print(log[-4000:])
                print(f"mutmut failed on {module} (exit code {rc}); scratch folder kept: {work}")
                args.keep, failed = True, True
                continue
            meta, stats = read_results(work, module)
            names = [n for n, c in meta["exit_code_by_key"].items() if _status(c) != "killed"]
            report = build_report(module, tests, meta, stats, diffs_for(work, module, names, env), equivalent,
                                  duration, args, conf)
            json_path, md_path = (args.out / (report["module"] + ext) for ext in (".json", ".md"))
            json_path.write_text(json.dumps(report, indent=2) + "\n")
            md_path.write_text(to_markdown(report))
            print_summary(report)
            print(f"\nreport: {md_path} and {json_path.name}")
            if report["score"] is not None:
                worst = min(worst, report["score"])
        finally:
            if args.keep:
                print(f"scratch folder kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    if failed:
        return 2
    if args.min_score is not None and worst < args.min_score:
        print(f"score {_pct(worst)} below --min-score {_pct(args.min_score)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
