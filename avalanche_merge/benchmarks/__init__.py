"""Continual-learning benchmarks: offline ones from data shipped in packages, and local-file wrappers."""

from . import classic, image_folder, offline, task_folders  # noqa: F401 - each module registers its benchmarks
from .base import Benchmark, as_classification_dataset, make_scenario, tensor_classification_dataset
from .registry import BENCHMARKS, BenchmarkSpec, build_benchmark, list_benchmarks, register_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkSpec", "as_classification_dataset", "build_benchmark",
           "list_benchmarks", "make_scenario", "register_benchmark", "tensor_classification_dataset"]
