"""HeadProtocolPlugin inside Avalanche's own strategies, with Avalanche's own models and heads."""

import math

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier, SimpleMLP
from avalanche.training import EWC, LwF, Naive, Replay
from torch import nn

from avalanche_merge.benchmarks import BENCHMARKS
from avalanche_merge.plugins.protocol import HeadProtocolPlugin
from avalanche_merge.protocol import PerTaskHead


@pytest.fixture(scope="module")
def digits():
    spec = BENCHMARKS.get("split_digits")
    return spec.build(spec.config_cls(n_experiences=2, max_train_per_class=12), 0)


class IncrementalMLP(nn.Module):
    """A user's model with Avalanche's growing head (the standard class-incremental recipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.classifier = IncrementalClassifier(32, initial_out_features=2)

    def forward(self, x):
        return self.classifier(self.features(x))


class Probe(SupervisedPlugin):
    """Records the loss and the head's weight gradient of every training step."""

    def __init__(self, head) -> None:
        super().__init__()
        self.head = head
        self.losses, self.grads = [], []

    def after_backward(self, strategy, **kwargs):
        self.losses.append(float(strategy.loss))
        weight = self.head(strategy.model)
        self.grads.append(None if weight.grad is None else weight.grad.detach().clone())


def make(strategy_cls, model, plugins, **kwargs):
    return strategy_cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                        criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, eval_mb_size=64,
                        plugins=plugins, evaluator=None, **kwargs)


def linear_of(model):
    head = model.classifier
    return head.classifier.weight if isinstance(head, IncrementalClassifier) else head.weight


@pytest.mark.parametrize("container", [set, list])
@pytest.mark.parametrize("model_cls", [lambda: SimpleMLP(num_classes=10, input_size=784), IncrementalMLP])
def test_masked_trains_only_the_current_classes_rows_with_set_typed_classes(digits, model_cls, container):
    torch.manual_seed(0)
    model = model_cls()
    probe = Probe(linear_of)
    strategy = make(Naive, model, [HeadProtocolPlugin(protocol="masked"), probe])
    for exp in digits.train_stream:
        # our benchmarks give sets (the case Avalanche's own L2P gets wrong); other benchmarks give lists
        exp.classes_in_this_experience = container(set(exp.classes_in_this_experience))
        probe.grads.clear()
        strategy.train(exp)
        current = sorted(exp.classes_in_this_experience)
        assert all(math.isfinite(v) for v in probe.losses)
        grad = probe.grads[-1]
        others = [c for c in range(grad.shape[0]) if c not in current]
        assert grad[current].abs().sum() > 0
        assert torch.all(grad[others] == 0)


class EvalProbe(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.outputs = []

    def after_eval_forward(self, strategy, **kwargs):
        self.outputs.append(strategy.mb_output.detach().clone())


def test_masked_evaluation_predicts_only_classes_seen_so_far(digits):
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=784)
    probe = EvalProbe()
    strategy = make(Naive, model, [HeadProtocolPlugin(protocol="masked"), probe])
    strategy.eval(digits.test_stream)  # before training: nothing is restricted
    assert torch.isfinite(torch.cat(probe.outputs)).all()
    strategy.train(digits.train_stream[0])
    probe.outputs.clear()
    strategy.eval(digits.test_stream)
    out = torch.cat(probe.outputs)
    seen = sorted(digits.train_stream[0].classes_in_this_experience)
    unseen = [c for c in range(10) if c not in seen]
    assert set(out.argmax(1).tolist()) <= set(seen)
    assert torch.all(out[:, unseen] == torch.finfo(out.dtype).min)
    assert torch.isfinite(out[:, seen]).all()


@pytest.mark.parametrize("strategy_cls, kwargs", [(Replay, {"mem_size": 20}), (EWC, {"ewc_lambda": 10.0}),
                                                  (LwF, {"alpha": 1.0, "temperature": 2.0})])
@pytest.mark.parametrize("protocol", ["masked", "per_task", "frozen"])
def test_protocols_inside_replay_ewc_lwf(digits, strategy_cls, kwargs, protocol):
    torch.manual_seed(0)
    model = IncrementalMLP() if protocol == "masked" else SimpleMLP(num_classes=10, input_size=784)
    probe = Probe(lambda m: (m.classifier.heads[-1].weight if protocol == "per_task"
                             else next(m.classifier.parameters())))
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    strategy = make(strategy_cls, model, [HeadProtocolPlugin(protocol=protocol), probe], **kwargs)
    for exp in digits.train_stream:
        strategy.train(exp)
    results = strategy.eval(digits.test_stream)
    assert probe.losses and all(math.isfinite(v) for v in probe.losses)
    assert all(math.isfinite(v) for k, v in results.items() if isinstance(v, float) and "Acc" in k)
    if protocol == "frozen":
        after = model.classifier.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(g is None for g in probe.grads)
    if protocol == "per_task":
        assert isinstance(model.classifier, PerTaskHead) and len(model.classifier.heads) == 2
        assert probe.grads[-1] is not None and probe.grads[-1].abs().sum() > 0


def test_per_task_heads_are_trained_once_and_kept(digits):
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=784)
    strategy = make(Naive, model, [HeadProtocolPlugin(protocol="per_task")])
    strategy.train(digits.train_stream[0])
    head = model.classifier
    first = {k: v.clone() for k, v in head.heads[0].state_dict().items()}
    strategy.train(digits.train_stream[1])
    assert all(torch.equal(first[k], v) for k, v in head.heads[0].state_dict().items())
    assert head.task_classes == [sorted(e.classes_in_this_experience) for e in digits.train_stream]


def test_per_task_prototypes_are_the_class_means_of_the_eval_features(digits):
    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, input_size=784)
    strategy = make(Naive, model, [HeadProtocolPlugin(protocol="per_task", prototypes=True)])
    exp = digits.train_stream[0]
    strategy.train(exp)
    head = model.classifier
    data = exp.dataset.eval()
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        feats = model.features(x.view(len(x), -1))
    classes = sorted(exp.classes_in_this_experience)
    expected = torch.stack([feats[y == c].mean(0) for c in classes])
    assert head.prototype_classes == classes
    assert torch.allclose(head.prototypes, expected, atol=1e-5)


def test_bad_protocol_options():
    with pytest.raises(ValueError, match="unknown head protocol 'banana'"):
        HeadProtocolPlugin(protocol="banana")
    with pytest.raises(ValueError, match="unknown head protocol 'prototype'"):
        HeadProtocolPlugin(protocol="prototype")
    with pytest.raises(ValueError, match="prototypes=True needs protocol='per_task'"):
        HeadProtocolPlugin(protocol="masked", prototypes=True)
    with pytest.raises(ValueError, match="prototype_batch_size must be an int >= 1"):
        HeadProtocolPlugin(protocol="per_task", prototype_batch_size=0)


def test_per_task_refuses_repeated_classes(digits):
    model = SimpleMLP(num_classes=10, input_size=784)
    strategy = make(Naive, model, [HeadProtocolPlugin(protocol="per_task")])
    strategy.train(digits.train_stream[0])
    with pytest.raises(ValueError, match="needs disjoint classes per experience"):
        strategy.train(digits.train_stream[0])


def _random_images_benchmark():
    from torch.utils.data import TensorDataset

    from avalanche_merge.benchmarks.base import as_classification_dataset, make_scenario

    g = torch.Generator().manual_seed(0)

    def dataset(n, classes):
        x = torch.randn(n, 3, 32, 32, generator=g)
        y = torch.tensor(classes)[torch.arange(n) % len(classes)]
        return as_classification_dataset(TensorDataset(x, y), y, 0)

    return make_scenario([dataset(32, [0, 1]), dataset(32, [2, 3])], [dataset(16, [0, 1]), dataset(16, [2, 3])])


def _tiny_timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=4)


def _tiny_open_clip_zero_shot():
    open_clip = pytest.importorskip("open_clip")
    from avalanche_merge.models.clip import ZeroShotClassifier

    clip = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                    "head_width": 16},
                          text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1})
    return ZeroShotClassifier(clip, torch.nn.functional.normalize(torch.randn(4, 16), dim=1))


@pytest.mark.parametrize("make_model", [_tiny_timm_vit, _tiny_open_clip_zero_shot])
@pytest.mark.parametrize("protocol", ["masked", "per_task", "frozen"])
def test_protocols_on_a_timm_vit_and_an_open_clip_zero_shot_head(make_model, protocol):
    torch.manual_seed(0)
    model = make_model()
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    probe = Probe(lambda m: m.head.heads[-1].weight if protocol == "per_task" else m.head.weight)
    outputs = EvalProbe()
    strategy = make(Naive, model, [HeadProtocolPlugin(protocol=protocol), probe, outputs])
    benchmark = _random_images_benchmark()
    for exp in benchmark.train_stream:
        strategy.train(exp)
    strategy.eval(benchmark.test_stream)
    assert all(math.isfinite(v) for v in probe.losses)
    out = torch.cat(outputs.outputs)
    assert out.shape == (32, 4) and torch.isfinite(out).all()
    if protocol == "frozen":
        assert all(torch.equal(before[k], model.head.state_dict()[k]) for k in before)
    else:
        assert probe.grads[-1] is not None and probe.grads[-1].abs().sum() > 0
    if protocol == "per_task":
        assert isinstance(model.head, PerTaskHead) and model.head.task_classes == [[0, 1], [2, 3]]
