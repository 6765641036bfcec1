"""RoutedLoRA's batched inference (one adapted pass for a batch routed to several tasks) against one pass per
task (the implementation before issue 19), float64."""

import pytest
import torch

from avalanche_merge.lora.adapters import lora_layers
from avalanche_merge.models import TinyViT, TinyViTConfig
from avalanche_merge.retrieval.routed import FILL, CoLoRConfig, ProteusConfig, RoutedLoRA


@pytest.fixture(autouse=True)
def float64():
    """Adapters and heads created later (begin_task) in float64 too."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _model(cfg):
    torch.manual_seed(0)
    backbone = TinyViT(TinyViTConfig(image_size=8, patch_size=4, dim=8, depth=2, heads=2, num_classes=8))
    return RoutedLoRA(backbone, config=cfg)


def _data(t, n=10):
    g = torch.Generator().manual_seed(t)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) + 3.0 * t, torch.tensor([2 * t + i % 2
                                                                                               for i in range(n)])


def _fill(model, tasks=4):
    for t in range(tasks):
        x, y = _data(t)
        model.begin_task([2 * t, 2 * t + 1])
        with torch.no_grad():  # non-zero adapters and transfer gates, so that a wrong mix shows
            for layer in lora_layers(model.backbone).values():
                layer.lora_B[f"task{t}"].weight.normal_()
            model.gates[t].uniform_(-1.0, 1.0)
        model.end_task([x], [y])
    model.eval()


@pytest.mark.parametrize("cfg", [CoLoRConfig(router="oracle", n_components=2, rank=2, alpha=4),  # scaling 2
                                 ProteusConfig(router="oracle", n_components=2, head_type="linear"),
                                 CoLoRConfig(n_components=2)])
def test_batched_routed_forward_equals_one_pass_per_task(cfg):
    model = _model(cfg)
    _fill(model)
    x = torch.cat([_data(t, 6)[0] for t in (2, 0, 3, 1)])
    ids = torch.tensor([2] * 6 + [0] * 6 + [3] * 6 + [1] * 6)[torch.randperm(24, generator=torch.Generator()
                                                                              .manual_seed(1))]
    x = x[torch.randperm(24, generator=torch.Generator().manual_seed(1))]
    kwargs = {"task_ids": ids} if cfg.router == "oracle" else {}
    with torch.no_grad():
        model.batch_tasks = False
        reference = model(x, **kwargs)
        routed = model.last_routed.clone()
        model.batch_tasks = True
        batched = model(x, **kwargs)
    assert routed.unique().numel() > 1  # the batch really mixes tasks
    torch.testing.assert_close(batched, reference, rtol=1e-10, atol=1e-12)
    assert torch.equal(batched == FILL, reference == FILL)
    # each input only sees its own task's module: a pass with a single task gives the same rows
    for t in routed.unique().tolist():
        rows = routed == t
        with torch.no_grad():
            alone = model.task_logits(x[rows], t)
        torch.testing.assert_close(batched[rows], alone, rtol=1e-10, atol=1e-12)
    # nothing left active after the pass: the pretrained embedding is unchanged
    assert not model._gate_of
