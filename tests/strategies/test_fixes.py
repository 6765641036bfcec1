"""Workarounds for Avalanche 0.6.0 bugs."""

import torch
from torch import nn

from avalanche_merge.strategies.fixes import fix_si_weight_aliasing


def test_cpu_flatten_aliases_the_parameter():
    """The root cause: on CPU, detach().cpu().flatten() is a view that follows later updates."""
    p = nn.Parameter(torch.zeros(3, 2))
    stored = p.detach().cpu().flatten()
    with torch.no_grad():
        p.add_(1.0)
    assert torch.equal(stored, p.detach().flatten())


def test_fixed_si_stores_copies_and_learns_importances():
    from avalanche.training.plugins.synaptic_intelligence import SynapticIntelligencePlugin as SI

    fix_si_weight_aliasing()
    fix_si_weight_aliasing()  # idempotent
    model = nn.Linear(4, 2)
    plugin = SI(si_lambda=1.0)
    SI.create_syn_data(model, plugin.ewc_data, plugin.syn_data, set())
    SI.init_batch(model, plugin.ewc_data, plugin.syn_data, set())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    for _ in range(5):
        SI.pre_update(model, plugin.syn_data, set())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        SI.post_update(model, plugin.syn_data, set())
    anchor = {k: v.data.clone() for k, v in plugin.ewc_data[0].items()}
    assert any(not torch.equal(anchor[n], p.detach().flatten()) for n, p in model.named_parameters())
    SI.update_ewc_data(model, plugin.ewc_data, plugin.syn_data, 0.001, set(), 1, eps=1e-7)
    importance = torch.cat([v.data for v in plugin.ewc_data[1].values()])
    assert importance.abs().sum() > 0  # zero for every parameter without the fix
    with torch.no_grad():
        model.weight.add_(0.5)
    penalty = SI.compute_ewc_loss(model, plugin.ewc_data, set(), "cpu", lambd=1.0)
    assert penalty.item() > 0
