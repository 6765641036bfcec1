"""Step cost and the memory-adjusted FLOP budget (FoMo-in-Flux, Roth et al. 2024)."""

import pytest
import torch
from torch import nn

from avalanche_merge.evaluation.compute import StepCost, StepMeter, budget_steps, memory_adjusted_flops


def _step(model, optimizer, x, y):
    meter = StepMeter()
    meter.start(model)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return meter.stop(model, optimizer, len(x))


def test_flops_are_forward_plus_backward_of_the_matmuls():
    torch.manual_seed(0)
    model = nn.Linear(7, 5, bias=False)
    x, y = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    cost = _step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    # forward 2*B*I*O; backward: the weight gradient 2*B*I*O (no input gradient: x needs none)
    assert cost.flops == 2 * (2 * 4 * 7 * 5)
    x.requires_grad_(True)
    cost_in = _step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    assert cost_in.flops == 3 * (2 * 4 * 7 * 5)  # + the input gradient


def test_memory_counts_params_grads_optimizer_state_and_saved_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    n = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(5, 8), torch.zeros(5, dtype=torch.long)
    sgd = _step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    adam = _step(model, torch.optim.AdamW(model.parameters(), lr=0.1), x, y)
    assert adam.memory_bytes - sgd.memory_bytes == 2 * n * 4  # AdamW's two moments
    assert sgd.activation_bytes > 0
    assert sgd.memory_bytes == 2 * n * 4 + sgd.activation_bytes  # weights + grads + activations
    # freezing the first layer removes its gradient and its optimizer state
    for p in model[0].parameters():
        p.requires_grad_(False)
        p.grad = None
    frozen = _step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1), x, y)
    assert frozen.memory_bytes < adam.memory_bytes


def test_budget_steps_follow_the_memory_adjusted_flops():
    ref = StepCost(flops=1000, memory_bytes=400, activation_bytes=100, batch_size=8)
    half_memory = StepCost(flops=1000, memory_bytes=200, activation_bytes=100, batch_size=8)
    double_flops = StepCost(flops=2000, memory_bytes=400, activation_bytes=100, batch_size=8)
    assert memory_adjusted_flops(ref, ref) == 1000
    assert budget_steps(10 * 1000, ref, ref) == 10  # k reference steps give the reference exactly k
    assert budget_steps(10 * 1000, half_memory, ref) == 20  # memory ratio 1/2 doubles the steps
    assert budget_steps(10 * 1000, double_flops, ref) == 5
    assert budget_steps(2500, ref, ref) == 2  # floor, not round


def test_a_budget_below_one_step_is_refused():
    ref = StepCost(flops=1000, memory_bytes=400, activation_bytes=0, batch_size=8)
    with pytest.raises(ValueError, match="smaller than one training step of lwf"):
        budget_steps(999, ref, ref, method="lwf")
    with pytest.raises(ValueError, match="positive"):
        budget_steps(0, ref, ref)
