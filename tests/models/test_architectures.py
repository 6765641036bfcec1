"""Every method family on six architectures (issue 16): our TinyViT, Avalanche's SimpleMLP, a small CNN, a tiny
random open_clip ViT, a tiny random timm ViT and MiniLM (real weights, a few sentences).

Each test trains a few steps and checks that the outputs move where they should (the adapted / masked / merged
parts) and stay bit-identical where frozen (the base weights under LoRA, the weights outside a sparse mask, the
pretrained embedding a router reads).
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_merge.lora import make_learner
from avalanche_merge.merging import TaskVector
from avalanche_merge.merging.registry import make_merger
from avalanche_merge.retrieval.prototypes import NearestClassMean
from avalanche_merge.retrieval.routed import ProteusConfig, RoutedLoRA
from avalanche_merge.sparse.registry import make_sparse_learner

ARCHS = ("tinyvit", "simple_mlp", "cnn", "open_clip", "timm_vit", "minilm")
N_CLASSES = 4
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SENTENCES = ["the cat sleeps on the mat", "a dog chases the ball", "stocks fell sharply today",
             "the market rallied at noon", "rain is expected tomorrow", "a sunny and warm afternoon",
             "the team won the final", "the striker scored twice"]


class SmallCNN(nn.Module):
    """A user's own CNN: two convolutions, a hidden linear layer and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, N_CLASSES)
        self.feature_dim = 16

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class TimmNet(nn.Module):
    """A timm ViT (no classifier: pooled features) with a linear head."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                     embed_dim=32, depth=2, num_heads=2, num_classes=0)
        self.head = nn.Linear(32, N_CLASSES)
        self.feature_dim = 32

    def features(self, x):
        return self.vit(x)

    def forward(self, x):
        return self.head(self.features(x))


class MLPNet(nn.Module):
    """Avalanche's SimpleMLP with ``features`` as a method (what the routed and prototype families read)."""

    def __init__(self) -> None:
        super().__init__()
        from avalanche.models import SimpleMLP

        self.mlp = SimpleMLP(num_classes=N_CLASSES, input_size=20, hidden_size=32, hidden_layers=2, drop_rate=0.0)
        self.feature_dim = 32

    def features(self, x):
        return self.mlp.features(x)

    def forward(self, x):
        return self.mlp(x)


_MINILM = {}


def _minilm():
    if not _MINILM:
        from avalanche_merge.models.text import load_minilm

        _MINILM["model"], _MINILM["tokenizer"] = load_minilm()
    return _MINILM["model"], _MINILM["tokenizer"]


def build(arch: str):
    """``(model, inputs, labels)`` of a tiny instance of ``arch`` (seeded)."""
    torch.manual_seed(0)
    labels = torch.arange(8) % N_CLASSES
    if arch == "tinyvit":
        from avalanche_merge.models.vit import TinyViT, TinyViTConfig

        model = TinyViT(TinyViTConfig(dim=16, depth=2, heads=2, num_classes=N_CLASSES))
        x = torch.randn(8, 1, 28, 28)
    elif arch == "simple_mlp":
        model, x = MLPNet(), torch.randn(8, 20)
    elif arch == "cnn":
        model, x = SmallCNN(), torch.randn(8, 1, 12, 12)
    elif arch == "open_clip":
        import open_clip

        from avalanche_merge.models.clip import ZeroShotClassifier

        model = ZeroShotClassifier(open_clip.CLIP(**TINY_CLIP), F.normalize(torch.randn(N_CLASSES, 16), dim=-1))
        x = torch.randn(8, 3, 32, 32)
    elif arch == "timm_vit":
        model, x = TimmNet(), torch.randn(8, 3, 32, 32)
    else:
        from avalanche_merge.models.text import TextClassifier, tokenize

        encoder, tokenizer = _minilm()
        encoder = copy.deepcopy(encoder)
        encoder.encoder.layer = encoder.encoder.layer[:2]  # the real weights of its first 2 of 6 layers: faster
        model = TextClassifier(encoder, N_CLASSES)
        x = tokenize(SENTENCES, tokenizer, max_length=12)
    return model.train(), x, labels


# last name components of the query/value and key/value projections (the learners' default roles) per transformer
LAST = {"tinyvit": (("q", "v"), ("k", "v")), "open_clip": (("q", "v"), ("k", "v")),
        "timm_vit": (("q", "v"), ("k", "v")), "minilm": (("query", "value"), ("key", "value"))}
INSIDE = {"tinyvit": ".attn.", "open_clip": "image_encoder.transformer.resblocks.", "timm_vit": ".attn.qkv.",
          "minilm": ".attention.self."}


def _base_state(model):
    """The model's weights without adapters, keyed as before peft wrapped any layer."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()
            if "lora_" not in k}


def _train(model, params, x, y, *, steps=3, lr=0.05, penalty=None, after_backward=None, before_step=None,
           after_step=None):
    """A few SGD steps with the learner's calls where a training loop makes them."""
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        extra = penalty() if penalty is not None else None
        (loss if extra is None else loss + extra).backward()
        for hook in (after_backward, before_step):
            if hook is not None:
                hook()
        opt.step()
        if after_step is not None:
            after_step()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "inflora", "sdlora"])
def test_lora_learners_with_their_default_targets(arch, method):
    model, x, y = build(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = make_learner(method, model, rank=2)
    no_attention = arch in ("simple_mlp", "cnn")
    assert any("has no attention" in str(w.message) for w in caught) == no_attention
    if arch in LAST:  # the paper's query/value (InfLoRA: key/value) projections, inside attention only
        expected = LAST[arch][method == "inflora"]
        assert {t.rsplit(".", 1)[-1] for t in learner.targets} == set(expected)
        assert all(INSIDE[arch] in t for t in learner.targets)
        assert len(learner.targets) == 2 * 2  # two per block
    else:  # every layer outside the head; convolutions only where the method allows them
        convs = [t for t in learner.targets if isinstance(model.get_submodule(t), nn.Conv2d)]
        assert bool(convs) == (arch == "cnn" and method != "inflora")
        assert learner.head_name not in learner.targets
    model.eval()
    with torch.no_grad():
        before = model(x)
    learner.set_stream_length(2)
    base = _base_state(model)
    for task in range(2):
        inputs = [x[task * 4:(task + 1) * 4]]
        params = learner.begin_task(inputs)
        if task == 0 or method != "sdlora":  # SD-LoRA renormalises the old directions at a new task (documented)
            with torch.no_grad():
                assert torch.equal(model(x), before)  # a new adapter starts at zero: nothing moved yet
        model.train()
        _train(model, params, x, y, penalty=learner.penalty, after_backward=learner.after_backward,
               after_step=learner.after_step)
        learner.end_task(inputs)
        model.eval()
        with torch.no_grad():
            after = model(x)
        assert not torch.allclose(after, before, atol=1e-6), f"{method} on {arch}: task {task} changed nothing"
        before = after
    for k, v in _base_state(model).items():  # the frozen base is bit-identical (only the head trains)
        if not k.startswith(learner.head_name + "."):
            assert torch.equal(v, base[k]), f"{k} moved"


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_masks_reach_conv_and_attention_weights(arch):
    model, x, y = build(arch)
    learner = make_sparse_learner("masked", model, density=0.05, parameters="weights", criterion="gradient")
    if arch in ("cnn", "tinyvit"):
        assert any(p.dim() == 4 for p in learner.params.values())  # convolution kernels are maskable
    if arch == "open_clip":  # nn.MultiheadAttention's fused q/k/v weight too
        assert "image_encoder.transformer.resblocks.0.attn.in_proj_weight" in learner.params
    start = {n: p.detach().clone() for n, p in learner.params.items()}
    params = learner.begin_task([(x, y)])
    _train(model, params, x, y, after_backward=learner.after_backward, before_step=learner.before_step,
           after_step=learner.after_step)
    learner.end_task()
    moved = 0
    for n, p in learner.params.items():
        mask = learner.history[0][n]
        assert torch.equal(p.detach()[~mask], start[n][~mask]), f"{n}: a weight outside the mask moved"
        moved += int((p.detach() != start[n]).sum())
    assert moved > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_continual_merge_of_full_fine_tunes(arch):
    model, x, y = build(arch)
    pretrained = copy.deepcopy(model.state_dict())
    merger = make_merger("continual_task_arithmetic")
    for task in range(2):
        model.load_state_dict(pretrained)
        _train(model, [p for p in model.parameters() if p.requires_grad], x[task::2], y[task::2], steps=2)
        merged = merger.update(TaskVector.from_models(pretrained, model))
    model.load_state_dict(merged.apply_to(pretrained), strict=True)
    for k, v in model.state_dict().items():
        if not v.is_floating_point():  # integer buffers (token type ids, ...) never enter arithmetic
            assert torch.equal(v, pretrained[k])
    vector = TaskVector.from_models(pretrained, model)
    assert vector.norm() > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.filterwarnings("ignore:task .* samples in")  # 4 samples per task: the signature falls back to diag
def test_proteus_routes_each_task_to_its_adapter(arch):
    model, x, y = build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attention roles on the MLP / CNN fall back to every layer, with a warning
        routed = RoutedLoRA(model, config=ProteusConfig(rank=2, n_components=1, head_type="linear",
                                                          covariance_type="diag"), num_classes=N_CLASSES)
    model.eval()
    with torch.no_grad():
        embedded = model.features(x)  # after the split of fused attention (equal up to rounding, tested apart)
    base = _base_state(model)
    for classes in ([0, 1], [2, 3]):
        keep = (y == classes[0]) | (y == classes[1])
        params = routed.begin_task(classes)
        routed.train()
        _train(routed, params, x[keep], y[keep], penalty=routed.penalty, lr=0.5)
        routed.eval()
        routed.end_task([x[keep]], [y[keep]])
    with torch.no_grad():
        assert torch.equal(routed.embed(x), embedded)  # routing reads the pretrained features, bit for bit
        adapted = [routed._task_features(x, t) for t in range(2)]
        out = routed(x)
    assert not torch.allclose(adapted[0], embedded, atol=1e-6)  # each task's adapter moved its features
    assert not torch.allclose(adapted[1], adapted[0], atol=1e-6)
    assert out.shape == (8, N_CLASSES)
    for k, v in _base_state(model).items():
        if k in base:
            assert torch.equal(v, base[k]), f"{k} moved"


@pytest.mark.parametrize("arch", ARCHS)
def test_nearest_class_mean_on_frozen_features(arch):
    model, x, y = build(arch)
    model.eval()
    with torch.no_grad():
        feats = model.features(x)
    ncm = NearestClassMean(feats.shape[1], N_CLASSES)
    ncm.update(feats, y)
    assert torch.equal(ncm.predict(feats), ncm.predict(feats.clone()))
    assert ncm.logits(feats).shape == (8, N_CLASSES)


class _Data(torch.utils.data.Dataset):
    """Tensors with ``targets``, as Avalanche's benchmark generators want them."""

    def __init__(self, x, y):
        self.x, self.targets = x, [int(v) for v in y]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plugin", ["olora", "masked"])
def test_plugins_inside_avalanche_naive(arch, plugin):
    """The plugins as a user drops them in: the strategy's optimizer was built on the whole model before the
    learner split attention or injected adapters; each experience still trains only the learner's parameters."""
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from avalanche.training import Naive

    from avalanche_merge.plugins import LoRAPlugin
    from avalanche_merge.plugins.sparse import SparsePlugin

    model, x, y = build(arch)
    data = _Data(x, y)
    bench = nc_benchmark(data, data, n_experiences=2, task_labels=False, seed=0, fixed_class_order=[0, 1, 2, 3])
    if plugin == "olora":
        plug = LoRAPlugin(method="olora", options={"rank": 2, "lr": 0.05})
    else:
        plug = SparsePlugin(method="masked", options={"parameters": "weights", "density": 0.1, "lr": 0.05})
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=4, train_epochs=1, eval_mb_size=8,
                     plugins=[plug], evaluator=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roles on the MLP / CNN: the fallback warning
        for experience in bench.train_stream:
            strategy.train(experience)
    learner = plug.learner
    trainable = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert trainable and all(p.requires_grad for p in model.parameters() if id(p) in trainable)
    if plugin == "olora":
        assert len(learner.adapters) == 2
        assert all(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B.task0" in n)
    else:
        assert len(learner.history) == 2
        assert not any((learner.history[0][n] & learner.history[1][n]).any() for n in learner.params)  # ownership
