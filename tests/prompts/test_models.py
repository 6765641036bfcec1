"""The prompted models on the three backbones: frozen backbone, task-indexed E-prompts, CODA slices."""

import pytest
import torch
from prompt_backbones import KINDS, make_backbone

from avalanche_merge.prompts import (
    CodaPromptConfig,
    CodaPromptModel,
    DualPromptConfig,
    DualPromptModel,
    L2PConfig,
    L2PModel,
    l2_normalize,
)

SMALL = {"l2p": (L2PModel, lambda: L2PConfig(pool_size=4, prompt_length=2, top_n=2), {}),
         "dualprompt": (DualPromptModel, lambda: DualPromptConfig(g_length=2, e_length=2), {"n_tasks": 3}),
         "coda_prompt": (CodaPromptModel, lambda: CodaPromptConfig(components_per_task=3, length=4), {"n_tasks": 3})}


def _build(method, kind, **cfg):
    backbone, shape = make_backbone(kind)
    cls, make_cfg, extra = SMALL[method]
    config = make_cfg()
    for k, v in cfg.items():
        setattr(config, k, v)
    return cls(backbone, 5, config, seed=0, **extra), backbone, shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(SMALL))
def test_every_method_trains_on_every_backbone_and_leaves_it_bit_identical(method, kind):
    model, backbone, shape = _build(method, kind)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    plain = backbone(x).detach().clone()
    for task in (0, 1):
        model.begin_task(task)
        params = model.trainable_parameters()
        assert params and not any(p is q for p in params for q in backbone.parameters())
        opt = torch.optim.Adam(params, lr=0.05)
        prompt_before = [p.detach().clone() for p in params]
        model.train()
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if model.last_pull is not None:
                loss = loss - model.last_pull
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(loss)
            assert model.head.weight.grad.abs().sum() > 0
            opt.step()
        changed = [not torch.equal(a, b) for a, b in zip(prompt_before, params, strict=True)]
        assert all(changed), f"{method}: some trained parameters did not move"
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in backbone.parameters())
    model.eval()
    with torch.no_grad():
        prompted = model.features(x)
        assert model.query(x).shape == prompted.shape
    # the hooks are inert outside the prompted pass and gone after detach: the plain backbone is unchanged
    torch.testing.assert_close(backbone(x), plain, rtol=0, atol=0)
    model.detach_backbone()
    torch.testing.assert_close(backbone(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_query_is_the_frozen_backbones_final_class_token(kind):
    model, backbone, shape = _build("l2p", kind)
    x = torch.randn(3, *shape)
    q = model.query(x)
    if kind == "tiny_vit":
        expected = backbone.features(x)
    elif kind == "timm":
        expected = backbone.forward_features(x)[:, 0]
    else:
        expected = backbone.image_encoder(x)  # open_clip: ln_post(class token) @ proj
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-6)


def test_l2p_inserts_top_n_prompts_after_the_class_token_and_pools_them():
    model, backbone, shape = _build("l2p", "tiny_vit")
    x = torch.randn(2, *shape)
    q = model.query(x)
    model.prompt(q)
    tokens = model.adapter.run(x)
    model.adapter.state.clear()
    assert tokens.shape[1] == 1 + 2 * 2 + 16  # class token, top_n x length prompts, 16 patches
    # the inserted tokens are the selected prompts plus the class token's position embedding
    captured = {}
    h = backbone.blocks[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    model.prompt(q)
    model.adapter.run(x)
    h.remove()
    model.adapter.state.clear()
    idx = model.last_selection
    expected = model.pool.prompts[idx[0]].reshape(-1, 16) + backbone.pos_embed[0, 0]
    torch.testing.assert_close(captured["x"][0, 1:5], expected)
    feats = model.features(x)
    torch.testing.assert_close(feats, model.adapter.finalize(tokens)[:, 1:5].mean(1))


def test_dualprompt_trains_with_the_tasks_e_prompt_and_selects_by_key_at_test():
    model, _, shape = _build("dualprompt", "tiny_vit")
    x = torch.randn(4, *shape)
    q = model.query(x)
    with torch.no_grad():  # key 0 matches every query best
        model.pool.keys.copy_(torch.stack([q.mean(0), -q.mean(0), torch.randn_like(q[0])]))
    model.begin_task(1)
    model.train()
    out = model(x)
    assert model.last_selection.tolist() == [[1]] * 4
    out.sum().backward()
    grad = model.pool.prompts.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert model.pool.keys.grad is None or model.pool.keys.grad[0].abs().sum() == 0
    model.eval()
    model(x)
    assert model.last_selection.tolist() == [[0]] * 4


def test_dualprompt_starts_a_task_from_the_previous_e_prompt():
    model, _, _ = _build("dualprompt", "tiny_vit")
    model.begin_task(0)
    assert not torch.equal(model.pool.prompts[1], model.pool.prompts[0])
    model.begin_task(1)
    assert torch.equal(model.pool.prompts[1], model.pool.prompts[0])


def test_dualprompt_default_layers_and_bad_layers():
    backbone, _ = make_backbone("tiny_vit", depth=4)
    model = DualPromptModel(backbone, 5, DualPromptConfig(), n_tasks=2)
    assert (model.g_layers, model.e_layers) == ([0, 1], [2, 3])
    backbone, _ = make_backbone("timm", depth=2)
    with pytest.raises(ValueError, match="e_layers index 2 is outside the model"):
        DualPromptModel(backbone, 5, DualPromptConfig(e_layers=(2, 3, 4)), n_tasks=2)
    with pytest.raises(ValueError, match="pool is smaller than top-N"):
        DualPromptModel(backbone, 5, DualPromptConfig(top_n=3), n_tasks=2)
    backbone, _ = make_backbone("open_clip", depth=2)
    with pytest.raises(ValueError, match="layers index 5 is outside the model"):
        CodaPromptModel(backbone, 5, CodaPromptConfig(layers=(0, 5)), n_tasks=2)
    with pytest.raises(ValueError, match="components"):
        CodaPromptModel(backbone, 5, CodaPromptConfig(components_per_task=10), n_tasks=2)  # 20 keys in 16 dims


def test_coda_weights_are_cosines_of_query_times_attention_with_keys():
    model, _, shape = _build("coda_prompt", "timm")
    layer = model.coda.layers[0]
    q = torch.randn(3, model.feature_dim)
    alpha = layer.weights(q)
    K, A = layer.K[0].detach(), layer.A[0].detach()
    expected = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(q[b] * A[m], K[m], dim=0)
                                         for m in range(K.shape[0])]) for b in range(3)])
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)
    pk, pv = layer(q)
    prompt = torch.einsum("bm,mlw->blw", alpha, layer.P[0])
    torch.testing.assert_close(torch.cat([pk, pv], 1), prompt)
    assert pk.shape == (3, 2, 32)
    # after the next task's slice is added, the weights and the sum run over every slice (old ones included)
    model.begin_task(1)
    alpha = layer.weights(q)
    assert alpha.shape == (3, 6)
    K, A, P = (torch.cat([t.detach() for t in plist]) for plist in (layer.K, layer.A, layer.P))
    expected = (l2_normalize(q[:, None] * A[None]) * l2_normalize(K)[None]).sum(-1)
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-6)
    pk, pv = layer(q)
    torch.testing.assert_close(torch.cat([pk, pv], 1), torch.einsum("bm,mlw->blw", expected, P), rtol=1e-5,
                               atol=1e-6)


def test_coda_old_slices_unchanged_and_new_components_orthogonal():
    model, backbone, shape = _build("coda_prompt", "tiny_vit")
    x = torch.randn(6, *shape)
    y = torch.tensor([0, 1, 2, 3, 4, 0])

    def train_task(task):
        model.begin_task(task)
        opt = torch.optim.Adam(model.trainable_parameters(), lr=0.05, weight_decay=0.1)
        model.train()
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    train_task(0)
    old = [[p.detach().clone() for p in (layer.P[0], layer.K[0], layer.A[0])] for layer in model.coda.layers]
    model.begin_task(1)
    for layer in model.coda.layers:
        for plist in (layer.P, layer.K, layer.A):
            # slice 1 is made after slice 0 trained (its vectors are no longer orthogonal to each other)
            o = plist[0].detach().reshape(plist[0].shape[0], -1).double()
            n = plist[1].detach().reshape(plist[1].shape[0], -1).double()
            assert (o @ o.T - torch.eye(o.shape[0], dtype=o.dtype)).abs().max() > 1e-3
            assert (o @ n.T).abs().max() < 1e-5
            gram = n @ n.T
            torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-5, rtol=0)
    train_task(1)
    for layer, saved in zip(model.coda.layers, old, strict=True):
        for p, s in zip((layer.P[0], layer.K[0], layer.A[0]), saved, strict=True):
            assert torch.equal(p, s) and not p.requires_grad
        assert all(p.requires_grad for p in (layer.P[1], layer.K[1], layer.A[1]))
    # trained (task-0) slices entered the task-1 forward detached: no gradient reaches them
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(layer.P[0].grad is None for layer in model.coda.layers)
    assert all(layer.P[1].grad.abs().sum() > 0 for layer in model.coda.layers)


def test_l2_normalize_floors_tiny_norms():
    assert torch.equal(l2_normalize(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_head_starts_as_the_backbones_head_when_it_fits():
    for kind in ("tiny_vit", "timm"):
        backbone, _ = make_backbone(kind)
        if kind == "timm":
            backbone.reset_classifier(5)
        else:
            backbone.reset_head(5)
        model = L2PModel(backbone, 5, L2PConfig(pool_size=4, prompt_length=2, top_n=2))
        assert model.head_source == "backbone" and model.head is not backbone.head
        assert torch.equal(model.head.weight, backbone.head.weight) and torch.equal(model.head.bias, backbone.head.bias)
        fresh = L2PModel(backbone, 5, L2PConfig(pool_size=4, prompt_length=2, top_n=2, head_init="new"))
        assert fresh.head_source == "new" and not torch.equal(fresh.head.weight, backbone.head.weight)
    backbone, _ = make_backbone("open_clip")  # zero-shot head on normalised, scaled features: not copied
    assert L2PModel(backbone, 3, L2PConfig(pool_size=4, prompt_length=2, top_n=2)).head_source == "new"
    with pytest.raises(ValueError, match="head_init"):
        L2PConfig(head_init="pretrained")
