"""Head protocols, pure torch: class lists, restricted logits, the masked loss and the per-task head."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avalanche_merge.protocol import (
    PerTaskHead,
    check_protocol,
    class_list,
    class_means,
    fill_value,
    masked_loss,
    replace_module,
    restrict_logits,
)


def test_class_list_accepts_sets_lists_tensors_and_numpy_ints():
    assert class_list({5, 1, 3}) == [1, 3, 5]
    assert class_list([3, 1, 3]) == [1, 3]
    assert class_list(torch.tensor([[2, 0]])) == [0, 2]
    assert class_list(range(2)) == [0, 1]
    assert class_list(np.array([4, 2])) == [2, 4]
    assert class_list(7) == [7]
    with pytest.raises(TypeError, match="class ids must be ints"):
        class_list([1.5])
    with pytest.raises(TypeError, match="class ids must be ints"):
        class_list([True])
    with pytest.raises(ValueError, match="class ids must be >= 0, got -1"):
        class_list([-1])


def test_check_protocol_names_the_choices():
    assert check_protocol("masked") == "masked"
    with pytest.raises(ValueError, match=r"unknown head protocol 'banana'; valid protocols: \['shared'"):
        check_protocol("banana")
    with pytest.raises(TypeError, match="protocol must be a str"):
        check_protocol(3)
    with pytest.raises(ValueError, match="unknown head protocol 'prototype'"):
        check_protocol("prototype", ("shared", "masked"))


def test_restrict_logits_excludes_other_classes_and_keeps_kept_ones():
    logits = torch.tensor([[5.0, 1.0, 2.0, 9.0], [0.0, 3.0, -1.0, 4.0]])
    out = restrict_logits(logits, {1, 2})
    assert torch.equal(out[:, [1, 2]], logits[:, [1, 2]])
    assert torch.all(out[:, [0, 3]] == fill_value(torch.float32))
    assert out.argmax(1).tolist() == [2, 1]
    assert torch.equal(restrict_logits(logits, []), logits)  # nothing seen yet: unchanged
    assert torch.equal(restrict_logits(logits, [1, 2, 7]), out)  # ids beyond the width are ignored
    assert torch.isfinite(F.log_softmax(out, 1)).all()  # finite fill: no NaN in a softmax


def test_masked_loss_is_cross_entropy_on_the_current_columns():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=g, requires_grad=True)
    targets = torch.tensor([7, 3, 7, 5, 3, 5])
    loss = masked_loss(F.cross_entropy, logits, targets, {3, 5, 7})
    # SD-LoRA's form: CE(logits[:, cols], targets re-indexed)
    cols = torch.tensor([3, 5, 7])
    expected = F.cross_entropy(logits[:, cols], torch.tensor([2, 0, 2, 1, 0, 1]))
    assert torch.allclose(loss, expected)
    loss.backward()
    others = [c for c in range(10) if c not in (3, 5, 7)]
    assert torch.all(logits.grad[:, others] == 0)
    assert torch.all(logits.grad[:, cols].abs().sum(0) > 0)


def test_masked_loss_adds_the_columns_of_replayed_targets():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([4, 5, 0, 4])  # 0: a replayed sample of an earlier experience
    loss = masked_loss(F.cross_entropy, logits, targets, [4, 5])
    expected = F.cross_entropy(logits[:, [0, 4, 5]], torch.tensor([1, 2, 0, 1]))
    assert torch.allclose(loss, expected) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="class 8 has no logit: the head has 6 outputs"):
        masked_loss(F.cross_entropy, logits, targets, [4, 8])


def test_masked_loss_passes_the_strategy_criterion():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 2, 1])
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    assert torch.allclose(masked_loss(smooth, logits, targets, [1, 2]),
                          smooth(logits[:, [1, 2]], torch.tensor([0, 1, 0])))


def head_with_tasks():
    torch.manual_seed(0)
    initial = nn.Linear(4, 6)
    head = PerTaskHead(4, 6, initial=initial)
    h0 = head.add_task({1, 4})
    h1 = head.add_task([0, 2, 5])
    return head, initial, h0, h1


def test_per_task_head_fills_each_tasks_columns_and_freezes_old_heads():
    head, initial, h0, h1 = head_with_tasks()
    assert not any(p.requires_grad for p in h0.parameters()) and all(p.requires_grad for p in h1.parameters())
    assert not any(p.requires_grad for p in initial.parameters())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    out = head(x)
    assert out.shape == (3, 6)
    assert torch.allclose(out[:, [1, 4]], h0(x)) and torch.allclose(out[:, [0, 2, 5]], h1(x))
    assert torch.all(out[:, 3] == fill_value(torch.float32))  # class 3: no task yet
    head.add_task([8])  # the head grows to the largest class id
    assert head(x).shape == (3, 9)
    with pytest.raises(ValueError, match="needs disjoint classes per experience; class 2 is in task 1"):
        head.add_task([2, 7])
    with pytest.raises(ValueError, match="at least one class"):
        head.add_task([])


def test_per_task_head_uses_the_replaced_head_before_any_task():
    initial = nn.Linear(4, 6)
    head = PerTaskHead(4, 6, initial=initial)
    x = torch.randn(2, 4)
    assert torch.equal(head(x), initial(x))


def test_prototypes_score_by_cosine_in_eval_and_by_the_proxy_heads_in_training():
    head, _, h0, h1 = head_with_tasks()
    head.use_prototypes = True
    g = torch.Generator().manual_seed(4)
    feats, labels = torch.randn(12, 4, generator=g), torch.tensor([1, 4] * 6)
    means = class_means(feats, labels, [1, 4])
    assert torch.allclose(means[0], feats[labels == 1].mean(0)) and torch.allclose(means[1], feats[labels == 4].mean(0))
    head.set_prototypes({4, 1}, means)
    x = torch.randn(5, 4, generator=g)
    head.eval()
    out = head(x)
    cos = F.cosine_similarity(x[:, None, :], means[None], dim=-1)
    assert torch.allclose(out[:, [1, 4]], cos, atol=1e-6)
    assert torch.allclose(out[:, [0, 2, 5]], h1(x))  # task 1 has no prototypes yet: its proxy answers
    head.train()
    assert torch.allclose(head(x)[:, [1, 4]], h0(x))
    with pytest.raises(ValueError, match="class 3 has no sample"):
        class_means(feats, labels, [1, 3])
    with pytest.raises(ValueError, match=r"means must be \[2, 4\]"):
        head.set_prototypes([0, 2], torch.zeros(3, 4))


def test_per_task_head_state_dict_round_trip_recreates_tasks_and_prototypes():
    head, _, _, _ = head_with_tasks()
    head.use_prototypes = True
    head.set_prototypes([1, 4], torch.randn(2, 4, generator=torch.Generator().manual_seed(5)))
    state = head.state_dict()
    fresh = PerTaskHead(4, 6, initial=nn.Linear(4, 6), prototypes=True)
    fresh.load_state_dict(state)
    x = torch.randn(3, 4)
    head.eval(), fresh.eval()
    assert torch.equal(head(x), fresh(x))
    assert fresh.task_classes == [[1, 4], [0, 2, 5]] and fresh.prototype_classes == [1, 4]


def test_recording_collects_the_head_inputs():
    head, _, _, _ = head_with_tasks()
    x1, x2 = torch.randn(2, 4), torch.randn(3, 4)
    with head.recording() as seen:
        assert head.is_recording
        head(x1), head(x2)
    assert not head.is_recording
    assert torch.equal(torch.cat(seen), torch.cat([x1, x2]))


def test_replace_module_puts_a_module_at_a_dotted_name():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    new = nn.Linear(3, 2)
    old = replace_module(model, "1.1", new)
    assert model[1][1] is new and isinstance(old, nn.Linear) and old is not new


# -- edges that plausible wrong implementations get wrong (mutation testing, docs/mutation.md) -------------------
def test_boundaries_of_restrict_logits_and_masked_loss():
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(restrict_logits(logits, [1, 4]), restrict_logits(logits, [1]))  # id == width: ignored
    with pytest.raises(ValueError, match=r"class 4 has no logit: the head has 4 outputs"):
        masked_loss(F.cross_entropy, logits, torch.tensor([1, 1]), [1, 4])
    with pytest.raises(TypeError, match=r"protocol must be a str, one of \[.*\], got int"):
        check_protocol(3)


def test_replace_module_at_a_three_level_name():
    model = nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(2, 2))))
    new = nn.Linear(2, 2)
    replace_module(model, "0.0.0", new)
    assert model[0][0][0] is new


def test_per_task_head_defaults_and_validation():
    head = PerTaskHead(4, 6)
    assert not head.use_prototypes and head.prototypes.shape == (0, 4) and head.prototype_classes == []
    assert head.add_task([0, 1]).bias is not None  # no initial head: the new head still gets a device and dtype
    assert PerTaskHead(4, 6, bias=False).add_task([0]).bias is None
    PerTaskHead(1, 1)
    for bad in ((0, 5), (5, 0)):
        with pytest.raises(ValueError, match="in_features and out_features must be >= 1"):
            PerTaskHead(*bad)
    with pytest.raises(ValueError, match="^a task needs at least one class$"):
        head.add_task([])


def test_per_task_head_follows_the_replaced_heads_dtype_and_token_inputs():
    head = PerTaskHead(4, 6, initial=nn.Linear(4, 6).double())
    assert head.add_task([2, 3]).weight.dtype == torch.float64
    tokens = torch.randn(2, 5, 4, dtype=torch.float64)  # (batch, tokens, features)
    out = head(tokens)
    assert out.shape == (2, 5, 6) and torch.allclose(out[..., [2, 3]], head.heads[0](tokens))
    head.use_prototypes = True
    means = torch.randn(2, 4, dtype=torch.float64)
    head.set_prototypes([2, 3], means)
    head.eval()
    cos = F.cosine_similarity(tokens[..., None, :], means, dim=-1)
    assert torch.allclose(head(tokens)[..., [2, 3]], cos)


def test_per_task_head_extra_state_checks_and_defaults():
    head = PerTaskHead(4, 6)
    with pytest.raises(ValueError, match="^PerTaskHead state must hold 'task_classes'$"):
        head.set_extra_state({})
    head.set_extra_state({"task_classes": [[0, 1]]})  # no prototypes recorded: none
    assert head.task_classes == [[0, 1]] and head.prototype_classes == []
    state = {k: v for k, v in head.state_dict().items() if k != "prototypes"}
    fresh = PerTaskHead(4, 6)
    fresh.load_state_dict(state, strict=False)  # a state without the prototypes buffer
    assert fresh.task_classes == [[0, 1]]
