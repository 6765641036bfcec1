"""Experiment runner: configs as data, one run per (benchmark, method, seed), summaries and plots."""

from .plan import ExperimentConfig, RunPlan, load_experiment, plan_experiment
from .suite import run_experiment

__all__ = ["ExperimentConfig", "RunPlan", "load_experiment", "plan_experiment", "run_experiment"]
