"""zeroshot (open_clip text head over the seen classes) and pretrained_head (tiny_vit's frozen head)."""

import numpy as np
import pytest
import torch
from conftest import OPEN_CLIP_TINY, RGB_CLASSES, rgb_image_folder, tiny_experiment

from avalanche_merge.config import ConfigError
from avalanche_merge.models.clip import build_zero_shot_head, load_open_clip
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.runner.run import execute_run
from avalanche_merge.tta.config import resolve_templates


def _plan(tmp_path, method, templates="primer"):
    bench = {"name": "image_folder", "options": {"dataset_root": rgb_image_folder(tmp_path / "img"),
                                                 "n_experiences": 2, "image_size": 32}}
    model = {"name": "open_clip", "options": {"model_name": "tiny", "model_cfg": OPEN_CLIP_TINY}}
    entry = {"name": method, "options": {"templates": templates}} if method == "zeroshot" else method
    (plan,) = plan_experiment(load_experiment(tiny_experiment([entry], benchmark=bench, model=model)))
    return plan


def test_zeroshot_on_a_backbone_without_a_text_tower_fails_at_plan_time():
    with pytest.raises(ConfigError, match="text tower.*tiny_vit.*pretrained_head"):
        plan_experiment(load_experiment(tiny_experiment(["zeroshot"])))


def test_zeroshot_head_is_rebuilt_over_the_seen_classes_with_the_chosen_templates(tmp_path):
    from avalanche_merge.benchmarks import BENCHMARKS
    from avalanche_merge.models import BACKBONES
    from avalanche_merge.runner.run import make_evaluator
    from avalanche_merge.strategies import METHODS
    from avalanche_merge.strategies.registry import BuildContext, TrainConfig

    plan = _plan(tmp_path, "zeroshot", templates="simple_imagenet")
    bench = BENCHMARKS.get(plan.benchmark).build(plan.benchmark_options, 0)
    model = BACKBONES.get("open_clip").build(plan.model_options, bench, 0)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    ctx = BuildContext(model=model, benchmark=bench, train=TrainConfig(), evaluator=make_evaluator([]))
    strategy = METHODS.get("zeroshot").build(ctx, plan.method_options)
    torch.manual_seed(0)  # random weights: the draw of the backbone built with seed 0
    clip, _, tok = load_open_clip("tiny", model_cfg=OPEN_CLIP_TINY)
    names = list(bench.class_names)
    full = build_zero_shot_head(clip, tok, names, resolve_templates("simple_imagenet"))
    assert torch.allclose(model.head.weight, full, atol=1e-5)  # templates of the method, not the backbone's
    strategy.train(bench.train_stream[0])
    seen = sorted(bench.train_stream[0].classes_in_this_experience)
    assert strategy.seen == seen and strategy.head_builds == 2
    rows = build_zero_shot_head(clip, tok, [names[c] for c in seen], resolve_templates("simple_imagenet"))
    assert torch.allclose(model.head.weight[seen], rows, atol=1e-5)
    ds = bench.test_stream[1].dataset
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    zeros = torch.zeros(len(x), dtype=torch.long)
    strategy.mbatch, strategy.experience = [x, zeros, zeros], bench.test_stream[1]
    strategy.is_training = False
    with torch.no_grad():
        out = strategy.forward()
    assert set(out.argmax(1).tolist()) <= set(seen)  # unseen classes are never predicted
    assert torch.allclose(out[:, seen], model(x)[:, seen])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no optimizer step


def test_zeroshot_runs_end_to_end_without_training(tmp_path):
    result = execute_run(_plan(tmp_path, "zeroshot"), tmp_path / "run")
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == (2, 2) and result["trainable_params"] == 0
    assert R[0, 1] == 0.0  # experience 1's classes are not seen after experience 0
    assert np.allclose(R[1], result["pretrained_accuracy"])  # all classes seen = the all-class head
    assert len(RGB_CLASSES) == 4


def test_pretrained_head_is_the_frozen_pretrained_head_restricted_to_seen_classes(tmp_path):
    (plan,) = plan_experiment(load_experiment(tiny_experiment(["pretrained_head"])))
    assert plan.protocol == "frozen" and plan.model_options.head == "pretrained"
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R[0, 1] == 0.0 and np.allclose(R[1], result["pretrained_accuracy"])
    assert result["trainable_params"] == 0
