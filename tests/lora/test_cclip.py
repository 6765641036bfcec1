"""C-CLIP (Liu et al., ICLR 2025): CKC loss, LoRA merge at alpha, teacher frozen, runnable on a tiny open_clip."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_merge.lora.adapters import add_adapter
from avalanche_merge.lora.cclip import Projector, ckc_loss, clip_contrastive_loss, merge_lora_
from avalanche_merge.lora.config import LoRAConfig

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_ckc_is_log_n_on_unrelated_features():
    # independent random features in a wide space: every logit is ~0, so the loss is ~log N
    n, d = 16, 4096
    loss = ckc_loss(_rand(n, d, 0), _rand(n, d, 1), _rand(n, d, 2), _rand(n, d, 3), temperature=0.07)
    assert abs(float(loss) - math.log(n)) < 0.1


def test_ckc_vanishes_for_identical_features_with_identity_projector():
    img, txt = _rand(8, 32, 4), _rand(8, 32, 5)
    proj = nn.Identity()
    cold = float(ckc_loss(proj(img), proj(txt), img, txt, temperature=0.07))
    colder = float(ckc_loss(proj(img), proj(txt), img, txt, temperature=0.01))
    assert 0 <= colder < 1e-6 < cold  # -> 0 as the temperature drops (distinct rows)
    # the temperature divides the logits: a loss that ignored it would not move with it
    assert cold < float(ckc_loss(img, txt, img, txt, temperature=1.0))


def test_ckc_concatenates_before_normalising():
    # C-CLIP Eq. 5 normalises [image, text] as one vector: scaling the old image features changes their share
    img, txt = _rand(6, 8, 6), _rand(6, 8, 7)
    base = ckc_loss(img, txt, img, txt, temperature=0.1)
    assert not torch.isclose(base, ckc_loss(img, txt, 5 * img, txt, temperature=0.1))
    assert not torch.isclose(base, ckc_loss(5 * img, txt, img, txt, temperature=0.1))
    # positives on the diagonal: a shuffled old side (pairs broken) must cost more (kills a sign flip)
    perm = torch.roll(torch.arange(6), 1)
    assert float(ckc_loss(img, txt, img[perm], txt[perm], temperature=0.1)) > float(base) + 1.0


def test_clip_loss_prefers_matching_pairs_and_uses_the_scale():
    img = F.normalize(_rand(8, 16, 8), dim=-1)
    good = clip_contrastive_loss(img, img, 100.0)
    bad = clip_contrastive_loss(img, torch.roll(img, 1, 0), 100.0)
    assert float(good) < 1e-3 and float(bad) > 10.0
    assert float(clip_contrastive_loss(img, img, 1.0)) > float(good)


def test_ckc_refuses_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        ckc_loss(_rand(4, 2, 0), _rand(4, 2, 0), _rand(4, 2, 0), _rand(4, 2, 0), temperature=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        ckc_loss(_rand(1, 2, 0), _rand(1, 2, 0), _rand(1, 2, 0), _rand(1, 2, 0))


def test_projector_is_two_linear_layers():
    p = Projector(16)
    linears = [m for m in p.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 16)]


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_merge_is_base_plus_alpha_delta(alpha):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    base = [m.weight.detach().clone() for m in (model[0], model[2])]
    add_adapter(model, "t0", LoRAConfig(rank=2, alpha=4.0), ["0", "2"])
    deltas = []
    with torch.no_grad():
        for i in (0, 2):
            layer = model[i]
            layer.lora_B["t0"].weight.normal_()  # peft starts B at zero: give the adapter an update
            deltas.append(layer.scaling["t0"] * layer.lora_B["t0"].weight @ layer.lora_A["t0"].weight)
    assert merge_lora_(model, alpha) == 2
    for i, w0, d in zip((0, 2), base, deltas, strict=True):
        assert type(model[i]) is nn.Linear  # the LoRA wrapper is gone
        torch.testing.assert_close(model[i].weight, w0 + alpha * d)
    with pytest.raises(ValueError, match="alpha"):
        merge_lora_(model, 0.0)


def _clip_stream(n_exp=2, per_class=8, seed=0):
    from avalanche_merge.benchmarks.base import make_scenario, tensor_classification_dataset

    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, 3, 32, 32, generator=g)  # dense class patterns, not axis-aligned
    sets = []
    for e in range(n_exp):
        classes = [2 * e, 2 * e + 1]
        y = torch.tensor(classes).repeat_interleave(per_class)
        x = protos[y] + 0.3 * torch.randn(len(y), 3, 32, 32, generator=g)
        sets.append(tensor_classification_dataset(x, y, 0))
    return make_scenario(sets, sets)


def test_cclip_runs_on_a_tiny_open_clip_and_keeps_the_teacher_frozen():
    from avalanche.core import SupervisedPlugin

    from avalanche_merge.models.clip import zero_shot_classifier
    from avalanche_merge.strategies.cclip import CCLIP, CCLIPConfig

    names = ["cat", "dog", "car", "tree"]
    torch.manual_seed(0)
    model = zero_shot_classifier("tiny", names, model_cfg=TINY_CFG)
    image_params = {n: p.detach().clone() for n, p in model.image_encoder.named_parameters()}

    class Spy(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.teacher_snapshots, self.teacher_grads = [], []

        def before_training_iteration(self, strategy, **kw):
            if strategy.teacher is not None and not self.teacher_snapshots:
                self.teacher_snapshots.append({k: v.clone() for k, v in strategy.teacher.state_dict().items()})

        def after_backward(self, strategy, **kw):
            if strategy.teacher is not None:
                self.teacher_grads.append(any(p.grad is not None for p in strategy.teacher.parameters()))

        def after_training_epoch(self, strategy, **kw):
            if strategy.teacher is not None:
                self.final = {k: v.clone() for k, v in strategy.teacher.state_dict().items()}

    spy = Spy()
    strategy = CCLIP(model=model, class_names=names, config=CCLIPConfig(rank=4, alpha=8.0, templates=("a {}.",)),
                     lr=1e-3, train_mb_size=8, train_epochs=1, eval_mb_size=16, plugins=[spy], evaluator=None)
    scenario = _clip_stream()
    for exp in scenario.train_stream:
        strategy.train(exp)
    assert strategy.n_trained == 2
    assert spy.teacher_snapshots and not any(spy.teacher_grads)
    for k, v in spy.final.items():  # the teacher of task 2 never changed during task 2
        torch.testing.assert_close(v, spy.teacher_snapshots[0][k])
    assert not any("lora_" in n for n, _ in strategy.clip.named_parameters())  # merged and removed
    changed = any(not torch.equal(p, image_params[n]) for n, p in model.image_encoder.named_parameters())
    assert changed  # the merged LoRA moved the image tower
    assert torch.allclose(model.head.weight.norm(dim=1), torch.ones(4), atol=1e-5)  # rebuilt zero-shot head
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_cclip_refuses_missing_captions_and_text_tower():
    from avalanche_merge.config import ConfigError
    from avalanche_merge.runner.plan import load_experiment, plan_experiment
    from avalanche_merge.strategies.cclip import CCLIP, CCLIPConfig

    with pytest.raises(ValueError, match="no captions"):
        CCLIPConfig(templates=())
    with pytest.raises(ValueError, match="'\\{\\}'"):
        CCLIPConfig(templates=("a photo",))
    with pytest.raises(ValueError, match="text tower"):
        CCLIP(model=nn.Linear(2, 2), class_names=["a"], config=CCLIPConfig(), lr=1e-3)
    config = {"benchmarks": ["split_digits"], "methods": ["c_clip"], "seeds": [0], "loggers": []}
    with pytest.raises(ConfigError, match="no text tower"):
        plan_experiment(load_experiment(config))


def _np_symmetric_ce(logits):
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)

    def ce(m):
        m = m - m.max(axis=1, keepdims=True)
        return float(np.mean(-(np.diag(m) - np.log(np.exp(m).sum(axis=1)))))

    return 0.5 * (ce(z) + ce(z.T))


def test_losses_equal_an_independent_float64_computation():
    """Exact values (not only limits): CLIP's loss is the mean of the two directions' cross-entropies (not their
    sum), over ``scale * image @ text.T``; CKC normalises each row of ``[image, text]`` (not the whole matrix) and
    divides by tau, 0.07 by default."""
    import numpy as np

    from avalanche_merge.lora.cclip import ckc_loss, clip_contrastive_loss

    g = torch.Generator().manual_seed(11)
    image, text = (torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1)
                   for _ in range(2))
    expected = _np_symmetric_ce(4.0 * image.numpy() @ text.numpy().T)
    assert float(clip_contrastive_loss(image, text, 4.0)) == pytest.approx(expected, rel=1e-12)
    new_i, new_t, old_i, old_t = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4))

    def rows(a, b):
        c = np.concatenate([a.numpy(), b.numpy()], axis=1)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    h, z = rows(new_i, new_t), rows(old_i, old_t)
    assert float(ckc_loss(new_i, new_t, old_i, old_t)) == pytest.approx(_np_symmetric_ce(h @ z.T / 0.07), rel=1e-12)
    assert float(ckc_loss(new_i, new_t, old_i, old_t, temperature=0.5)) == pytest.approx(
        _np_symmetric_ce(h @ z.T / 0.5), rel=1e-12)


def test_bad_pairs_name_the_arguments():
    from avalanche_merge.lora.cclip import ckc_loss, clip_contrastive_loss

    a, b = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"^image and text must be \(N, D\) of one shape, got \(4, 3\) and \(4, 2\)"):
        clip_contrastive_loss(a, b, 1.0)
    with pytest.raises(ValueError, match=r"^image and text must be"):
        clip_contrastive_loss(torch.randn(4), torch.randn(4), 1.0)  # same shape, not (N, D)
    with pytest.raises(ValueError, match=r"^new_image and new_text must be"):
        ckc_loss(a, b, a, a)
    with pytest.raises(ValueError, match=r"^old_image and old_text must be"):
        ckc_loss(a, a, a, b)
    with pytest.raises(ValueError, match=r"^a contrastive loss needs at least 2 pairs, got 1$"):
        clip_contrastive_loss(torch.randn(1, 7), torch.randn(1, 7), 1.0)
    assert torch.isfinite(clip_contrastive_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0))  # 2 pairs suffice


def test_projector_is_linear_batchnorm_relu_linear_and_accepts_width_one():
    from avalanche_merge.lora.cclip import Projector

    p = Projector(4, 3)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    lin1, bn, lin2 = p.net[0], p.net[1], p.net[3]
    y = lin1(x)
    y = (y - y.mean(0)) / torch.sqrt(y.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(p(x), lin2(torch.relu(y)), atol=1e-6)  # training mode: batch statistics
    assert Projector(1, 1)(torch.randn(3, 1)).shape == (3, 1)
    assert Projector(2).net[0].out_features == 4  # hidden defaults to 2 d
    for dim, hidden in ((0, None), (2, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            Projector(dim, hidden)
