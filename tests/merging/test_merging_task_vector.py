"""TaskVector: construction, strict checks, arithmetic, application."""

import pytest
import torch
from torch import nn

from avalanche_merge.merging import TaskVector, cosine_similarity_matrix


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_from_models_skips_integer_buffers_and_round_trips():
    pre, fine = _net(0), _net(1)
    fine[1].num_batches_tracked += 7
    tv = TaskVector.from_models(pre, fine)
    assert "1.num_batches_tracked" not in tv
    merged = tv.apply_to(pre)
    for k, v in fine.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(merged[k], v, atol=1e-6)
    assert torch.equal(merged["1.num_batches_tracked"], pre.state_dict()["1.num_batches_tracked"])


def test_zero_task_vector_changes_nothing():
    pre = _net(0)
    tv = TaskVector.zeros_like(TaskVector.from_models(pre, _net(1)))
    merged = tv.apply_to(pre, scaling=3.0)
    for k, v in pre.state_dict().items():
        assert torch.equal(merged[k], v)


def test_arithmetic_and_norms():
    a = TaskVector({"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0])})
    b = TaskVector({"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0, 1.0])})
    assert torch.equal((a + b)["w"], torch.tensor([4.0, 1.0]))
    assert torch.equal((a - b)["b"], torch.tensor([-1.0, 3.0]))
    assert torch.equal((2 * a)["w"], torch.tensor([6.0, 0.0]))
    assert torch.equal((-a)["b"], torch.tensor([0.0, -4.0]))
    assert a.norm() == pytest.approx(5.0)
    assert a.norms() == {"w": pytest.approx(3.0), "b": pytest.approx(4.0)}
    assert torch.equal(a.flatten(), torch.tensor([3.0, 0.0, 0.0, 4.0]))
    with pytest.raises(TypeError, match="scaled by a number"):
        a * "2"


def test_low_precision_inputs_accumulate_in_fp32():
    pre = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    fine = {"w": torch.full((4,), 1.0078125, dtype=torch.bfloat16)}
    tv = TaskVector.from_models(pre, fine)
    assert tv["w"].dtype == torch.float32
    assert tv.apply_to(pre)["w"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("pre", "fine", "message"),
    [
        ({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, "'a' is in the pretrained weights but not"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, "'a' has shape (2,)"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.float16)}, "'a' has dtype"),
        ({"a": torch.zeros(2)}, {"a": torch.tensor([0.0, float("nan")])}, "'a' contains NaN or Inf"),
        ({"a": torch.zeros(2)}, {"a": torch.tensor([0.0, float("inf")])}, "'a' contains NaN or Inf"),
    ],
)
def test_strict_validation(pre, fine, message):
    with pytest.raises(ValueError) as info:
        TaskVector.from_models(pre, fine)
    assert message in str(info.value)


def test_apply_to_mismatch_and_bad_types():
    tv = TaskVector({"a": torch.ones(2)})
    with pytest.raises(ValueError, match="'b' is in the pretrained weights"):
        tv.apply_to({"a": torch.zeros(2), "b": torch.zeros(1)})
    with pytest.raises(TypeError, match="floating-point"):
        TaskVector({"a": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        TaskVector.from_models([1], [2])
    with pytest.raises(ValueError, match="at least one"):
        TaskVector({})


def test_cosine_similarity_matrix():
    a = TaskVector({"w": torch.tensor([1.0, 0.0])})
    b = TaskVector({"w": torch.tensor([0.0, 2.0])})
    c = TaskVector({"w": torch.tensor([-3.0, 0.0])})
    m = cosine_similarity_matrix([a, b, c, a])
    expected = torch.tensor([[1, 0, -1, 1], [0, 1, 0, 0], [-1, 0, 1, -1], [1, 0, -1, 1]], dtype=torch.float32)
    assert torch.allclose(m, expected, atol=1e-6)
    same = cosine_similarity_matrix([a * 2.0, a * 0.5, a])
    assert torch.allclose(same, torch.ones(3, 3))
