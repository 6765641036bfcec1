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
    with pytest.raises(ValueError, match=rf"^step must be in \[0, 2\], got {step}$"):
        average_accuracy(R, step=step)
    with pytest.raises(ValueError, match=rf"^step must be in \[0, 1\], got {step}$"):
        average_accuracy([[0.5, 0.1], [0.7, 0.8]], step=step)


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


def test_forward_transfer_two_by_two_and_row_shaped_pretrained():
    # T = 2: j=1 only: R[0][1] - b[1] = 0.1 - 0.25 = -0.15
    two = [[0.5, 0.1], [0.7, 0.8]]
    assert forward_transfer(two, [0.3, 0.25]) == pytest.approx(-0.15)
    # the pretrained accuracies as a 1 x T row (a one-row accuracy matrix) are flattened
    assert forward_transfer(R, [PRETRAINED]) == pytest.approx(0.15)
    assert forward_transfer(two, np.asarray([[0.3, 0.25]])) == pytest.approx(-0.15)


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
    with pytest.raises(ValueError, match=r"^held_out contains NaN or Inf$"):
        accumulation_retention(R, [[0.5, 0.7], [0.4, float("inf")], [0.3, 0.5]])
    with pytest.raises(ValueError, match="pretrained must hold"):
        accumulation_retention(R, HELD_OUT, pretrained=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"held_out_pretrained must hold one accuracy per experience \(2\)"):
        accumulation_retention(R, HELD_OUT, held_out_pretrained=[0.6, 0.8, 0.9])


@pytest.mark.parametrize("bad, shape", [([[0.9, 0.2], [0.6, float("nan")]], r"\(2, 2\)"),
                                        ([[0.9, 0.2], [float("-inf"), 0.8]], r"\(2, 2\)"),
                                        ([0.9, 0.2], r"\(2,\)"),
                                        (np.zeros((0, 2)), r"\(0, 2\)")])
def test_accumulation_retention_rejects_bad_r(bad, shape):
    held_out = np.full((len(bad), 1), 0.5)
    with pytest.raises(ValueError, match=r"^R must be a non-empty finite 2-D accuracy matrix, got shape " + shape):
        accumulation_retention(bad, held_out)


def test_accumulation_retention_partial_stream_and_one_by_one():
    # during a stream R holds the first rows only: 2 steps x 3 experiences
    out = accumulation_retention(R[:2], HELD_OUT[:2])
    # accumulation: (0.9 + 0.2 + 0.1) / 3 = 0.4, (0.6 + 0.8 + 0.3) / 3 = 1.7 / 3; retention 0.6, 0.5
    assert out["accumulation"] == pytest.approx([0.4, 1.7 / 3])
    assert out["final_geometric_mean"] == pytest.approx(math.sqrt(1.7 / 3 * 0.5))
    # held_out must have one row per step of R (2 here, though R has 3 columns)
    with pytest.raises(ValueError, match=r"^held_out must be a 2 x K matrix .*got shape \(3, 2\)$"):
        accumulation_retention(R[:2], HELD_OUT)
    # a single step on a single experience: sqrt(0.5 * 0.32) = 0.4
    one = accumulation_retention([[0.5]], [[0.32]])
    assert one["final_geometric_mean"] == pytest.approx(0.4)
    assert one["accumulation"] == pytest.approx([0.5]) and one["retention"] == pytest.approx([0.32])


def test_accumulation_retention_negative_mean_gives_zero_geometric_mean():
    # means below 0 (e.g. chance-corrected accuracies) are clipped at 0 inside the square root: 0, never nan
    out = accumulation_retention([[-0.2, 0.1]], [[0.5]])  # accumulation -0.05, retention 0.5
    assert out["final_accumulation"] == pytest.approx(-0.05)
    assert out["geometric_mean"] == [0.0]
    out = accumulation_retention([[0.4, 0.6]], [[-0.3, 0.1]])  # accumulation 0.5, retention -0.1
    assert out["final_retention"] == pytest.approx(-0.1)
    assert out["final_geometric_mean"] == 0.0
    # both negative: the product would be positive (0.05 * 0.1) but each is clipped first
    assert accumulation_retention([[-0.2, 0.1]], [[-0.3, 0.1]])["final_geometric_mean"] == 0.0


# float32 values; their float64 mean (0.1000000015 + 0.2000000030 + 0.6999999881) / 3 = 0.33333333085 differs from
# the float32 mean 0.33333334327 in the 8th digit
F32 = np.asarray([0.1, 0.2, 0.7], dtype=np.float32)
F32_MEAN = (float(np.float32(0.1)) + float(np.float32(0.2)) + float(np.float32(0.7))) / 3


def test_accumulation_retention_averages_float32_inputs_in_float64():
    assert abs(F32_MEAN - 0.33333333085) < 1e-11
    assert float(F32.mean()) != pytest.approx(F32_MEAN, rel=1e-12)  # what averaging in float32 would give
    r32 = np.stack([F32, F32, F32])  # 3 x 3, every row F32
    held_out32 = np.stack([F32, F32, F32])  # 3 steps x 3 probe tasks
    out = accumulation_retention(r32, held_out32, pretrained=F32, held_out_pretrained=F32)
    assert out["final_accumulation"] == pytest.approx(F32_MEAN, rel=1e-12)
    assert out["final_retention"] == pytest.approx(F32_MEAN, rel=1e-12)
    assert out["pretrained_accumulation"] == pytest.approx(F32_MEAN, rel=1e-12)
    assert out["pretrained_retention"] == pytest.approx(F32_MEAN, rel=1e-12)
    assert out["accumulation_gain"] == pytest.approx(0.0, abs=1e-15)
