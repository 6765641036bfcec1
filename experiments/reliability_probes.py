"""Re-run of issue 15's probe classes against the CLI, the runner, the loaders and the merging API.

Every probe states what a correct program does (``expect``) and is classified from what happened:

- ``ok``: the expected outcome (a one-line error and exit 2, a named ``ValueError``, a recomputed run...);
- ``traceback``: an exception escaped the CLI for a user's mistake;
- ``code executed``: a payload created its marker file;
- ``silent``: the call succeeded where it should have refused, or a wrong result was stored or shown.

The CLI is called in-process (``avalanche_merge.cli.main``) so that 40 probes take a minute, not one import of
Avalanche each. Writes ``experiments/results/reliability/probes.{json,md}``.

    python experiments/reliability_probes.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
import tempfile
import traceback
from pathlib import Path

OUT = Path(__file__).parent / "results" / "reliability"
TINY = {"name": "tiny_vit", "options": {"pretrained": True, "dim": 16, "depth": 1, "heads": 2, "pretrain_epochs": 5}}
BASE = {"name": "probe", "benchmarks": [{"name": "split_digits", "options": {"n_experiences": 2,
                                                                            "max_train_per_class": 20}}],
        "methods": ["naive"], "seeds": [0], "train": {"epochs": 1, "batch_size": 16}, "model": TINY, "loggers": []}


def cli(argv: list[str]) -> tuple[int | None, str, str | None]:
    """(exit status, stderr, escaped traceback) of ``avalanche-merge argv``."""
    from avalanche_merge.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except SystemExit as exc:  # argparse
        return int(exc.code or 0), err.getvalue(), None
    except BaseException:  # noqa: BLE001 - an escaped exception is what the probe looks for
        return None, err.getvalue(), traceback.format_exc()
    return rc, err.getvalue(), None


def config_file(tmp: Path, name: str, **overrides) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({**BASE, **overrides}))
    return str(path)


def expect_exit(argv, code: int = 2):
    def probe(tmp):
        rc, err, tb = cli(argv(tmp) if callable(argv) else argv)
        if tb:
            return "traceback", tb.strip().splitlines()[-1]
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return ("ok" if rc == code else "silent"), f"exit {rc}: {last[:160]}"
    return probe


def expect_raise(fn, exc=ValueError):
    def probe(tmp):
        try:
            fn(tmp)
        except exc as e:  # noqa: PERF203
            return "ok", f"{type(e).__name__}: {str(e)[:160]}"
        except Exception as e:  # noqa: BLE001
            return "traceback", f"unexpected {type(e).__name__}: {str(e)[:160]}"
        return "silent", "accepted"
    return probe


def dry(name: str, **overrides):
    return expect_exit(lambda tmp: ["run", config_file(tmp, name, **overrides), "--dry-run"])


def model(**options):
    return {"name": "tiny_vit", "options": {**TINY["options"], **options}}


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cifar_meta(tmp: Path):
    from avalanche_merge.benchmarks.classic import split_cifar10

    root = tmp / "cifar"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp / "pwned-cifar"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    try:
        split_cifar10(dataset_root=str(root), n_experiences=5, verify_checksums=False)
    except Exception as exc:  # noqa: BLE001
        outcome = f"refused: {type(exc).__name__}: {str(exc)[:120]}"
    else:
        outcome = "loaded"
    return ("code executed" if marker.exists() else "ok"), outcome


def clip_checkpoint(tmp: Path):
    import torch

    from avalanche_merge.models.clip import load_open_clip

    marker = tmp / "pwned-clip"
    path = tmp / "evil.pt"
    torch.save({"x": _Payload(str(marker))}, path)
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "patch_size": 14,
                                           "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    try:
        load_open_clip("tiny", model_cfg=cfg, pretrained=str(path))
    except Exception as exc:  # noqa: BLE001
        outcome = f"refused: {type(exc).__name__}: {str(exc)[:120]}"
    else:
        outcome = "loaded"
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
    return ("code executed" if marker.exists() else "ok"), outcome


def label_escape(tmp: Path):
    probe = expect_exit(lambda t: ["run", config_file(t, "label", methods=[{"name": "naive",
                                                                                "label": "a/../../../escaped"}]),
                                   "--out", str(t / "out")])
    verdict, detail = probe(tmp)
    escaped = list(tmp.parent.rglob("escaped"))
    return ("silent" if escaped else verdict), detail


def _run_tiny(tmp: Path, name="probe", methods=("naive",), out="out"):
    from avalanche_merge.runner import load_experiment, run_experiment

    return run_experiment(load_experiment({**BASE, "name": name, "methods": list(methods)}), tmp / out,
                          progress=False, plots=False)


def corrupt_results(tmp: Path):
    import csv

    def accuracy_rows():
        with open(tmp / "out" / "summary.csv") as f:
            return [(r["method"], r["final_acc_mean"], r["n_seeds"]) for r in csv.DictReader(f)]

    (first,), _ = _run_tiny(tmp)
    path = next((tmp / "out" / "runs").glob("*/result.json"))
    summary = accuracy_rows()
    bad = []
    for content in (b"[]", b"null", b'"x"', b'{"status": "complete"}', b"\xff\xfe", b'{"accuracy_matrix": "x"}'):
        path.write_bytes(content)
        (again,), _ = _run_tiny(tmp)
        if again["accuracy_matrix"] != first["accuracy_matrix"] or accuracy_rows() != summary:
            bad.append(content)
    return ("silent" if bad else "ok"), f"6 corrupt contents re-run to identical results and summary; bad: {bad}"


def shared_out(tmp: Path):
    import csv

    _run_tiny(tmp, "first", ("naive",))
    _run_tiny(tmp, "second", ("ewc",))
    with open(tmp / "out" / "summary.csv") as f:
        methods = sorted(r["method"] for r in csv.DictReader(f))
    return ("ok" if methods == ["ewc", "naive"] else "silent"), f"summary rows after two experiments: {methods}"


def temp_files(tmp: Path):
    _run_tiny(tmp)
    run = next((tmp / "out" / "runs").glob("*/"))
    (run / ".tmp-killed.json").write_text("half")
    (run / "result.json").unlink()
    (tmp / "out" / ".tmp-summary.csv").write_text("half")
    _run_tiny(tmp)
    left = list((tmp / "out").rglob(".tmp-*"))
    return ("ok" if not left else "silent"), f"temp files left after the re-run: {len(left)}"


def relabeled_configs(tmp: Path):
    from avalanche_merge.runner import load_experiment, run_experiment

    for lr in (1e-3, 3e-3):
        cfg = {**BASE, "train": {**BASE["train"], "lr": lr}}
        run_experiment(load_experiment(cfg), tmp / "out", progress=False, plots=False)
    from avalanche_merge.analysis.report import load_results

    labels = sorted({r["label"] for r in load_results(tmp / "out")})
    return ("ok" if len(labels) == 2 else "silent"), f"labels in the report: {labels}"


def _cli_process(tmp: Path, config: str, out: Path):
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "avalanche_merge.cli", "run", config, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def two_processes(tmp: Path):
    """Two ``avalanche-merge run`` processes on one folder: every run computed once, both summaries complete."""
    config = config_file(tmp, "two", methods=["naive", "ewc"], seeds=[0, 1])
    procs = [_cli_process(tmp, config, tmp / "out") for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    computed = [log.count("final acc") for log in logs]
    ok = all(p.returncode == 0 for p in procs) and sum(computed) == 4
    codes = [p.returncode for p in procs]
    return ("ok" if ok else "silent"), f"runs computed by each process: {computed} (4 planned); exit {codes}"


def sigkill_resume(tmp: Path):
    """SIGKILL during the second run, then the same command: the first run is kept, nothing is left half-written."""
    import signal
    import time

    config = config_file(tmp, "kill", methods=["naive"], seeds=[0, 1, 2])
    proc = _cli_process(tmp, config, tmp / "out")
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp / "out" / "runs").glob("*/result.json"))) < 1:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(list((tmp / "out" / "runs").glob("*/result.json")))
    again = _cli_process(tmp, config, tmp / "out")
    log = again.communicate(timeout=600)[0]
    recomputed = log.count("final acc")
    ok = again.returncode == 0 and kept >= 1 and kept + recomputed == 3 and not list((tmp / "out").rglob(".tmp-*"))
    return ("ok" if ok else "silent"), (f"{kept} run(s) kept after kill -9, {recomputed} computed on resume, "
                                        f"exit {again.returncode}")


def merging(fn):
    def probe(tmp):
        import torch
        from safetensors.torch import save_file

        from avalanche_merge.merging import TaskVector, merge_safetensors, task_arithmetic

        pre = {"w": torch.zeros(4), "i": torch.zeros(2, dtype=torch.int8)}
        return expect_raise(lambda t: fn(t, torch, save_file, TaskVector, merge_safetensors, task_arithmetic,
                                         pre))(tmp)
    return probe


def _files(t, torch, save_file, pre, ft):
    save_file(pre, str(t / "pre.safetensors"))
    save_file(ft, str(t / "ft.safetensors"))
    return t / "pre.safetensors", [t / "ft.safetensors"], t / "merged.safetensors"


PROBES = {
    "security": [
        ("CIFAR batches with a pickle payload, verify_checksums false", "no code runs", cifar_meta),
        ("open_clip .pt payload with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1", "no code runs", clip_checkpoint),
        ("label a/../../../escaped", "exit 2, nothing written outside --out", label_escape),
    ],
    "late failure -> plan time (--dry-run)": [
        ("seed 2**32", "exit 2", dry("seed", seeds=[2**32])),
        ("device 'banana'", "exit 2", dry("dev", device="banana")),
        ("device 'cuda' without CUDA", "exit 2", dry("cuda", device="cuda")),
        ("tiny_vit heads 3 (dim 16)", "exit 2", dry("heads", model=model(heads=3))),
        ("tiny_vit patch_size 5 on 28 px", "exit 2", dry("patch", model=model(patch_size=5))),
        ("tiny_vit dim 0", "exit 2", dry("dim", model=model(dim=0))),
        ("checkpoint missing", "exit 2", dry("ckpt", model=model(checkpoint="/no/such.safetensors"))),
        ("cache_dir is a file", "exit 2", dry("cache", model=model(cache_dir="/proc/version"))),
        ("open_clip pretrained missing", "exit 2",
         dry("clip", model={"name": "open_clip", "options": {"pretrained": "/no/such.pt"}})),
        ("dataset_root missing", "exit 2",
         dry("cifar", benchmarks=[{"name": "split_cifar10", "options": {"dataset_root": "/no/root"}}])),
        ("LoRA target_modules ['query']", "exit 2",
         dry("lora", methods=[{"name": "lora", "options": {"target_modules": ["query"]}}])),
        ("analysis.layers ['blocks.9']", "exit 2", dry("layers", analysis={"layers": ["blocks.9"]})),
        ("analysis with a routed method", "exit 2", dry("routed", methods=["color"], analysis={})),
        ("analysis.geometry_include matching nothing", "exit 2",
         dry("include", analysis={"geometry_include": "nothing"})),
        ("lr 1e300", "exit 2", dry("lr", train={"lr": 1e300})),
    ],
    "silent wrong result -> refused": [
        ("lr Infinity", "exit 2", dry("lrinf", train={"lr": float("inf")})),
        ("weight_decay Infinity", "exit 2", dry("wd", train={"weight_decay": float("inf")})),
        ("ewc_lambda Infinity", "exit 2", dry("ewc", methods=[{"name": "ewc", "options": {"ewc_lambda": 1e999}}])),
        ("lwf alpha -Infinity", "exit 2", dry("lwf", methods=[{"name": "lwf", "options": {"alpha": -1e999}}])),
        ("bench --methods ''", "exit 2", ["bench", "--methods", "", "--quiet"]),
        ("two configs under one label", "split, never averaged", relabeled_configs),
        ("apply_to(scaling=nan)", "ValueError", merging(lambda t, torch, sf, TV, ms, ta, pre: TV(
            {"w": torch.ones(4)}).apply_to(pre, scaling=float("nan")))),
        ("task_arithmetic(weights=[nan, 1])", "ValueError", merging(lambda t, torch, sf, TV, ms, ta, pre: ta(
            [TV({"w": torch.ones(4)}), TV({"w": torch.ones(4)})], weights=[float("nan"), 1.0]))),
        ("merge_safetensors(scaling=nan)", "ValueError", merging(lambda t, torch, sf, TV, ms, ta, pre: ms(
            *_files(t, torch, sf, pre, {**pre, "w": torch.ones(4)}), scaling=float("nan"), progress=False))),
        ("fp16 merge that overflows", "ValueError", merging(lambda t, torch, sf, TV, ms, ta, pre: ms(
            *_files(t, torch, sf, {"w": torch.full((4,), 6e4, dtype=torch.float16)},
                    {"w": torch.full((4,), 6.5e4, dtype=torch.float16)}), scaling=8.0, progress=False))),
        ("int8 tensor changed between checkpoints", "ValueError", merging(lambda t, torch, sf, TV, ms, ta, pre: ms(
            *_files(t, torch, sf, pre, {**pre, "i": torch.ones(2, dtype=torch.int8)}), progress=False))),
        ("checkpoints with no tensors", "ValueError", merging(lambda t, torch, sf, TV, ms, ta, pre: ms(
            *_files(t, torch, sf, {}, {}), progress=False))),
    ],
    "CLI mistake -> one line": [
        ("bench --epochs 0", "exit 2", ["bench", "--epochs", "0", "--quiet"]),
        ("pretrain --epochs 0", "exit 2", ["pretrain", "--epochs", "0"]),
        ("non-UTF-8 config", "exit 2", lambda t: (t / "latin.json").write_bytes(b'{"name": "caf\xe9"}') and
         expect_exit(["run", str(t / "latin.json"), "--dry-run"])(t)),
        ("--out is a file", "exit 2", expect_exit(lambda t: ["run", config_file(t, "o"), "--out", "/proc/version"])),
        ("pretrain --cache-dir is a file", "exit 2", ["pretrain", "--cache-dir", "/proc/version"]),
        ("report on a missing folder", "exit 2", ["report", "/no/such/results"]),
        ("config file missing", "exit 2", ["run", "/no/such/config.json"]),
    ],
    "concurrency and interruption (real processes)": [
        ("two runners on one --out", "each run computed once", two_processes),
        ("kill -9 mid-experiment, then resume", "completed runs kept, the rest computed", sigkill_resume),
    ],
    "stored results": [
        ("corrupt result.json (6 contents)", "re-run, identical result, summary kept", corrupt_results),
        ("two experiments share --out", "both rows kept", shared_out),
        ("temp files of a killed write", "removed on the next run", temp_files),
        ("truncated safetensors checkpoint", "ValueError naming the file", expect_raise(
            lambda t: (t / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}") and __import__(
                "avalanche_merge.models.pretrain", fromlist=["load_checkpoint"]).load_checkpoint(t / "x.safetensors"))),
    ],
}


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("AVALANCHE_MERGE_CACHE", tempfile.mkdtemp(prefix="probe-cache-"))
    rows = []
    for cls, probes in PROBES.items():
        for name, expect, probe in probes:
            with tempfile.TemporaryDirectory() as d:
                tmp = Path(d) / "work"
                tmp.mkdir()
                if isinstance(probe, list):
                    probe = expect_exit(probe)
                try:
                    verdict, detail = probe(tmp)
                except BaseException as exc:  # noqa: BLE001
                    verdict, detail = "traceback", f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append({"class": cls, "probe": name, "expect": expect, "verdict": verdict, "observed": detail})
            print(f"[{verdict:>13}] {cls} | {name}: {detail}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "probes.json").write_text(json.dumps(rows, indent=2))
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["class"], {}).setdefault(r["verdict"], 0)
        counts[r["class"]][r["verdict"]] += 1
    lines = ["| class | probes | ok | traceback | code executed | silent |", "|---|---|---|---|---|---|"]
    for cls, c in counts.items():
        lines.append(f"| {cls} | {sum(c.values())} | {c.get('ok', 0)} | {c.get('traceback', 0)} | "
                     f"{c.get('code executed', 0)} | {c.get('silent', 0)} |")
    lines += ["", "| class | probe | expected | verdict | observed |", "|---|---|---|---|---|"]
    lines += [f"| {r['class']} | {r['probe']} | {r['expect']} | {r['verdict']} | "
              f"{r['observed'].replace('|', '/')} |" for r in rows]
    (OUT / "probes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(counts) + 2]))
    sys.exit(0 if all(r["verdict"] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    main()
