"""Continual-learning metrics of ``evaluation.matrix`` checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avalanche_merge.evaluation.matrix import (
    accuracy_seen_so_far,
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    summarize_matrix,
)

# R[i][j]: accuracy on experience j after training experience i.
R = [
    [0.9, 0.2, 0.1],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.9],
]

# Accuracy on experience 0 rises after experience 1 (0.5 -> 0.8) and then falls (0.8 -> 0.4).
RISE_FALL = [
    [0.5, 0.0, 0.0],
    [0.8, 0.9, 0.0],
    [0.4, 0.6, 0.7],
]


def test_final_accuracy_by_hand():
    # last row: (0.5 + 0.7 + 0.9) / 3 = 2.1 / 3 = 0.7
    assert final_accuracy(R) == pytest.approx(0.7)


def test_average_incremental_accuracy_by_hand():
    # step 0: 0.9
    # step 1: (0.6 + 0.8) / 2 = 0.7
    # step 2: (0.5 + 0.7 + 0.9) / 3 = 0.7
    # mean: (0.9 + 0.7 + 0.7) / 3 = 2.3 / 3 = 0.766666...
    assert average_incremental_accuracy(R) == pytest.approx(2.3 / 3)


def test_backward_transfer_by_hand():
    # j=0: R[2][0] - R[0][0] = 0.5 - 0.9 = -0.4
    # j=1: R[2][1] - R[1][1] = 0.7 - 0.8 = -0.1
    # mean: (-0.4 - 0.1) / 2 = -0.25
    assert backward_transfer(R) == pytest.approx(-0.25)


def test_forgetting_by_hand():
    # j=0: max(R[0][0], R[1][0]) - R[2][0] = max(0.9, 0.6) - 0.5 = 0.4
    # j=1: max(R[1][1]) - R[2][1] = 0.8 - 0.7 = 0.1
    # mean: (0.4 + 0.1) / 2 = 0.25
    assert forgetting(R) == pytest.approx(0.25)


def test_accuracy_seen_so_far_by_hand():
    # [0.9, (0.6 + 0.8) / 2, (0.5 + 0.7 + 0.9) / 3] = [0.9, 0.7, 0.7]
    assert accuracy_seen_so_far(R) == pytest.approx([0.9, 0.7, 0.7])
    # its mean is the average incremental accuracy
    assert np.mean(accuracy_seen_so_far(R)) == pytest.approx(average_incremental_accuracy(R))


def test_chaudhry_forgetting_exceeds_initial_minus_last_when_accuracy_rises_then_falls():
    # Chaudhry (max-based):
    #   j=0: max(0.5, 0.8) - 0.4 = 0.4
    #   j=1: max(0.9) - 0.6 = 0.3
    #   mean: 0.35
    # Avalanche (initial minus last):
    #   j=0: R[0][0] - R[2][0] = 0.5 - 0.4 = 0.1
    #   j=1: R[1][1] - R[2][1] = 0.9 - 0.6 = 0.3
    #   mean: 0.2
    m = np.asarray(RISE_FALL)
    avalanche_forgetting = np.mean([m[j, j] - m[-1, j] for j in range(len(m) - 1)])
    assert avalanche_forgetting == pytest.approx(0.2)
    assert forgetting(RISE_FALL) == pytest.approx(0.35)
    assert forgetting(RISE_FALL) > avalanche_forgetting + 0.1
    # initial-minus-last is exactly -BWT: (0.4 - 0.5 + 0.6 - 0.9) / 2 = -0.2
    assert backward_transfer(RISE_FALL) == pytest.approx(-0.2)


def test_forgetting_equals_minus_bwt_when_accuracy_only_falls():
    # R's accuracies never rise after learning: max-based and initial-minus-last coincide, = -BWT = 0.25
    assert forgetting(R) == pytest.approx(-backward_transfer(R))


def test_accepts_numpy_arrays_and_returns_python_floats():
    out = summarize_matrix(np.asarray(R))
    assert all(type(v) is float for v in out.values())
    assert out["final_acc"] == pytest.approx(0.7)


def test_single_row_matrix():
    # a Joint-style run: one row, mean (0.5 + 0.7 + 0.9) / 3 = 0.7
    row = [[0.5, 0.7, 0.9]]
    assert final_accuracy(row) == pytest.approx(0.7)
    assert math.isnan(average_incremental_accuracy(row))
    assert math.isnan(backward_transfer(row))
    assert math.isnan(forgetting(row))
    assert accuracy_seen_so_far(row) == pytest.approx([0.7])
    summary = summarize_matrix(row)
    assert summary["final_acc"] == pytest.approx(0.7)
    assert math.isnan(summary["avg_inc_acc"]) and math.isnan(summary["bwt"]) and math.isnan(summary["forgetting"])


def test_one_by_one_matrix():
    assert final_accuracy([[0.25]]) == pytest.approx(0.25)
    assert math.isnan(forgetting([[0.25]]))


@pytest.mark.parametrize("fn", [final_accuracy, average_incremental_accuracy, backward_transfer, forgetting,
                                accuracy_seen_so_far, summarize_matrix])
def test_non_square_matrix_raises(fn):
    with pytest.raises(ValueError, match=r"square .*got shape \(2, 3\)"):
        fn([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])


@pytest.mark.parametrize("bad, shape", [([], r"\(0,\)"), ([[]], r"\(1, 0\)"), ([0.1, 0.2], r"\(2,\)"),
                                        (np.zeros((2, 2, 2)), r"\(2, 2, 2\)"), (np.zeros((0, 3)), r"\(0, 3\)")])
def test_empty_or_not_2d_raises(bad, shape):
    with pytest.raises(ValueError, match=r"non-empty 2-D array, got shape " + shape):
        final_accuracy(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fn", [final_accuracy, forgetting, backward_transfer, average_incremental_accuracy])
def test_non_finite_raises(fn, value):
    m = [[0.9, 0.1], [value, 0.8]]
    with pytest.raises(ValueError, match=r"^accuracy matrix contains NaN or Inf$"):
        fn(m)


def test_summarize_matrix_keys_and_values():
    out = summarize_matrix(R)
    assert list(out) == ["final_acc", "avg_inc_acc", "bwt", "forgetting"]
    assert out == pytest.approx({"final_acc": 0.7, "avg_inc_acc": 2.3 / 3, "bwt": -0.25, "forgetting": 0.25})


# Two experiences; accuracy on experience 0 *rises* after learning experience 1 (positive backward transfer).
TWO = [
    [0.5, 0.1],
    [0.7, 0.8],
]


def test_two_by_two_matrix_by_hand():
    # the smallest matrix with a backward step: every metric is defined (not nan)
    # final: (0.7 + 0.8) / 2 = 0.75
    assert final_accuracy(TWO) == pytest.approx(0.75)
    # avg inc: (0.5 + (0.7 + 0.8) / 2) / 2 = (0.5 + 0.75) / 2 = 0.625
    assert average_incremental_accuracy(TWO) == pytest.approx(0.625)
    assert accuracy_seen_so_far(TWO) == pytest.approx([0.5, 0.75])
    # BWT: j=0 only: R[1][0] - R[0][0] = 0.7 - 0.5 = +0.2
    assert backward_transfer(TWO) == pytest.approx(0.2)
    # forgetting: j=0: max over l in [0, T-1) = {0} of R[l][0] = 0.5, minus R[1][0] = 0.7 -> -0.2; the final row
    # never enters the max, so a final improvement shows as negative forgetting (not clipped to 0)
    assert forgetting(TWO) == pytest.approx(-0.2)


def test_forgetting_max_excludes_the_final_row():
    # j=0: max(R[0][0], R[1][0]) = max(0.2, 0.6) = 0.6; R[2][0] = 0.9 -> -0.3
    # j=1: max(R[1][1]) = 0.5; R[2][1] = 0.4 -> 0.1
    # mean: (-0.3 + 0.1) / 2 = -0.1 (including the last row in the max would give (0 + 0.1) / 2 = 0.05)
    assert forgetting([[0.2, 0.0, 0.0], [0.6, 0.5, 0.0], [0.9, 0.4, 0.3]]) == pytest.approx(-0.1)


def test_float32_input_is_averaged_in_float64():
    # float32 accuracies (e.g. from torch) are promoted before averaging: the result is the float64 mean of the
    # float32 values (0.1000000015 + 0.2000000030 + 0.6999999881) / 3 = 0.33333333085, not the float32 mean
    # 0.33333334327
    row = np.asarray([[0.1, 0.2, 0.7]], dtype=np.float32)
    exact = (float(np.float32(0.1)) + float(np.float32(0.2)) + float(np.float32(0.7))) / 3
    assert exact == pytest.approx(0.33333333085, abs=1e-11)
    assert final_accuracy(row) == pytest.approx(exact, rel=1e-12)
    assert final_accuracy(row) != float(row[0].mean())  # the float32 mean differs in the 8th digit
