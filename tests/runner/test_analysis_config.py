"""The optional ``analysis`` section of an experiment config: validation, run identity, and the stored record."""

import json

import numpy as np
import pytest
from conftest import tiny_experiment

from avalanche_merge.config import ConfigError
from avalanche_merge.runner import load_experiment, plan_experiment, run_experiment


def _plans(**analysis):
    cfg = tiny_experiment(["naive"], analysis=analysis) if analysis is not None else tiny_experiment(["naive"])
    return plan_experiment(load_experiment(cfg))


def test_run_identity_is_unchanged_without_analysis_and_changes_with_it():
    plain = plan_experiment(load_experiment(tiny_experiment(["naive"])))[0]
    assert "analysis" not in plain.describe()
    with_analysis = _plans(probe_samples=16)[0]
    assert with_analysis.describe()["analysis"]["probe_samples"] == 16
    assert with_analysis.run_id != plain.run_id
    assert with_analysis.run_id != _plans(probe_samples=32)[0].run_id


@pytest.mark.parametrize("analysis,match", [
    ({"probe_samples": 2}, "probe_samples must be >= 4"),
    ({"pool": "max"}, "pool must be one of"),
    ({"held_out_samples": 15}, "multiple of 10"),
    ({"density": 0.0}, "density"),
    ({"held_out_domains": ["no_such_domain"]}, "no_such_domain"),
    ({"held_out_domains": ["invert", "invert"]}, "distinct"),
    ({"unknown_key": 1}, "unknown_key"),
])
def test_bad_analysis_options_raise(analysis, match):
    with pytest.raises(ConfigError, match=match):
        _plans(**analysis)


def test_held_out_domains_must_not_be_trained_on():
    cfg = tiny_experiment(["naive"], benchmark={"name": "domain_mnist", "options": {"domains": ["invert", "blur"]}},
                          analysis={"held_out_domains": ["identity", "blur"]})
    with pytest.raises(ConfigError, match="'blur' is trained on"):
        plan_experiment(load_experiment(cfg))


def test_analysis_record_is_stored(tmp_path):
    cfg = tiny_experiment(["naive"], analysis={"held_out_domains": ["identity"], "held_out_samples": 20,
                                               "probe_samples": 16})
    results, _ = run_experiment(load_experiment(cfg), tmp_path, progress=False)
    stored = json.loads(next((tmp_path / "runs").glob("*/result.json")).read_text())
    a = stored["analysis"]
    assert set(a) == {"continual", "geometry", "drift"}
    np.testing.assert_allclose(a["continual"]["accuracy_matrix"], stored["accuracy_matrix"], atol=1e-12)
    np.testing.assert_allclose(a["continual"]["pretrained_accuracy"], stored["pretrained_accuracy"], atol=1e-12)
    assert a["continual"]["held_out_names"] == ["identity"]
    assert len(a["geometry"]["step_cosine"]) == 2 and a["drift"]["layers"] == ["blocks.0"]
    assert stored["avalanche_metrics"]["CL_Forgetting/eval_phase/test_stream"] == pytest.approx(
        stored["metrics"]["forgetting"])
