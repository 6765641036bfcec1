"""Shared fixtures: a tiny experiment that any registered method can run in seconds on CPU."""

import pytest

TINY_MODEL = {"name": "tiny_vit",
              "options": {"pretrained": True, "dim": 16, "depth": 1, "heads": 2, "pretrain_epochs": 5}}
TINY_BENCHMARK = {"name": "split_digits", "options": {"n_experiences": 2, "max_train_per_class": 30}}
TINY_TRAIN = {"epochs": 3, "batch_size": 16, "eval_batch_size": 128, "lr": 2e-3}
#: a tiny random open_clip model (32x32 RGB inputs)
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
RGB_CLASSES = ("cat", "dog", "car", "tree")


def rgb_image_folder(root, per_class: int = 6, seed: int = 0) -> str:
    """An ImageFolder tree of small random RGB PNGs, one sub-folder per class of ``RGB_CLASSES``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(RGB_CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


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
