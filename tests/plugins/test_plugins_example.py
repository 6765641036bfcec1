"""The snippets of docs/guide/plugins.md, run from examples/plugins_own_model.py."""

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugins_own_model.py"


@pytest.fixture(scope="module")
def example():
    return runpy.run_path(str(EXAMPLE), run_name="example")


def test_resume_snippet_is_bit_identical(example):
    assert example["resume"]() is True


def test_routed_snippet_routes_far_above_chance(example):
    # 10 classes: chance 0.1; a model that forgot every earlier task scores about 0.2
    assert example["routed"]() > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["merge", "lora", "sparse"])
def test_family_snippets_run(example, name):
    acc = example[name]()
    assert 0.0 <= acc <= 1.0
