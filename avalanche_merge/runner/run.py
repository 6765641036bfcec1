"""Execute one planned run with an Avalanche strategy, EvaluationPlugin and loggers; store its JSON atomically."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..evaluation.matrix import summarize_matrix
from .plan import RunPlan
from .precision import enable_mixed_precision, peak_gpu_memory, reset_peak_gpu_memory

RAM_SAMPLE_S = 0.05  # Avalanche's RAM-usage sampling period (seconds)
_EXP_ACC = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_json_default)


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine a run's numbers."""
    out = {"python": platform.python_version()}
    for dist in ("avalanche-merge", "avalanche-lib", "torch", "torchvision", "numpy", "scikit-learn", "peft",
                 "open_clip_torch", "mlxtend"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@contextmanager
def peak_rss_sampler(interval: float = 0.05):
    """Track the process's peak resident memory (MiB) while the block runs; yields a dict with ``peak_mb``."""
    import psutil

    proc = psutil.Process()
    state = {"peak_mb": proc.memory_info().rss / 2**20}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            state["peak_mb"] = max(state["peak_mb"], proc.memory_info().rss / 2**20)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join()
        state["peak_mb"] = max(state["peak_mb"], proc.memory_info().rss / 2**20)


def accuracy_row(results: dict, n_experiences: int) -> list[float]:
    """Per-experience test accuracies from the dict returned by ``strategy.eval(test_stream)``."""
    row = [None] * n_experiences
    for key, value in results.items():
        m = _EXP_ACC.match(key)
        if m:
            row[int(m.group(1))] = float(value)
    missing = [j for j, v in enumerate(row) if v is None]
    if missing:
        raise RuntimeError(f"evaluation returned no accuracy for experiences {missing}")
    return row


def _make_loggers(names: tuple[str, ...], run_dir: Path):
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger

    loggers, files = [], []
    for name in names:
        if name == "interactive":
            loggers.append(InteractiveLogger())
        elif name == "text":
            f = open(run_dir / "log.txt", "w")  # noqa: SIM115 - closed after the run
            files.append(f)
            loggers.append(TextLogger(f))
        elif name == "csv":
            loggers.append(CSVLogger(log_folder=str(run_dir / "csv")))
        elif name == "tensorboard":
            loggers.append(TensorboardLogger(tb_log_dir=str(run_dir / "tb")))
    return loggers, files


def make_evaluator(loggers: list, extra_metrics: list | None = None):
    """Avalanche ``EvaluationPlugin`` with accuracy, forgetting, BWT, timing and RAM metrics, within-task accuracy
    (argmax over the sample's own experience's classes), and retrieval accuracy for strategies that expose a
    router (none for the others); ``extra_metrics`` come last."""
    from avalanche.evaluation.metrics import (
        accuracy_metrics,
        bwt_metrics,
        forgetting_metrics,
        ram_usage_metrics,
        timing_metrics,
    )
    from avalanche.training.plugins import EvaluationPlugin

    from ..evaluation.retrieval import retrieval_metrics
    from ..evaluation.within_task import within_task_metrics

    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        timing_metrics(epoch=True, experience=True),
        # Avalanche joins its sampling thread at the end of every phase, waiting up to ``every`` seconds: 0.5 s
        # cost about 2 s of idle wall per 5-experience run; peak_rss_mb is sampled by the runner anyway
        ram_usage_metrics(every=RAM_SAMPLE_S, experience=True),
        *retrieval_metrics(),
        *within_task_metrics(),
        *(extra_metrics or []),
        loggers=loggers,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch through Avalanche's RNG manager."""
    from avalanche.training.determinism.rng_manager import RNGManager

    RNGManager.set_random_seeds(seed)
    torch.manual_seed(seed)


def _count_trained(strategy) -> int:
    opt = getattr(strategy, "optimizer", None)
    if opt is None:
        return 0
    seen = {id(p): p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad}
    return int(sum(seen.values()))


def loader_kwargs(plan: RunPlan) -> dict:
    """DataLoader arguments for ``strategy.train`` / ``strategy.eval`` (none at the defaults, so that runs
    without them call Avalanche exactly as before)."""
    out: dict = {}
    if plan.num_workers:
        out["num_workers"] = plan.num_workers
        out["persistent_workers"] = True  # workers survive across the epochs of an experience
    if plan.pin_memory is not None:
        out["pin_memory"] = plan.pin_memory
    return out


def execute_run(plan: RunPlan, run_dir: Path) -> dict:
    """Train ``plan``'s method over its benchmark, evaluating the test stream after every experience.

    Returns:
        The run's result record (also what :func:`store_result` writes): accuracy matrix ``R[i][j]``, the
        pretrained row, summary metrics, Avalanche's last metrics, config, seed, versions, timings, peak RAM,
        peak GPU memory (None off CUDA), precision and the number of trained parameters.
    """
    from ..benchmarks import BENCHMARKS
    from ..models import BACKBONES
    from ..strategies import METHODS
    from ..strategies.registry import BuildContext

    wall0, cpu0 = time.perf_counter(), time.process_time()
    run_dir.mkdir(parents=True, exist_ok=True)
    reset_peak_gpu_memory(plan.device)
    seed_everything(plan.seed)
    benchmark = BENCHMARKS.get(plan.benchmark).build(plan.benchmark_options, plan.seed)
    model = BACKBONES.get(plan.model).build(plan.model_options, benchmark, plan.seed)
    seed_everything(plan.seed)
    loggers, files = _make_loggers(plan.loggers, run_dir)
    analysis_plugins = []
    if plan.analysis is not None:
        from .analysis import analysis_plugins as make_analysis_plugins

        bspec = BENCHMARKS.get(plan.benchmark)
        held_out = (bspec.held_out(plan.benchmark_options, plan.seed, list(plan.analysis.held_out_domains),
                                   plan.analysis.held_out_samples) if plan.analysis.held_out_domains else None)
        analysis_plugins = make_analysis_plugins(plan.analysis, benchmark, held_out, plan.seed)
    try:
        protocol_plugins = []
        if plan.protocol in ("masked", "per_task", "frozen"):
            from ..plugins.protocol import HeadProtocolPlugin

            protocol_plugins.append(HeadProtocolPlugin(protocol=plan.protocol, prototypes=plan.prototypes))
        fomo_record, fomo_metric, budget_plugin, steps = None, None, None, None
        if plan.fomo is not None:  # zero-shot point, stream order, measured budget; then re-seed (see budget.py)
            from ..evaluation.continual import ContinualMetricsPluginMetric
            from ..plugins.protocol import HeadProtocolPlugin
            from .budget import prepare_fomo

            fomo_held = BENCHMARKS.get(plan.benchmark).held_out(plan.benchmark_options, plan.seed,
                                                               list(plan.fomo.held_out_domains),
                                                               plan.fomo.held_out_samples)
            probe_plugins = [HeadProtocolPlugin(protocol=plan.protocol, prototypes=plan.prototypes)
                             for _ in protocol_plugins]
            benchmark, fomo_record, steps = prepare_fomo(plan, benchmark, model, fomo_held, probe_plugins)
            fomo_metric = ContinualMetricsPluginMetric(held_out=fomo_held, held_out_samples=plan.fomo.held_out_samples,
                                                       seed=plan.seed)
            analysis_plugins = [*analysis_plugins, fomo_metric]
            seed_everything(plan.seed)
        evaluator = make_evaluator(loggers, analysis_plugins)
        ctx = BuildContext(model=model, benchmark=benchmark, train=plan.train, evaluator=evaluator,
                           plugins=protocol_plugins, device=torch.device(plan.device), seed=plan.seed)
        if steps is not None:
            from .budget import with_budget

            ctx, budget_plugin = with_budget(ctx, steps)
        spec = METHODS.get(plan.method)
        strategy = spec.build(ctx, plan.method_options)
        enable_mixed_precision(strategy, plan.precision)
        loader = loader_kwargs(plan)
        n = benchmark.n_experiences
        test_stream = benchmark.test_stream
        train_time = eval_time = 0.0
        setup_time = time.perf_counter() - wall0

        def evaluate() -> dict:
            nonlocal eval_time
            t0 = time.perf_counter()
            out = strategy.eval(test_stream, **loader)
            eval_time += time.perf_counter() - t0
            return out

        with peak_rss_sampler() as rss:
            pretrained_row = None
            if plan.eval_pretrained and spec.pretrained_eval:
                pretrained_row = accuracy_row(evaluate(), n)
            matrix = []
            for exp in [benchmark.train_stream] if spec.trains_once else benchmark.train_stream:
                t0 = time.perf_counter()
                strategy.train(exp, **loader)
                train_time += time.perf_counter() - t0
                last = evaluate()
                matrix.append(accuracy_row(last, n))
    finally:
        for f in files:
            f.close()
    avalanche_metrics = {k: float(v) for k, v in last.items()
                         if isinstance(v, (int, float)) and math.isfinite(float(v))}
    extra = {}
    info = {type(p).__name__: p.method_info() for p in getattr(strategy, "plugins", [])
            if callable(getattr(p, "method_info", None))}
    if info:  # what a method reports about itself, e.g. the capacity each sparse task got
        extra["method_info"] = info
    if plan.analysis is not None:
        from .analysis import analysis_record

        extra["analysis"] = analysis_record([p for p in analysis_plugins if p is not fomo_metric])
    if fomo_record is not None:
        from .fomo import fomo_curves

        continual = fomo_metric.result()
        fomo_record.update(fomo_curves(fomo_record["zero_shot"], continual),
                           held_out_names=list(plan.fomo.held_out_domains),
                           held_out_accuracy=continual.get("held_out_accuracy"))
        if budget_plugin is not None:
            fomo_record["steps_taken"] = list(budget_plugin.steps_taken)
        extra["fomo"] = fomo_record
    return {
        "run_id": plan.run_id,
        "status": "complete",
        "benchmark": plan.benchmark,
        "method": plan.method,
        "label": plan.label,
        "protocol": plan.protocol,
        "seed": plan.seed,
        "config": plan.describe(),
        "config_hash": plan.config_hash,
        "experience_names": benchmark.experience_names,
        "scenario_type": benchmark.scenario_type,
        "accuracy_matrix": matrix,
        "pretrained_accuracy": pretrained_row,
        "metrics": {k: (None if math.isnan(v) else v) for k, v in summarize_matrix(matrix).items()},
        "avalanche_metrics": avalanche_metrics,
        "train_time_s": train_time,
        "eval_time_s": eval_time,  # every evaluation of the test stream, the pretrained row included
        "setup_time_s": setup_time,  # data, model, loggers and strategy built before the first evaluation
        "wall_time_s": time.perf_counter() - wall0,
        "cpu_time_s": time.process_time() - cpu0,  # every thread of the worker: comparable on a busy machine
        "peak_rss_mb": rss["peak_mb"],
        "peak_gpu_mb": peak_gpu_memory(plan.device),
        "precision": plan.precision,
        "trainable_params": _count_trained(strategy),
        "versions": package_versions(),
        "worker": {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads()},
        "argv": sys.argv,
        "benchmark_info": benchmark.info,
        **extra,
    }
