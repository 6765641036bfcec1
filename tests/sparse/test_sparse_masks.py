"""Mask selection, the update guard and MaskedFineTuner: densities, frozen entries, ownership, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_merge.sparse import (
    MaskedUpdate,
    density_of,
    fisher_scores,
    gradient_scores,
    make_sparse_learner,
    mask_overlap,
    select_masks,
)
from avalanche_merge.sparse.masks import change_scores


def test_select_masks_per_tensor_keeps_top_entries_at_the_density():
    scores = {"a": torch.arange(10.0), "b": torch.tensor([[5.0, 1.0], [3.0, 4.0]])}
    masks = select_masks(scores, 0.3)
    assert masks["a"].tolist() == [False] * 7 + [True] * 3
    assert masks["b"].tolist() == [[True, False], [False, False]]  # round(0.3 * 4) = 1


def test_select_masks_global_and_frozen_entries():
    scores = {"a": torch.tensor([1.0, 9.0, 3.0]), "b": torch.tensor([8.0, 2.0, 7.0])}
    masks = select_masks(scores, 0.5, scope="global")  # top 3 of 6
    assert masks["a"].tolist() == [False, True, False] and masks["b"].tolist() == [True, False, True]
    frozen = {"a": torch.tensor([False, True, False]), "b": torch.tensor([True, False, False])}
    masks = select_masks(scores, 0.5, scope="global", frozen=frozen)
    assert masks["a"].tolist() == [False, False, True] and masks["b"].tolist() == [False, True, True]
    # fewer free entries than k: all free ones
    masks = select_masks({"a": torch.ones(4)}, 1.0, frozen={"a": torch.tensor([True, True, True, False])})
    assert masks["a"].tolist() == [False, False, False, True]


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_raises(density):
    with pytest.raises(ValueError, match="density"):
        select_masks({"a": torch.ones(3)}, density)


def test_bad_scope_and_frozen_shape_raise():
    with pytest.raises(ValueError, match="scope must be one of"):
        select_masks({"a": torch.ones(3)}, 0.5, scope="layer")
    with pytest.raises(ValueError, match="frozen mask of 'a' has shape"):
        select_masks({"a": torch.ones(3)}, 0.5, frozen={"a": torch.zeros(2, dtype=torch.bool)})


def test_scores_equal_direct_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1])) for _ in range(2)]
    params = {"weight": model.weight}
    grads = [torch.autograd.grad(F.cross_entropy(model(x), y), model.weight)[0] for x, y in batches]
    assert torch.allclose(gradient_scores(model, params, batches)["weight"], (grads[0] + grads[1]).abs())
    assert torch.allclose(fisher_scores(model, params, batches)["weight"], grads[0] ** 2 + grads[1] ** 2)
    before, after = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, -2.0])}
    assert change_scores(before, after)["w"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_guard_keeps_masked_entries_bit_identical(optimizer):
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    mask = torch.rand(4, 6) < 0.3
    guard = MaskedUpdate(dict(model.named_parameters()), {"weight": mask})
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5))
    # moments from unmasked steps first: they must not leak into masked entries later
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).sum().backward()
        opt.step()
    before = model.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).sum().backward()
        guard.mask_gradients()
        guard.before_step()
        opt.step()
        guard.after_step()
    w = model.weight.detach()
    assert torch.equal(w[~mask], before[~mask])
    assert not torch.equal(w[mask], before[mask])


def test_guard_rejects_bad_masks():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        MaskedUpdate(dict(model.named_parameters()), {"weight": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        MaskedUpdate(dict(model.named_parameters()), {"nope": torch.ones(2, 3, dtype=torch.bool)})


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def task_batches(task, n=3):
    g = torch.Generator().manual_seed(task)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(learner, task, steps=5):
    batches = task_batches(task)
    params = learner.begin_task(batches)
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        F.cross_entropy(learner.model(x), y).backward()
        learner.after_backward()
        learner.before_step()
        opt.step()
        learner.after_step()
    learner.end_task()


@pytest.mark.parametrize("criterion", ["gradient", "fisher", "change", "random"])
def test_masked_finetuner_updates_only_its_mask_and_owns_it(criterion):
    torch.manual_seed(0)
    model = TinyNet()
    learner = make_sparse_learner("masked", model, density=0.2, criterion=criterion, dense_steps=3)
    start = {n: p.detach().clone() for n, p in learner.params.items()}
    train(learner, 0)
    after0 = {n: p.detach().clone() for n, p in learner.params.items()}
    mask0 = learner.history[0]
    for n in start:
        assert torch.equal(after0[n][~mask0[n]], start[n][~mask0[n]])  # outside the mask: bit-identical
        assert mask0[n].sum() == round(0.2 * mask0[n].numel())       # density per tensor
    train(learner, 1)
    mask1 = learner.history[1]
    for n in start:
        assert torch.equal(learner.params[n].detach()[mask0[n]], after0[n][mask0[n]])  # task 0's weights frozen
        assert not (mask0[n] & mask1[n]).any()
    assert learner.updated_fraction() == pytest.approx([0.2, 0.2], abs=0.01)
    assert learner.overlap_matrix()[0][1] == 0.0 and learner.overlap_matrix()[0][0] == 1.0


def test_without_ownership_tasks_may_share_weights():
    learner = make_sparse_learner("masked", TinyNet(), density=0.5, criterion="random", ownership=False)
    train(learner, 0)
    train(learner, 1)
    assert 0 < mask_overlap(learner.history[0], learner.history[1]) < 1
    assert density_of(learner.history[1]) == pytest.approx(0.5, abs=0.01)


def test_gradient_mask_is_deterministic_and_random_depends_on_seed():
    masks = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        learner = make_sparse_learner("masked", TinyNet(), criterion="random", seed=seed)
        learner.begin_task([])
        masks.append(learner.masks)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert not all(torch.equal(masks[0][n], masks[2][n]) for n in masks[0])


@pytest.mark.parametrize("options, match", [
    ({"density": 0.0}, r"density must be in \(0.0, 1.0\]"),
    ({"criterion": "hessian"}, "criterion must be one of"),
    ({"parameters": "conv"}, "parameters must be one of"),
    ({"dense_steps": 0}, "dense_steps must be an int >= 1"),
    ({"max_samples": 0}, "max_samples must be an int >= 1"),
    ({"densty": 0.1}, "unknown option 'densty' for sparse learner 'masked'"),
])
def test_bad_configs_raise(options, match):
    with pytest.raises(ValueError, match=match):
        make_sparse_learner("masked", TinyNet(), **options)


def test_gradient_criterion_needs_batches():
    learner = make_sparse_learner("masked", TinyNet(), criterion="gradient")
    with pytest.raises(ValueError, match="needs the task's"):
        learner.begin_task([])
