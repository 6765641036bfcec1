"""The ``avalanche-merge`` command: ``list``, ``describe METHOD``, ``run CONFIG``, ``bench``, ``summarize OUT``,
``pretrain`` and ``report RESULTS_DIR``."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from .config import ConfigError


def _cmd_list(args: argparse.Namespace) -> int:
    from .benchmarks import BENCHMARKS
    from .models import BACKBONES
    from .strategies import METHODS

    print("benchmarks:")
    for name in BENCHMARKS.names():
        spec = BENCHMARKS.get(name)
        where = "offline" if spec.offline else "needs dataset_root"
        print(f"  {name:<16} [{spec.scenario}, {where}] {spec.description}")
    print("backbones:")
    for name in BACKBONES.names():
        spec = BACKBONES.get(name)
        print(f"  {name:<16} [{'offline' if spec.offline else 'needs local weights'}] {spec.description}")
    print("methods:")
    for name in METHODS.names():
        spec = METHODS.get(name)
        protocol = spec.protocol + ("+prototypes" if spec.prototypes else "")
        tags = [spec.kind, spec.family, f"protocol: {protocol}"] + ([f"base: {spec.base}"] if spec.base else [])
        tags += [] if spec.in_bench else ["not in bench"]
        print(f"  {name:<16} [{', '.join(tags)}] {spec.description}")
        if getattr(args, "verbose", False):
            from .options_doc import format_options

            print(format_options(spec.config_cls, indent=" " * 20))
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    from .options_doc import format_options
    from .strategies import METHODS
    from .strategies.registry import TrainConfig

    try:
        spec = METHODS.get(args.method)
    except ValueError as exc:  # an unknown name: the message lists the valid ones
        print(f"avalanche-merge: {exc}", file=sys.stderr)
        return 2
    protocol = spec.protocol + ("+prototypes" if spec.prototypes else "")
    print(f"{spec.name}: {spec.description}")
    print(f"  family: {spec.family}; kind: {spec.kind}" + (f" (inside {spec.base})" if spec.base else "")
          + f"; head protocol: {protocol}; scenarios: {', '.join(spec.scenarios)}"
          + ("" if spec.in_bench else "; not in bench"))
    if spec.protocols:
        print(f"  protocols a config may choose: {', '.join(spec.protocols)}")
    print(f"options ({spec.config_cls.__name__}; a config's \"methods\": [{{\"name\": \"{spec.name}\", "
          "\"options\": {...}}]):")
    print(format_options(spec.config_cls))
    if args.train:
        print("shared train settings (a config's \"train\"):")
        print(format_options(TrainConfig))
    return 0


def _formats(text: str) -> tuple[str, ...]:
    from .analysis.plots import check_formats

    try:
        return check_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _finish(results: list[dict], rows: list[dict], out: Path, t0: float, *, planned: int | None = None) -> int:
    """Print the table; exit status 1 when some planned runs did not complete (``--keep-going``)."""
    from .runner.suite import print_table

    if rows:
        print_table(rows)
    where = f"summary: {out / 'summary.csv'}, {out / 'summary.md'}; plots: {out / 'plots'}"
    print(f"{len(results)} runs; " + (where if (out / "summary.csv").is_file() else "no folder summary yet"))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    if planned is not None and len(results) < planned:
        print(f"avalanche-merge: {planned - len(results)} of {planned} runs failed (their error.json files say why)",
              file=sys.stderr)
        return 1
    return 0


def _check_out(out: str) -> None:
    """Refuse an ``--out`` that is a file or cannot be written, before any work."""
    from .atomic import folder_problem

    problem = folder_problem(out)
    if problem:
        raise ConfigError(f"--out: {out} {problem}")


def _grid_options(args: argparse.Namespace, *, default_jobs: int) -> dict:
    """``--jobs``, ``--shard``, ``--threads``, ``--claim-ttl`` and the backend flags, checked before any work."""
    from .runner.claims import check_ttl
    from .runner.cluster import parse_params
    from .runner.parallel import check_jobs, check_threads, parse_shard

    jobs = check_jobs(default_jobs if args.jobs is None else args.jobs)
    shard = parse_shard(args.shard) if args.shard is not None else None
    threads = check_threads(args.threads)
    try:
        claim_ttl = check_ttl(args.claim_ttl)
    except ValueError as exc:
        raise ConfigError(f"--claim-ttl: {exc}") from None
    params = parse_params(args.executor_param)
    if args.backend == "submitit" and shard is not None:
        raise ConfigError("--shard: the submitit backend makes its own shards (one array task per --jobs)")
    if args.backend != "submitit" and (params or args.no_wait or args.cluster != "auto"):
        raise ConfigError("--cluster, --executor-param and --no-wait need --backend submitit")
    return {"jobs": jobs, "shard": shard, "threads": threads, "claim_ttl": claim_ttl, "params": params}


def _execute(config, args: argparse.Namespace, grid: dict, t0: float) -> int:
    """Run ``config`` here (``--jobs`` processes, ``--shard``) or submit it as a job array (``--backend``)."""
    from .runner import plan_experiment, run_experiment
    from .runner.parallel import select_shard

    out = Path(args.out)
    plans = plan_experiment(config)
    planned = len(select_shard(plans, grid["shard"]) if grid["shard"] else plans)
    if args.backend == "submitit":
        return _submit(config, args, grid, plans, t0)
    results, rows = run_experiment(config, out, progress=not args.quiet, keep_going=args.keep_going,
                                   jobs=grid["jobs"], shard=grid["shard"], threads=grid["threads"],
                                   claim_ttl=grid["claim_ttl"], plots=args.format)
    return _finish(results, rows, out, t0, planned=planned)


def _submit(config, args: argparse.Namespace, grid: dict, plans: list, t0: float) -> int:
    from .runner.cluster import submit_grid
    from .runner.preflight import preflight
    from .runner.suite import load_result, write_folder_summary

    out = Path(args.out)
    preflight(plans)  # before anything is queued
    jobs = submit_grid(config, out, jobs=grid["jobs"], cluster=args.cluster, params=grid["params"],
                       threads=grid["threads"], claim_ttl=grid["claim_ttl"], keep_going=args.keep_going)
    print(f"submitted {len(jobs)} array tasks (job {jobs[0].job_id}); logs under {out / 'submitit'}")
    if args.no_wait:
        print(f"the last task writes the summary; any time: avalanche-merge summarize {out}")
        return 0
    failed = 0
    for job in jobs:
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - a task's failure is reported, the others are still collected
            failed += 1
            print(f"avalanche-merge: array task {job.job_id} failed: {str(exc).strip()[-2000:]}", file=sys.stderr)
    write_folder_summary(out, plots=args.format)
    results = [r for r in (load_result(out, p, quiet=True) for p in plans) if r is not None]
    from .runner.summary import summarize

    code = _finish(results, summarize(results) if results else [], out, t0, planned=len(plans))
    return 1 if failed else code


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import parse_assignments
    from .runner import load_experiment

    t0 = time.perf_counter()
    grid = _grid_options(args, default_jobs=1)
    config = load_experiment(args.config, parse_assignments(args.set))
    if args.dry_run:
        from .runner import plan_experiment
        from .runner.parallel import select_shard
        from .runner.preflight import preflight

        plans = plan_experiment(config)
        preflight(plans)
        mine = select_shard(plans, grid["shard"]) if grid["shard"] else plans
        print(f"config OK: {len(plans)} runs" + (f"; shard {grid['shard'][0]}/{grid['shard'][1]}: {len(mine)}"
                                                  if grid["shard"] else ""))
        for p in mine:
            print(f"  {p.run_id}")
        return 0
    _check_out(args.out)
    return _execute(config, args, grid, t0)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .runner.bench import bench_config, default_bench_jobs

    t0 = time.perf_counter()
    grid = _grid_options(args, default_jobs=default_bench_jobs())
    methods, benchmarks = _name_list("--methods", args.methods), _name_list("--benchmarks", args.benchmarks)
    if methods and args.full:
        raise ConfigError("--full and --methods: choose one (--full is every bench method)")
    _check_out(args.out)
    config = bench_config(seeds=args.seeds, epochs=args.epochs, methods=methods, benchmarks=benchmarks,
                          full=args.full)
    return _execute(config, args, grid, t0)


def _cmd_summarize(args: argparse.Namespace) -> int:
    from .runner.suite import write_folder_summary

    out = Path(args.results_dir)
    if not (out / "runs").is_dir():
        print(f"avalanche-merge: no stored runs under {out} (expected {out / 'runs'})", file=sys.stderr)
        return 2
    n = write_folder_summary(out, plots=False if args.no_plots else args.format)
    if n == 0:
        print(f"avalanche-merge: no complete run under {out / 'runs'}", file=sys.stderr)
        return 1
    print((out / "summary.md").read_text(), end="")
    print(f"{n} runs; summary: {out / 'summary.csv'}, {out / 'summary.md'}"
          + ("" if args.no_plots else f"; plots: {out / 'plots'}"))
    return 0


def _name_list(flag: str, value: str | None) -> list[str] | None:
    """A comma-separated CLI list (None when the flag is absent); an empty list or name is an error."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")]
    if not any(names) or not all(names):
        raise ConfigError(f"{flag}: expected comma-separated names, got {value!r}")
    return names


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .models.pretrain import PretrainConfig, pretrained_tiny_vit

    try:
        config = PretrainConfig(epochs=args.epochs)
    except ValueError as exc:
        raise ConfigError(f"--epochs: {exc}") from None
    from .atomic import folder_problem

    problem = folder_problem(args.cache_dir) if args.cache_dir is not None else None
    if problem:
        raise ConfigError(f"--cache-dir: {args.cache_dir} {problem}")
    _, meta = pretrained_tiny_vit(config, cache_dir=args.cache_dir)
    print(f"checkpoint: {meta['path']} (clean training accuracy {100 * meta['train_acc_clean']:.1f}%)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import generate_report

    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        print(f"avalanche-merge: no such results folder: {results_dir}", file=sys.stderr)
        return 2
    try:
        info = generate_report(results_dir, args.out, progress=not args.quiet, formats=args.format)
    except FileNotFoundError as exc:
        print(f"avalanche-merge: {exc}", file=sys.stderr)
        return 2
    print(f"report: {info['report']} ({info['runs']} runs, {len(info['rows'])} rows, {len(info['plots'])} plots "
          f"under {info['report'].parent / 'plots'}); table: {info['csv']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avalanche-merge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="list benchmarks, backbones and methods")
    lst.add_argument("--verbose", "-v", action="store_true", help="also list each method's options and defaults")
    lst.set_defaults(func=_cmd_list)
    desc = sub.add_parser("describe", help="a method's family, protocol, options (type, default, range, help)")
    desc.add_argument("method", help="registered method name (see `avalanche-merge list`)")
    desc.add_argument("--train", action="store_true", help="also list the shared train settings")
    desc.set_defaults(func=_cmd_describe)
    fmt_help = "figure formats, comma-separated: png, pdf, svg (default: png)"

    def common(p: argparse.ArgumentParser, *, jobs_help: str) -> None:
        p.add_argument("--out", default="results", help="results folder (default: results/)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--keep-going", action="store_true", help="record failing runs and continue")
        p.add_argument("--format", type=_formats, default=("png",), help=fmt_help)
        g = p.add_argument_group("parallel and sharded grids (docs/guide/running_grids.md)")
        g.add_argument("--jobs", type=int, default=None, help=jobs_help)
        g.add_argument("--shard", default=None, metavar="K/N",
                       help="compute only the K-th of N parts of the plan (other workers, on any machine sharing "
                            "--out, take the others)")
        g.add_argument("--threads", type=int, default=None,
                       help="torch/BLAS threads per worker (default: cores // jobs with several jobs)")
        g.add_argument("--claim-ttl", type=float, default=300.0, metavar="SECONDS",
                       help="a worker's claim on a run expires after this long without heartbeat (default 300)")
        g.add_argument("--backend", choices=("local", "submitit"), default="local",
                       help="local: this machine; submitit: a job array of --jobs shard workers (SLURM or local)")
        g.add_argument("--cluster", choices=("auto", "slurm", "local", "debug"), default="auto",
                       help="submitit's executor (default auto: SLURM when available)")
        g.add_argument("--executor-param", action="append", metavar="KEY=VALUE",
                       help="a submitit parameter, e.g. timeout_min=60, slurm_partition=gpu (repeatable)")
        g.add_argument("--no-wait", action="store_true", help="submitit: return once the array is submitted")

    run = sub.add_parser("run", help="run an experiment config (JSON)")
    run.add_argument("config", help="path of the experiment JSON")
    run.add_argument("--dry-run", action="store_true", help="validate the config and list its runs")
    run.add_argument("--set", action="append", metavar="NAME=VALUE",
                     help="value of a ${NAME} in the config (default: the environment variable NAME); repeatable")
    common(run, jobs_help="worker processes, one run each (default 1; with --backend submitit: array tasks)")
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser("bench", help="the offline suite: representative methods of every family and the Avalanche "
                                         "baselines (--full: every bench method)")
    bench.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    bench.add_argument("--epochs", type=int, default=2, help="epochs per experience (default 2)")
    bench.add_argument("--methods", help="comma-separated subset of methods")
    bench.add_argument("--benchmarks", help="comma-separated subset of offline benchmarks")
    bench.add_argument("--full", action="store_true", help="every bench-enabled method (the full table)")
    common(bench, jobs_help="worker processes, one run each (default: this machine's cores, at most 8)")
    bench.set_defaults(func=_cmd_bench)

    summ = sub.add_parser("summarize", help="(re)write a results folder's summary and plots from its stored runs")
    summ.add_argument("results_dir", help="results folder (with runs/<run_id>/result.json)")
    summ.add_argument("--no-plots", action="store_true", help="summary.csv and summary.md only")
    summ.add_argument("--format", type=_formats, default=("png",), help=fmt_help)
    summ.set_defaults(func=_cmd_summarize)

    pre = sub.add_parser("pretrain", help="pretrain (or find in the cache) the offline tiny_vit backbone")
    pre.add_argument("--epochs", type=int, default=40)
    pre.add_argument("--cache-dir", default=None)
    pre.set_defaults(func=_cmd_pretrain)

    rep = sub.add_parser("report", help="tables, correlations and plots of an experiment's stored runs")
    rep.add_argument("results_dir", help="results folder of an experiment (with runs/<run_id>/result.json)")
    rep.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/report)")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")
    rep.add_argument("--format", type=_formats, default=("png",), help=fmt_help)
    rep.set_defaults(func=_cmd_report)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from .notices import quiet_avalanche_notices

    quiet_avalanche_notices()  # Avalanche's QP-solver and deprecation notices
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill ends like Ctrl-C: completed runs summarised
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"avalanche-merge: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: completed runs are saved; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
