"""Shared fixtures: a tiny experiment that any registered method can run in seconds on CPU."""

import pytest

TINY_MODEL = {"name": "tiny_vit",
              "options": {"pretrained": True, "dim": 16, "depth": 1, "heads": 2, "pretrain_epochs": 5}}
TINY_BENCHMARK = {"name": "split_digits", "options": {"n_experiences": 2, "max_train_per_class": 30}}
TINY_TRAIN = {"epochs": 3, "batch_size": 16, "eval_batch_size": 128, "lr": 2e-3}


def tiny_experiment(methods, *, seeds=(0,), benchmark=None, **overrides) -> dict:
    """A JSON-style experiment config over the tiny benchmark and model."""
    config = {
        "name": "tiny",
        "benchmarks": [benchmark or TINY_BENCHMARK],
        "methods": list(methods),
        "seeds": list(seeds),
        "train": dict(TINY_TRAIN),
        "model": TINY_MODEL,
        "loggers": [],
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Pretrained checkpoints of the test session go to a temporary cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AVALANCHE_MERGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
