"""The shared matrix: every registered method runs end to end on a tiny model and benchmark.

Methods registered by any module appear here automatically (parametrised over ``list_methods()``).
"""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, TINY_TRAIN, tiny_experiment

from avalanche_merge.config import ConfigError
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.runner.run import execute_run
from avalanche_merge.strategies import METHODS, list_methods


@pytest.mark.parametrize("method", list_methods())
def test_method_runs_on_tiny_benchmark(method, tmp_path):
    spec = METHODS.get(method)
    if callable(getattr(spec.config_cls, "check_model", None)):  # c_clip: open_clip only (tests/lora/test_cclip.py)
        with pytest.raises(ConfigError, match="text tower"):
            plan_experiment(load_experiment(tiny_experiment([method])))
        return
    benchmark = {"name": "split_digits", "options": {"n_experiences": 2, "max_train_per_class": 30,
                                                     "task_labels": spec.needs_task_labels}}
    # LoRA and sparse learners train a few hundred weights of a 16-wide, 1-block model: at the run's rate (2e-3)
    # and 30 steps they barely move it, so they get their own rate (the ``lr`` option of every LoRA/sparse
    # config); a 10% sparse update of this model also needs more steps (measured: 0.21 after 3 epochs, 0.40
    # after 10 at lr 1e-2; dense Naive 0.48 after 3)
    # (the retrieval-routed LoRA methods likewise: CoLoR's per-task LoRA + linear head reaches 0.21 at 2e-3)
    own_rate = spec.family in ("lora", "sparse", "retrieval") and "lr" in spec.config_cls.__dataclass_fields__
    options = {"lr": 1e-2} if own_rate else {}
    # so do the per-task and masked protocols' head rows, trained on a fifth of the classes with adapters (measured
    # at 1e-2 on the first experience: InfLoRA 0.22 after 3 epochs, 0.69 after 8; O-LoRA 0.27 and 0.60)
    longer = (spec.family == "sparse" or (spec.family == "retrieval" and own_rate)
              or (spec.family == "lora" and spec.protocol in ("per_task", "masked")))
    train = dict(TINY_TRAIN, epochs=8) if longer else dict(TINY_TRAIN)
    overrides = {}
    if spec.family == "prompt":
        # prompt methods train only prompts and a head on the frozen backbone: the 5-epoch tiny backbone's features
        # barely vary across inputs (std 0.01-0.03 per unit), so its head stays at chance (measured: L2P 0.20 at
        # rates 0.05-1.0); a 30-epoch backbone at an unscaled 0.03 and 8 epochs gives L2P 0.71 on the diagonal
        options = {"lr": 3e-2, "scale_lr_by_batch": False}
        train = dict(TINY_TRAIN, epochs=8)
        overrides["model"] = {"name": TINY_MODEL["name"], "options": dict(TINY_MODEL["options"], pretrain_epochs=30)}
    entry = {"name": method, "options": options}
    extra = overrides
    if getattr(spec.config_cls, "needs_text_tower", False):  # zeroshot: a tiny random open_clip on RGB images
        from conftest import OPEN_CLIP_TINY, rgb_image_folder

        benchmark = {"name": "image_folder", "options": {"dataset_root": rgb_image_folder(tmp_path / "images"),
                                                          "n_experiences": 2, "image_size": 32}}
        extra["model"] = {"name": "open_clip", "options": {"model_name": "tiny", "model_cfg": OPEN_CLIP_TINY}}
    (plan,) = plan_experiment(load_experiment(tiny_experiment([entry], benchmark=benchmark, train=train, **extra)))
    result = execute_run(plan, tmp_path)
    R = np.asarray(result["accuracy_matrix"])
    assert R.shape == ((1, 2) if spec.trains_once else (2, 2))
    assert np.all((R >= 0) & (R <= 1))
    if spec.pretrained_eval:
        assert len(result["pretrained_accuracy"]) == 2
    else:
        assert result["pretrained_accuracy"] is None
    assert math.isclose(result["metrics"]["final_acc"], R[-1].mean())
    # the method must learn: right after training on an experience (the diagonal) it must beat the untrained
    # model, which with a fresh head is at chance (~0.1)
    # merging methods are exempt: their default scalings (0.3-0.5, tuned in the papers for 8+ tasks) shrink the
    # first task vector and break the trained class-incremental head here; tests/plugins/test_merge_plugin.py
    # checks that a merge at scaling 1 reproduces the fine-tuned model exactly
    learned = R[0].max() if spec.trains_once else np.diag(R).max()
    pre = max(result["pretrained_accuracy"] or [0.0])
    # zero-shot methods never train by definition (tests/tta/test_zeroshot.py checks what they predict)
    if spec.family not in ("merging", "zeroshot"):
        assert learned > max(0.25, pre + 0.1), f"{method} learned nothing: {R.tolist()} (before: {pre})"
    assert result["trainable_params"] >= 0
    assert result["train_time_s"] > 0 and result["peak_rss_mb"] > 0


def test_plugin_method_runs_inside_its_base(tmp_path):
    """A plugin registered with register_plugin_method is appended to the base strategy's plugins."""
    from avalanche.training.plugins import SupervisedPlugin

    from avalanche_merge.strategies import register_plugin_method
    from avalanche_merge.strategies.registry import NoOptions

    calls = []

    class Counting(SupervisedPlugin):
        def after_training_exp(self, strategy, **kwargs):
            calls.append(strategy.experience.current_experience)

    register_plugin_method("counting_test", make_plugin=lambda ctx, cfg: Counting(), config_cls=NoOptions,
                           description="test plugin", in_bench=False)
    try:
        (plan,) = plan_experiment(load_experiment(tiny_experiment(["counting_test"])))
        result = execute_run(plan, tmp_path)
    finally:
        METHODS.remove("counting_test")
    assert calls == [0, 1]
    assert np.asarray(result["accuracy_matrix"]).shape == (2, 2)


def test_naive_changes_weights_and_slda_keeps_backbone_frozen(tmp_path):
    from avalanche_merge.benchmarks import BENCHMARKS
    from avalanche_merge.models import BACKBONES
    from avalanche_merge.runner.run import make_evaluator, seed_everything
    from avalanche_merge.strategies.registry import BuildContext, TrainConfig

    (plan,) = plan_experiment(load_experiment(tiny_experiment(["naive"])))
    bench = BENCHMARKS.get(plan.benchmark).build(plan.benchmark_options, 0)
    for method, should_change in (("naive", True), ("slda", False)):
        seed_everything(0)
        model = BACKBONES.get("tiny_vit").build(plan.model_options, bench, 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ctx = BuildContext(model=model, benchmark=bench, train=TrainConfig(epochs=1, batch_size=16),
                           evaluator=make_evaluator([]))
        spec = METHODS.get(method)
        strategy = spec.build(ctx, spec.config_cls())
        strategy.train(bench.train_stream[0])
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert changed is should_change, method
