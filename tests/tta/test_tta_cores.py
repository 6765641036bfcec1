"""Pure cores of test-time adaptation: entropies, MEMO's marginal, norm selection/snapshot, AugMix, adapters."""

import math

import pytest
import torch
from torch import nn

from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.tta.adapters import ClassMeans, CosineHead, attach_parallel_adapters
from avalanche_merge.tta.augmix import AugMixConfig, augmix_views
from avalanche_merge.tta.config import TentConfig, TTACILConfig, ZeroShotConfig, resolve_templates
from avalanche_merge.tta.entropy import adapt_step, entropy_loss, marginal_entropy, softmax_entropy
from avalanche_merge.tta.norms import NormSnapshot, adaptation_mode, norm_parameters


def test_entropy_is_averaged_not_summed_and_matches_the_formula():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(1)
    per_sample = -(p * p.log()).sum(1)
    assert torch.allclose(softmax_entropy(logits), per_sample, atol=1e-6)
    assert torch.allclose(entropy_loss(logits), per_sample.mean(), atol=1e-6)  # a sum would be 6x larger
    assert math.isclose(float(entropy_loss(torch.zeros(3, 7))), math.log(7), rel_tol=1e-6)


def test_memo_marginal_entropy_is_zero_for_identical_one_hot_views_and_log_c_for_uniform():
    one_hot = torch.full((4, 8, 10), -1e4)
    one_hot[..., 3] = 1e4
    assert float(marginal_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)
    assert float(marginal_entropy(torch.zeros(4, 8, 10))) == pytest.approx(math.log(10), rel=1e-6)
    # confident views that disagree: per-view entropy ~0 but the marginal over the views is log 2
    split = torch.full((1, 2, 10), -1e4)
    split[0, 0, 1] = split[0, 1, 2] = 1e4
    assert float(marginal_entropy(split)) == pytest.approx(math.log(2), rel=1e-5)
    assert float(softmax_entropy(split).mean()) == pytest.approx(0.0, abs=1e-6)


def test_per_instance_marginal_differs_from_the_codes_batch_marginal():
    # two images, each with confident identical views, of different classes: per-instance 0, batch-marginal log 2
    logits = torch.full((2, 4, 5), -1e4)
    logits[0, :, 0] = logits[1, :, 1] = 1e4
    assert float(marginal_entropy(logits, per_instance=True)) == pytest.approx(0.0, abs=1e-6)
    assert float(marginal_entropy(logits, per_instance=False)) == pytest.approx(math.log(2), rel=1e-5)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 6, generator=g)
    manual = torch.stack([-(z[i].softmax(-1).mean(0) * z[i].softmax(-1).mean(0).log()).sum() for i in range(3)])
    assert torch.allclose(marginal_entropy(z), manual.mean(), atol=1e-6)


def test_norm_parameters_are_exactly_the_affine_norm_weights():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4 * 26 * 26),
                          nn.Linear(4 * 26 * 26, 3), nn.GroupNorm(1, 3))
    names = [n for n, _ in norm_parameters(model)]
    assert names == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    with pytest.raises(ValueError, match="no normalisation layer"):
        norm_parameters(nn.Sequential(nn.Linear(3, 3)))


def test_snapshot_restores_norm_params_and_bn_buffers_in_place():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LayerNorm(4))
    snap = NormSnapshot(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = model[2].weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(8, 3))  # BatchNorm running statistics move
    snap.restore()
    after = model.state_dict()
    for k in before:
        if k.startswith("0."):  # the linear layer is not normalisation state: not restored
            assert not torch.equal(before[k], after[k])
        else:
            assert torch.equal(before[k], after[k]), k
    assert model[2].weight is live


def test_adaptation_mode_uses_batch_statistics_and_restores_flags():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    params = [p for _, p in norm_parameters(model)]
    running = model[1].running_mean.clone()
    x = torch.randn(16, 3) * 5 + 2
    with adaptation_mode(model, params):
        assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
        out = model(x)
        h = model[0](x)
        expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        assert torch.allclose(out, expected * model[1].weight + model[1].bias, atol=1e-4)
    assert torch.equal(model[1].running_mean, running)  # never updated
    assert all(p.requires_grad for p in model.parameters())
    assert not model[1].training and model[1].track_running_stats


def test_adapt_step_moves_only_the_given_parameters_and_leaves_grads_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 5))
    params = [p for _, p in norm_parameters(model)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.5)
    adapt_step(entropy_loss(model(torch.randn(8, 3))), params, opt)
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["1.weight", "1.bias"]
    assert all(p.grad is None for p in model.parameters())


def test_adapt_step_skips_unused_parameters_and_puts_back_existing_grads():
    """A norm layer the loss does not reach (e.g. a branch switched off) gets no gradient and does not move; a
    ``.grad`` left by the training phase is restored after the step, not cleared."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 5))
    unused = nn.LayerNorm(4)
    params = [p for _, p in norm_parameters(model)] + list(unused.parameters())
    previous = [torch.full_like(p, 0.25) for p in params]
    for p, g in zip(params, previous, strict=True):
        p.grad = g.clone()
    frozen = {k: v.clone() for k, v in unused.state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.5)
    adapt_step(entropy_loss(model(torch.randn(8, 3))), params, opt)
    assert all(torch.equal(frozen[k], v) for k, v in unused.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(params, previous, strict=True))


def test_augmix_views_are_deterministic_label_preserving_mixes_in_range():
    # smooth images (bilinear up-sampled 4x4 noise): a few pixels of shift keep an image close to itself
    coarse = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    x = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)
    a = augmix_views(x, 4, generator=torch.Generator().manual_seed(0))
    b = augmix_views(x, 4, generator=torch.Generator().manual_seed(0))
    c = augmix_views(x, 4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 4, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.equal(a[:, 0], a[:, 1])  # each view draws its own augmentation
    # mild on average: the views of an image stay closer to it than to another image (equalize alone can move
    # one smooth view far)
    d_own = (a - x.unsqueeze(1)).abs().mean((2, 3, 4))
    d_other = (a - x.roll(1, 0).unsqueeze(1)).abs().mean((2, 3, 4))
    assert bool((d_own.mean(1) < d_other.mean(1)).all())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augmix_views(x * 2 - 1, 2, generator=torch.Generator())
    with pytest.raises(ValueError, match="width"):
        AugMixConfig(width=0)


def test_parallel_adapters_start_at_identity_and_add_a_scaled_branch_per_block():
    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=2, heads=2)).eval()
    x = torch.rand(2, 1, 28, 28)
    ref = model(x)
    attach_parallel_adapters(model, bottleneck=4, scale=0.1)
    assert torch.equal(model(x), ref)  # zero-initialised up-projection
    block = model.blocks[0]
    with torch.no_grad():
        block.adaptmlp.up.weight.normal_()
    captured = {}
    block.norm2.register_forward_pre_hook(lambda m, a: captured.setdefault("x_mid", a[0]))
    h = model.blocks[0](model.patch_embed(x).flatten(2).transpose(1, 2)[:, :1].expand(-1, 3, -1).contiguous())
    x_mid = captured["x_mid"]
    F = torch.nn.functional  # functional calls: the block's own modules would run the adapter hooks again
    normed = F.layer_norm(x_mid, (16,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    mlp = F.linear(F.gelu(F.linear(normed, block.fc1.weight, block.fc1.bias)), block.fc2.weight, block.fc2.bias)
    assert torch.allclose(h, x_mid + mlp + 0.1 * block.adaptmlp.up(torch.relu(block.adaptmlp.down(x_mid))),
                          atol=1e-5)
    with pytest.raises(ValueError, match="no transformer block"):
        attach_parallel_adapters(nn.Linear(3, 3), bottleneck=2)


def test_cosine_head_and_class_means():
    head = CosineHead(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0], [0, 0, 0]]))
        head.sigma.fill_(5.0)
    out = head(torch.tensor([[3.0, 4.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[5 * 0.6, 0.0]]))
    means = ClassMeans(3, 2)
    means.update(torch.tensor([[1.0, 0], [3.0, 2]]), torch.tensor([2, 2]))
    means.update(torch.tensor([[5.0, 4]]), torch.tensor([2]))  # met again: count-weighted
    assert means.seen() == [2]
    assert torch.allclose(means.means()[2], torch.tensor([3.0, 2.0], dtype=torch.float64))


def test_configs_validate():
    assert len(resolve_templates("openai_imagenet")) == 80
    assert len(resolve_templates("simple_imagenet")) == 7
    assert resolve_templates("primer") == ("a photo of a {}.",)
    for bad, err in (("imagenet", ValueError), ([], ValueError), (["no slot"], ValueError), (3, TypeError)):
        with pytest.raises(err):
            resolve_templates(bad)
    with pytest.raises(ValueError, match="templates"):
        ZeroShotConfig(templates="nope")
    with pytest.raises(ValueError, match="optimizer"):
        TentConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="steps"):
        TentConfig(steps=0)
    with pytest.raises(ValueError, match="n_views"):
        TTACILConfig(n_views=0)
    with pytest.raises(ValueError, match="lr"):
        TTACILConfig(lr=0.0)
