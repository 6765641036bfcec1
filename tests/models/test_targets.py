"""Target resolution per architecture, the attention split, a user's own peft adapters, peft-format export and
batched text (issue 16)."""

import copy
import json

import pytest
import torch
from conftest import tiny_experiment
from torch import nn

from avalanche_merge.lora import make_learner
from avalanche_merge.lora.adapters import delta_weight, lora_layers
from avalanche_merge.lora.export import export_peft_adapter
from avalanche_merge.merging.heads import find_head
from avalanche_merge.models.attention import SplitMultiheadAttention, split_attention
from avalanche_merge.models.targets import default_targets, detect_architecture, lora_targets
from avalanche_merge.models.vit import TinyViT, TinyViTConfig

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP)


def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=3)


# -- the attention split ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_split_multihead_attention_equals_the_module(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double()
    with torch.no_grad():  # a non-zero bias everywhere: a bias copied to the wrong projection shows
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    split = SplitMultiheadAttention.from_module(mha)
    shape = (3, 5, 8) if batch_first else (5, 3, 8)
    q, kv = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    padding = torch.tensor([[False, False, False, True, False]] * 3)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": causal}, {"attn_mask": torch.randn(5, 5).double()},
                   {"need_weights": False}, {"average_attn_weights": False}):
        for inputs in ((q, q, q), (q, kv, kv)):
            expected, weights = mha(*inputs, **kwargs)
            got, got_weights = split(*inputs, **kwargs)
            assert torch.allclose(got, expected, atol=1e-12, rtol=0), kwargs
            assert (weights is None) == (got_weights is None)
            if weights is not None:
                assert torch.allclose(got_weights, weights, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="bias_k"):
        SplitMultiheadAttention.from_module(nn.MultiheadAttention(8, 2, add_bias_kv=True))


def test_split_keeps_open_clip_and_timm_outputs():
    x = torch.randn(2, 3, 32, 32)
    for model in (clip(), timm_vit()):
        model.eval()
        split = copy.deepcopy(model)
        names = split_attention(split)
        assert names and not any(isinstance(m, nn.MultiheadAttention) for m in split.modules())
        def run(m, x=x):
            return m.encode_image(x.to(m.visual.conv1.weight.dtype)) if hasattr(m, "encode_image") \
                else m(x.to(m.patch_embed.proj.weight.dtype))

        with torch.no_grad():
            assert torch.allclose(run(split), run(model), atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # float64: the same function up to rounding
            assert torch.allclose(run(split.double()), run(model.double()), atol=1e-12, rtol=0)
        assert split_attention(split) == []  # idempotent


# -- resolution ---------------------------------------------------------------------------------------------
def test_roles_resolve_per_architecture_and_clip_stays_in_the_vision_tower():
    model = clip()
    assert detect_architecture(model) == "open_clip"
    targets = lora_targets(model, ("q", "v"), exclude=[])
    assert targets == [f"visual.transformer.resblocks.{i}.attn.{p}" for i in range(2) for p in ("q", "v")]
    fc = lora_targets(model, ["c_fc"])  # a short name: the vision tower only
    assert fc == [f"visual.transformer.resblocks.{i}.mlp.c_fc" for i in range(2)]
    # a full name reaches the text tower on purpose
    assert lora_targets(model, ["transformer.resblocks.0.mlp.c_fc"]) == ["transformer.resblocks.0.mlp.c_fc"]
    assert lora_targets(model, ["proj"]) == [f"visual.transformer.resblocks.{i}.attn.out_proj" for i in range(2)]
    with pytest.raises(ValueError, match="whole CLIP model.*text-tower"):
        find_head(model)
    vit = timm_vit()
    assert detect_architecture(vit) == "timm_vit"
    assert lora_targets(vit, "auto", exclude=["head"]) == [f"blocks.{i}.attn.qkv.{p}" for i in range(2)
                                                           for p in ("q", "k", "v")]
    assert lora_targets(vit, ["fc2"], exclude=["head"]) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]


def test_default_targets_of_each_family_on_a_cnn():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    assert detect_architecture(cnn) == "cnn"
    assert default_targets(cnn, "lora", head="4") == ["0", "2"]
    assert default_targets(cnn, "sparse", head="4") == ["0.weight", "2.weight"]
    assert default_targets(cnn, "analysis") == ["0", "2", "4"]
    with pytest.raises(ValueError, match="family must be one of"):
        default_targets(cnn, "nope")
    with pytest.raises(ValueError, match="nn.Linear layers only"):
        lora_targets(cnn, ["0"], exclude=["4"], allow_conv=False)


def test_sparse_linear_on_a_cnn_says_to_use_weights():
    from avalanche_merge.sparse.registry import make_sparse_learner

    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 10 * 10, 3))
    with pytest.raises(ValueError, match="parameters='weights'"):
        make_sparse_learner("masked", cnn)
    learner = make_sparse_learner("masked", cnn, parameters="weights")
    assert list(learner.params) == ["0.weight"]


def test_dry_run_resolves_defaults_on_open_clip_and_refuses_conv_for_inflora():
    from avalanche_merge.config import ConfigError
    from avalanche_merge.runner.plan import load_experiment, plan_experiment
    from avalanche_merge.runner.preflight import preflight

    def check(config):
        preflight(plan_experiment(load_experiment(config)))

    model = {"name": "open_clip", "options": {"model_name": "tiny", "model_cfg": TINY_CLIP}}
    check(tiny_experiment(["olora", "inflora", "proteus"], model=model))
    tiny = {"name": "tiny_vit", "options": {"pretrained": False, "dim": 16, "depth": 1, "heads": 2}}
    with pytest.raises(ConfigError, match="target_modules.*'patch_embed'.*nn.Linear layers only"):
        check(tiny_experiment([{"name": "inflora", "options": {"target_modules": ["patch_embed"]}}], model=tiny))
    check(tiny_experiment([{"name": "lora", "options": {"target_modules": ["patch_embed"]}}], model=tiny))


# -- a user's own peft adapters -----------------------------------------------------------------------------
def _with_user_adapter(name="user"):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=3))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q", "fc1"]), model, adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: it moves the logits
    return model


@pytest.mark.parametrize("method", ["lora", "inflora", "sdlora"])
def test_a_users_adapter_stays_active_and_as_trainable_as_set(method):
    model = _with_user_adapter()
    for n, p in model.named_parameters():
        if "lora_A.user" in n:
            p.requires_grad_(False)  # the user froze A, kept B trainable
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        before = model(x)
    learner = make_learner(method, model, rank=2)
    learner.set_stream_length(2)
    params = learner.begin_task([x])
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the user's adapter still counts; ours starts at zero
    names = {id(p): n for n, p in model.named_parameters()}
    user = {names[id(p)] for p in params if ".user." in names[id(p)]}
    assert user and all("lora_B.user" in n for n in user)
    for layer in lora_layers(model).values():
        assert ("user" in layer.active_adapters) == ("user" in layer.lora_A)
        assert ("task0" in layer.active_adapters) == ("task0" in layer.lora_A)


def test_an_adapter_named_like_ours_is_refused():
    model = _with_user_adapter("task0")
    with pytest.raises(ValueError, match="already has a peft adapter named 'task0'"):
        make_learner("lora", model)


# -- export in peft's format --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "sdlora"])
def test_exported_adapter_loads_with_peft_alone(tmp_path, method):
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=3))
    base = copy.deepcopy(model)
    learner = make_learner(method, model, rank=2, target_modules=("q", "v", "patch_embed"))
    learner.begin_task(None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B (SD-LoRA: the raw B and its magnitude)
                p.normal_()
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected, base.eval()(x))
    folder = export_peft_adapter(model, "task0", tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert sorted(config["target_modules"]) == ["blocks.0.attn.q", "blocks.0.attn.v", "patch_embed"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)
    plain = copy.deepcopy(base)  # the raw-module route: inject + set_peft_model_state_dict
    inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), plain)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    assert not set_peft_model_state_dict(plain, state).unexpected_keys
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), expected, atol=1e-6)
    conv = lora_layers(model)["patch_embed"]
    assert delta_weight(conv, "task0").shape == conv.get_base_layer().weight.shape
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        export_peft_adapter(model, "nope", tmp_path / "x")


# -- text that Avalanche can batch --------------------------------------------------------------------------
def test_minilm_trains_with_lora_inside_avalanche_on_tokenised_text():
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
    from avalanche.training import Naive

    from avalanche_merge.models.text import MiniLMEncoder, TextClassifier, TokenizedTextDataset, load_minilm
    from avalanche_merge.plugins import LoRAPlugin

    encoder, tokenizer = load_minilm()
    texts = ["the cat sleeps", "a dog barks", "stocks fell", "markets rallied", "it rains", "sunny day"]
    data = TokenizedTextDataset(texts, [0, 0, 1, 1, 2, 2], tokenizer=tokenizer, max_length=8)
    with torch.no_grad():  # the token tensors give the embeddings of the strings
        assert torch.allclose(MiniLMEncoder(encoder, tokenizer)(data.tokens), MiniLMEncoder(encoder, tokenizer)(texts),
                              atol=1e-6)
    encoder.encoder.layer = encoder.encoder.layer[:1]
    torch.manual_seed(0)
    model = TextClassifier(encoder, 3)
    bench = nc_benchmark(data, data, n_experiences=3, task_labels=False, seed=0, fixed_class_order=[0, 1, 2])
    plugin = LoRAPlugin(method="lora", options={"rank": 2, "lr": 1e-2})
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=2, train_epochs=1, eval_mb_size=6,
                     plugins=[plugin], evaluator=None)
    frozen = encoder.embeddings.word_embeddings.weight.detach().clone()
    strategy.train(bench.train_stream[0])
    assert plugin.learner.targets == ["encoder.encoder.layer.0.attention.self.query",
                                      "encoder.encoder.layer.0.attention.self.value"]
    assert torch.equal(encoder.embeddings.word_embeddings.weight, frozen)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
