"""Shape smoke tests of the paper protocols: the full-size models, random weights, a few steps on synthetic tensors."""

import pytest
import torch

from avalanche_merge.benchmarks.base import Benchmark, make_scenario, tensor_classification_dataset
from avalanche_merge.config import from_dict
from avalanche_merge.models import BACKBONES
from avalanche_merge.runner.run import accuracy_row, make_evaluator
from avalanche_merge.strategies import METHODS
from avalanche_merge.strategies.registry import BuildContext, TrainConfig

pytestmark = pytest.mark.slow


def _benchmark(classes_per_task: int, n_tasks: int = 2, per_class: int = 1, task_labels: bool = False) -> Benchmark:
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for k in range(n_tasks):
        y = torch.arange(k * classes_per_task, (k + 1) * classes_per_task).repeat(per_class)
        t = k if task_labels else 0
        train.append(tensor_classification_dataset(torch.randn(len(y), 3, 224, 224, generator=g), y, t))
        test.append(tensor_classification_dataset(torch.randn(len(y), 3, 224, 224, generator=g), y, t))
    n = classes_per_task * n_tasks
    return Benchmark(name="synthetic", scenario=make_scenario(train, test),
                     scenario_type="task_incremental" if task_labels else "class_incremental", num_classes=n,
                     input_shape=(3, 224, 224), class_names=[f"class {c}" for c in range(n)],
                     experience_names=[f"task {k}" for k in range(n_tasks)])


def _run(method: str, model, bench, options: dict, protocol_plugins=()):
    spec = METHODS.get(method)
    ctx = BuildContext(model=model, benchmark=bench, evaluator=make_evaluator([]), plugins=list(protocol_plugins),
                       train=TrainConfig(epochs=1, batch_size=2, eval_batch_size=4, optimizer="adam", lr=5e-4))
    strategy = spec.build(ctx, from_dict(spec.config_cls, options))
    rows = []
    for exp in bench.train_stream:
        strategy.train(exp)
        rows.append(accuracy_row(strategy.eval(bench.test_stream), bench.n_experiences))
    return strategy, rows


@pytest.mark.parametrize("method", ["inflora", "sdlora"])
def test_vit_b16_lora_protocol_runs_on_synthetic_224px_tensors(method):
    bench = _benchmark(classes_per_task=2)
    options = BACKBONES.get("timm_vit").config_cls(arch="vit_base_patch16_224", random_init=True)
    model = BACKBONES.get("timm_vit").build(options, bench, 0)
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head.")) == 85_798_656
    strategy, rows = _run(method, model, bench, {"rank": 10, "total_tasks": 2} if method == "inflora" else {"rank": 10})
    assert len(rows) == 2 and all(0.0 <= a <= 1.0 for a in rows[-1])
    with torch.no_grad():
        assert strategy.model(torch.zeros(1, 3, 224, 224)).shape == (1, 4)


def test_clip_vit_b32_merging_protocol_runs_with_a_frozen_zero_shot_head():
    from avalanche_merge.plugins.protocol import HeadProtocolPlugin

    bench = _benchmark(classes_per_task=2, task_labels=True)
    options = BACKBONES.get("open_clip").config_cls(model_name="ViT-B-32-quickgelu")  # random weights
    model = BACKBONES.get("open_clip").build(options, bench, 0)
    head = model.head.weight.detach().clone()
    strategy, rows = _run("opcm", model, bench, {}, [HeadProtocolPlugin(protocol="frozen")])
    assert len(rows) == 2
    assert torch.equal(strategy.model.head.weight.detach(), head)  # the zero-shot head never moved
