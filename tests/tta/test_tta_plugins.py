"""TENT and TTACIL's MEMO step inside Avalanche: what they adapt, what they predict from, what they restore."""

import copy
from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from torch import nn

from avalanche_merge.benchmarks.base import make_scenario, tensor_classification_dataset
from avalanche_merge.models.vit import TinyViT, TinyViTConfig
from avalanche_merge.plugins.tta import MemoLayerNormPlugin, TentPlugin
from avalanche_merge.tta.augmix import augmix_views
from avalanche_merge.tta.config import TentConfig, TTACILConfig
from avalanche_merge.tta.entropy import entropy_loss, marginal_entropy
from avalanche_merge.tta.norms import norm_parameters


def _stream(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    sets = [tensor_classification_dataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 4, (n,), generator=g),
                                          0) for _ in range(4)]
    return make_scenario(sets[:2], sets[2:])


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))


class Spy(SupervisedPlugin):
    """Records, at each evaluation batch, the LayerNorm weight and the TENT optimizer's parameters."""

    def __init__(self, tent=None):
        super().__init__()
        self.tent, self.ln_at_iteration, self.ln_at_forward, self.opt_ids, self.outputs = tent, [], [], [], []

    def before_eval_iteration(self, strategy, **kw):
        self.ln_at_iteration.append(strategy.model.norm.weight.detach().clone())

    def before_eval_forward(self, strategy, **kw):
        self.ln_at_forward.append(strategy.model.norm.weight.detach().clone())
        if self.tent is not None and self.tent.optimizer is not None:
            self.opt_ids.append({id(p) for g in self.tent.optimizer.param_groups for p in g["params"]})

    def after_eval_forward(self, strategy, **kw):
        self.outputs.append(strategy.mb_output.detach().clone())


def _naive(model, plugins, lr=1e-2):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), train_mb_size=16,
                 train_epochs=1, eval_mb_size=16, plugins=plugins, evaluator=None)


def test_tent_restores_every_parameter_and_its_optimizer_holds_only_norm_params():
    model = _model()
    tent = TentPlugin(config=TentConfig(lr=0.05))
    spy = Spy(tent)
    strategy = _naive(model, [tent, spy])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.eval(_stream().test_stream)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical, norm parameters included
    norm_ids = {id(p) for _, p in norm_parameters(model)}
    assert spy.opt_ids and all(ids == norm_ids for ids in spy.opt_ids)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    # online within an experience: the LayerNorm moved between batches (3 batches of 16 per experience)
    assert not torch.equal(spy.ln_at_forward[0], spy.ln_at_forward[2])
    assert tent.batches_adapted == 6


def test_tent_episodic_resets_the_layernorms_before_every_batch():
    model = _model()
    spy = Spy()
    strategy = _naive(model, [TentPlugin(config=TentConfig(lr=0.05, episodic=True)), spy])
    start = model.norm.weight.detach().clone()
    strategy.eval(_stream().test_stream)
    assert all(torch.equal(w, start) for w in spy.ln_at_forward)


def _reference_tent(model, batches, lr):
    """The reference's loop: forward, mean entropy, backward, step, return the pre-update outputs (SGD)."""
    model = copy.deepcopy(model).eval()
    model.requires_grad_(False)
    params = [p for _, p in norm_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    outs = []
    for x in batches:
        out = model(x)
        entropy_loss(out).backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return outs


def test_tent_predicts_from_the_pre_update_forward_with_the_mean_entropy():
    model = _model()
    stream = _stream()
    spy = Spy()
    cfg = TentConfig(optimizer="sgd", lr=0.5, momentum=0.9)
    strategy = _naive(model, [TentPlugin(config=cfg), spy])
    strategy.eval(stream.test_stream[0])
    x = torch.stack([stream.test_stream[0].dataset[i][0] for i in range(48)])
    ref = _reference_tent(model, x.split(16), lr=0.5)
    with torch.no_grad():
        plain = model.eval()(x[:16])
    assert torch.allclose(spy.outputs[0], plain, atol=1e-6)  # batch 1: the unadapted model's prediction
    for got, want in zip(spy.outputs, ref, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(spy.outputs[2], model(x[32:]), atol=1e-4)  # adaptation changed later predictions


def test_tent_leaves_training_unchanged():
    stream = _stream(1)
    finals = []
    for plugins in ([], [TentPlugin(config=TentConfig(lr=0.1))]):
        model = _model(3)
        torch.manual_seed(0)
        strategy = _naive(model, plugins)
        for exp in stream.train_stream:
            strategy.train(exp)
            strategy.eval(stream.test_stream)
        finals.append(model.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def _toy_shift(seed):
    """Two Gaussian classes in 2-D (rotated, not axis-aligned); the test set is shifted and scaled."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(2, 2, generator=g))[0]

    def sample(n, shift, scale):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 2, generator=g) * 0.6 + torch.stack([y * 2.0 - 1, torch.zeros(n)], 1)
        return (x @ rot.T) * scale + shift, y

    return sample(512, 0.0, 1.0), sample(256, torch.tensor([2.5, -1.5]), 1.8)


@pytest.mark.parametrize("seeds", [range(5)])
def test_tent_beats_no_adaptation_on_a_covariate_shift_averaged_over_seeds(seeds):
    gains = []
    for seed in seeds:
        (xs, ys), (xt, yt) = _toy_shift(seed)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(200):
            idx = torch.randint(0, 512, (64,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
        with torch.no_grad():
            plain = (model.eval()(xt).argmax(1) == yt).float().mean()
        strategy = SimpleNamespace(model=model)
        tent = TentPlugin(config=TentConfig())
        tent.before_eval_exp(strategy)
        correct = 0
        for x, y in zip(xt.split(64), yt.split(64), strict=True):
            strategy.mb_x = x
            tent.before_eval_forward(strategy)
            strategy.mb_output = model(x)
            tent.after_eval_forward(strategy)
            correct += int((strategy.mb_output.argmax(1) == y).sum())
        tent.after_eval_exp(strategy)
        gains.append(correct / len(yt) - float(plain))
    assert sum(gains) / len(gains) > 0


def _memo_strategy(seed=0):
    model = _model(seed).eval()
    strategy = SimpleNamespace(model=model, mb_x=torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(9)))
    strategy.adapt_logits = model
    return strategy


def test_memo_step_is_one_sgd_step_on_the_per_instance_marginal_then_restored():
    cfg = TTACILConfig(n_views=4, lr=0.5)
    strategy = _memo_strategy()
    model = strategy.model
    memo = MemoLayerNormPlugin(config=cfg, seed=5)
    memo.snapshot(model)
    ln_ids = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert {id(p) for g in memo.optimizer.param_groups for p in g["params"]} == ln_ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # hand reference: same views (same generator seed), SGD step on LayerNorms, predict the clean batch
    ref = copy.deepcopy(model)
    views = augmix_views(strategy.mb_x, 4, generator=torch.Generator().manual_seed(5))
    params = [p for n, p in ref.named_parameters() if "norm" in n]
    loss = marginal_entropy(ref(views.flatten(0, 1)).view(6, 4, -1))
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= 0.5 * (g + cfg.weight_decay * p)
        want = ref(strategy.mb_x)
    memo.before_eval_forward(strategy)
    with torch.no_grad():
        got = model(strategy.mb_x)  # what the strategy's forward predicts: after the update
    assert torch.allclose(got, want, atol=1e-5)
    memo.after_eval_forward(strategy)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored after the batch
    with torch.no_grad():
        assert not torch.allclose(got, model(strategy.mb_x), atol=1e-6)  # the restored model predicts otherwise


def test_memo_momentum_is_reset_per_batch_unless_carried():
    for carry, expect_state in ((False, False), (True, True)):
        strategy = _memo_strategy()
        memo = MemoLayerNormPlugin(config=TTACILConfig(n_views=2, carry_momentum=carry), seed=0)
        memo.snapshot(strategy.model)
        memo.before_eval_forward(strategy)
        memo.after_eval_forward(strategy)
        assert bool(memo.optimizer.state) is expect_state
        memo.after_eval_exp(strategy)
        assert not memo.optimizer.state  # always reset at the end of an experience


def test_tent_options_as_keywords_and_typos_list_the_valid_ones():
    assert TentPlugin(lr=0.05, episodic=True).config == TentConfig(lr=0.05, episodic=True)
    with pytest.raises(ValueError, match=r"unknown TentConfig option\(s\) \['lrr'\]; valid options: \[.*'lr'"):
        TentPlugin(lrr=0.1)
    with pytest.raises(ValueError, match="not both"):
        TentPlugin(config=TentConfig(), lr=0.1)
    with pytest.raises(TypeError):
        TentPlugin(TentConfig())  # keyword-only, like every plugin
