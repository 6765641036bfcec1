"""Average accuracy, forward transfer and accumulation / retention of ``evaluation.matrix``, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avalanche_merge.evaluation.matrix import accumulation_retention, average_accuracy, forward_transfer

# R[i][j]: accuracy on experience j after training experience i.
R = [
    [0.9, 0.2, 0.1],
    [0.6, 0.8, 0.3],
    [0.4, 0.7, 0.9],
]
PRETRAINED = [0.1, 0.15, 0.05]  # the model before any training, on each experience
HELD_OUT = [  # accuracy on two never-trained probe tasks after every step
    [0.5, 0.7],
    [0.4, 0.6],
    [0.3, 0.5],
]
HELD_OUT_PRETRAINED = [0.6, 0.8]


def test_average_accuracy_by_hand():
    # step 2 (default, last): (0.4 + 0.7 + 0.9) / 3 = 2.0 / 3
    assert average_accuracy(R) == pytest.approx(2.0 / 3)
    assert average_accuracy(R, step=2) == pytest.approx(2.0 / 3)
    # step 0: 0.9; step 1: (0.6 + 0.8) / 2 = 0.7
    assert average_accuracy(R, step=0) == pytest.approx(0.9)
    assert average_accuracy(R, step=1) == pytest.approx(0.7)
    assert average_accuracy(np.asarray(R), step=1) == pytest.approx(0.7)


@pytest.mark.parametrize("step", [-1, 3, 10])
def test_average_accuracy_out_of_range_step_raises(step):
    with pytest.raises(ValueError, match="step must be in"):
        average_accuracy(R, step=step)


def test_average_accuracy_single_row_is_its_mean():
    assert average_accuracy([[0.2, 0.4, 0.9]]) == pytest.approx(0.5)


def test_average_accuracy_rejects_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    with pytest.raises(ValueError, match="NaN"):
        average_accuracy([[0.1, float("nan")], [0.3, 0.4]])


def test_forward_transfer_by_hand():
    # j=1: R[0][1] - b[1] = 0.2 - 0.15 = 0.05
    # j=2: R[1][2] - b[2] = 0.3 - 0.05 = 0.25
    # mean: 0.15 (R[0][0] and b[0] never enter)
    assert forward_transfer(R, PRETRAINED) == pytest.approx(0.15)
    assert forward_transfer(R, [99.0, 0.15, 0.05]) == pytest.approx(0.15)
    # a negative transfer: earlier experiences hurt the next one
    assert forward_transfer(R, [0.0, 0.5, 0.5]) == pytest.approx(((0.2 - 0.5) + (0.3 - 0.5)) / 2)
    assert forward_transfer(R, np.asarray(PRETRAINED)) == pytest.approx(0.15)


def test_forward_transfer_errors_and_single_row():
    with pytest.raises(ValueError, match=r"pretrained must hold one accuracy per experience \(3\), got 2"):
        forward_transfer(R, [0.1, 0.2])
    with pytest.raises(ValueError, match="pretrained must hold"):
        forward_transfer(R, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        forward_transfer(R, [0.1, float("nan"), 0.3])
    assert math.isnan(forward_transfer([[0.5, 0.6]], [0.1, 0.2]))
    with pytest.raises(ValueError, match="pretrained must hold"):
        forward_transfer([[0.5, 0.6]], [0.1])


def test_accumulation_retention_by_hand():
    out = accumulation_retention(R, HELD_OUT)
    acc = [(0.9 + 0.2 + 0.1) / 3, (0.6 + 0.8 + 0.3) / 3, (0.4 + 0.7 + 0.9) / 3]  # 0.4, 0.5667, 0.6667
    ret = [0.6, 0.5, 0.4]
    geo = [math.sqrt(a * r) for a, r in zip(acc, ret)]
    assert out["accumulation"] == pytest.approx(acc)
    assert out["retention"] == pytest.approx(ret)
    assert out["geometric_mean"] == pytest.approx(geo)
    assert out["geometric_mean"][0] == pytest.approx(math.sqrt(0.24))
    assert out["final_accumulation"] == pytest.approx(2.0 / 3)
    assert out["final_retention"] == pytest.approx(0.4)
    assert out["final_geometric_mean"] == pytest.approx(math.sqrt(0.8 / 3))
    assert not {"pretrained_accumulation", "accumulation_gain", "pretrained_retention", "retention_change"} & set(out)
    assert all(isinstance(out[k], list) for k in ("accumulation", "retention", "geometric_mean"))
    assert all(type(out[k]) is float for k in ("final_accumulation", "final_retention", "final_geometric_mean"))


def test_accumulation_retention_gains_against_the_pretrained_model():
    out = accumulation_retention(R, HELD_OUT, pretrained=PRETRAINED, held_out_pretrained=HELD_OUT_PRETRAINED)
    assert out["pretrained_accumulation"] == pytest.approx(0.1)  # (0.1 + 0.15 + 0.05) / 3
    assert out["accumulation_gain"] == pytest.approx(2.0 / 3 - 0.1)
    assert out["pretrained_retention"] == pytest.approx(0.7)  # (0.6 + 0.8) / 2
    assert out["retention_change"] == pytest.approx(0.4 - 0.7)
    only_acc = accumulation_retention(R, HELD_OUT, pretrained=PRETRAINED)
    assert "accumulation_gain" in only_acc and "retention_change" not in only_acc
    only_ret = accumulation_retention(R, HELD_OUT, held_out_pretrained=HELD_OUT_PRETRAINED)
    assert "retention_change" in only_ret and "accumulation_gain" not in only_ret


def test_accumulation_retention_single_row_and_one_probe_task():
    out = accumulation_retention([[0.8, 0.6]], [[0.45]])
    assert out["accumulation"] == pytest.approx([0.7])
    assert out["final_geometric_mean"] == pytest.approx(math.sqrt(0.7 * 0.45))


def test_accumulation_retention_errors():
    with pytest.raises(ValueError, match=r"held_out must be a 3 x K matrix"):
        accumulation_retention(R, HELD_OUT[:2])
    with pytest.raises(ValueError, match="held_out must be"):
        accumulation_retention(R, HELD_OUT + [[0.1, 0.2]])
    with pytest.raises(ValueError, match="held_out must be"):
        accumulation_retention(R, [0.5, 0.4, 0.3])  # 1-D
    with pytest.raises(ValueError, match="held_out must be"):
        accumulation_retention(R, np.zeros((3, 0)))
    with pytest.raises(ValueError, match="held_out contains NaN"):
        accumulation_retention(R, [[0.5, 0.7], [0.4, float("inf")], [0.3, 0.5]])
    with pytest.raises(ValueError, match="pretrained must hold"):
        accumulation_retention(R, HELD_OUT, pretrained=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"held_out_pretrained must hold one accuracy per experience \(2\)"):
        accumulation_retention(R, HELD_OUT, held_out_pretrained=[0.6, 0.8, 0.9])
