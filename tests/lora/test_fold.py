"""Folded frozen adapters (avalanche_merge.lora.fold) against peft's own per-adapter forward, float64."""

import pytest
import torch
import torch.nn.functional as F

from avalanche_merge.lora import list_learners, make_learner
from avalanche_merge.lora.adapters import lora_layers
from avalanche_merge.lora.fold import FoldedFrozen, folding
from avalanche_merge.models.vit import TinyViT, TinyViTConfig

TOL = {"rtol": 1e-10, "atol": 1e-12}


def _model():
    torch.manual_seed(0)
    return TinyViT(TinyViTConfig(dim=16, depth=2, heads=2, num_classes=4)).double()


def _data(task):
    g = torch.Generator().manual_seed(task)
    return torch.randn(12, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 4, (12,), generator=g)


def _forward_and_grads(learner, params, x, y, fold):
    with folding(fold):
        out = learner.model(x)
        loss = F.cross_entropy(out, y)
        penalty = learner.penalty()
        if penalty is not None:
            loss = loss + penalty
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out.detach(), grads


def _assert_same(learner, params, x, y):
    out_f, grads_f = _forward_and_grads(learner, params, x, y, True)
    out_u, grads_u = _forward_and_grads(learner, params, x, y, False)
    torch.testing.assert_close(out_f, out_u, **TOL)
    for gf, gu in zip(grads_f, grads_u):
        assert (gf is None) == (gu is None)
        if gf is not None:
            torch.testing.assert_close(gf, gu, **TOL)


def _folds_in_use(model):
    return [v.fold for layer in lora_layers(model).values() for v in getattr(layer, "lora_variant", {}).values()
            if isinstance(v, FoldedFrozen) and v.fold.ok]


@pytest.mark.parametrize("name", list_learners())
def test_folded_forward_and_gradients_equal_unfolded_after_every_task(name):
    # alpha != rank: peft's scaling is 2, so a fold that drops the scaling fails
    learner = make_learner(name, _model(), rank=2, alpha=4, dropout=0.0, target_modules=("q", "k", "v"))
    learner.set_stream_length(4)
    for task in range(4):
        x, y = _data(task)
        params = learner.begin_task([x])
        opt = torch.optim.SGD(params, lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(learner.model(x), y)
            penalty = learner.penalty()
            (loss if penalty is None else loss + penalty).backward()
            learner.after_backward()
            opt.step()
            learner.after_step()
        _assert_same(learner, params, x, y)
        learner.end_task([x])
        learner.model.eval()
        with torch.no_grad(), folding(True):
            folded = learner.model(x)
        with torch.no_grad(), folding(False):
            torch.testing.assert_close(folded, learner.model(x), **TOL)
        learner.model.train()
        if task >= 2 and learner.per_task and lora_layers(learner.model):
            assert _folds_in_use(learner.model), "no layer folded its frozen adapters"


def test_sdlora_magnitudes_train_through_the_fold():
    learner = make_learner("sdlora", _model(), rank=2, dropout=0.0, target_modules=("q", "v"))
    for task in range(3):
        x, y = _data(task)
        params = learner.begin_task([x])
        with torch.no_grad():  # magnitudes away from their common reset value, so a dropped factor shows
            for i, p in enumerate(learner.magnitude_parameters()):
                p.fill_(0.3 + 0.4 * i)
            for layer in lora_layers(learner.model).values():  # B starts at zero: a non-zero direction
                layer.lora_B[f"task{task}"].parametrizations.weight.original.normal_()
        _assert_same(learner, params, x, y)
        magnitudes = {id(p) for p in learner.magnitude_parameters()}
        _, grads = _forward_and_grads(learner, params, x, y, True)
        frozen_grads = [g for p, g in zip(params, grads) if id(p) in magnitudes]
        assert len(frozen_grads) == task + 1 and all(g is not None and g.abs() > 0 for g in frozen_grads)
        learner.end_task([x])
    assert _folds_in_use(learner.model)


def test_cache_follows_in_place_changes_and_new_tasks():
    learner = make_learner("olora", _model(), rank=2, dropout=0.0, target_modules=("q", "v"))
    for task in range(3):
        x, y = _data(task)
        params = learner.begin_task([x])
        with torch.no_grad():  # B starts at zero: give every adapter a non-zero update
            for layer in lora_layers(learner.model).values():
                layer.lora_B[f"task{task}"].weight.normal_()
        learner.end_task([x])
    x, y = _data(3)
    params = learner.begin_task([x])
    with torch.no_grad(), folding(True):
        before = learner.model(x)
    layer = next(iter(lora_layers(learner.model).values()))
    with torch.no_grad():
        layer.lora_B["task1"].weight.mul_(3.0)  # a frozen member changes in place: the cache must be rebuilt
    _assert_same(learner, params, x, y)
    with torch.no_grad(), folding(True):
        assert not torch.allclose(learner.model(x), before)
    folds = {id(f): f for f in _folds_in_use(learner.model)}
    assert folds and all(f.names == ("task0", "task1", "task2") for f in folds.values())


def test_dropout_is_shared_and_eval_is_exact():
    learner = make_learner("olora", _model(), rank=2, dropout=0.5, target_modules=("q", "v"))
    for task in range(3):
        x, _ = _data(task)
        learner.begin_task([x])
        with torch.no_grad():
            for layer in lora_layers(learner.model).values():
                layer.lora_B[f"task{task}"].weight.normal_()
        learner.end_task([x])
    x, _ = _data(3)
    learner.begin_task([x])
    learner.model.eval()
    with torch.no_grad(), folding(True):
        folded = learner.model(x)
    with torch.no_grad(), folding(False):
        torch.testing.assert_close(folded, learner.model(x), **TOL)
    assert _folds_in_use(learner.model)
