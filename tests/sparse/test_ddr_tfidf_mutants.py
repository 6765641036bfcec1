"""Edge cases of ``sparse/tfidf.py`` and ``sparse/ddr.py`` found by mutation testing (issue 14): exact values on
small hand-checkable inputs and the messages of bad inputs."""

import math
import re

import pytest
import torch

from avalanche_merge.sparse.ddr import DataRemoval, ForgettingTracker, check_removal_schedule, removal_stages
from avalanche_merge.sparse.tfidf import (
    BackgroundCounts,
    background_overlap,
    idf,
    slot_counts,
    tfidf_scores,
    top_slots,
)


def _raises(msg: str):
    return pytest.raises(ValueError, match="^" + re.escape(msg) + "$")


# -- tfidf.py -------------------------------------------------------------------------------------------------------
def test_slot_counts_are_weighted_sums_over_any_shape():
    idx = torch.tensor([[0, 2], [2, 1], [2, 0]])
    w = torch.tensor([[0.5, 0.25], [0.125, 2.0], [1.0, 0.75]], dtype=torch.float64)
    out = slot_counts(idx, 4, w)
    assert out.dtype == torch.float32
    assert out.tolist() == [1.25, 2.0, 1.375, 0.0]
    assert slot_counts(idx, 4).tolist() == [2.0, 1.0, 3.0, 0.0]


def test_tfidf_normalises_counts_that_sum_below_one():
    counts = torch.tensor([0.2, 0.3, 0.0])
    tf = tfidf_scores(counts, torch.zeros(3), 0)
    assert torch.allclose(tf, torch.tensor([0.4, 0.6, 0.0]))
    s = tfidf_scores(counts, torch.tensor([1.0, 0.0, 3.0]), 4)
    assert torch.allclose(s, torch.tensor([0.4 * math.log(2.0), 0.6 * math.log(4.0), 0.0]))


def test_idf_rejects_each_out_of_range_document_frequency_alone():
    with _raises("document frequencies must be in [0, 3] (n_background_docs)"):
        idf(torch.tensor([1.0, 4.0]), 3)
    with _raises("document frequencies must be in [0, 3] (n_background_docs)"):
        idf(torch.tensor([-1.0, 2.0]), 3)
    assert torch.allclose(idf(torch.tensor([0.0, 3.0]), 3), torch.tensor([math.log(3.0), math.log(0.75)]))


def test_top_slots_validates_t_and_breaks_ties_by_index_among_candidates():
    for bad in (True, 2.0, 0):
        with _raises(f"t must be an int >= 1, got {bad!r}"):
            top_slots(torch.zeros(3), bad)
    assert top_slots(torch.tensor([0.1, 0.7, 0.3]), 1).tolist() == [1]
    scores = torch.tensor([float(i % 3) for i in range(40)])
    cand = torch.tensor([i % 4 != 1 for i in range(40)])
    out = top_slots(scores, 30, cand).tolist()
    expected = sorted((i for i in range(40) if i % 4 != 1), key=lambda i: (-(i % 3), i))[:30]
    assert out == expected
    out_all = top_slots(scores, 40).tolist()
    assert out_all == sorted(range(40), key=lambda i: (-(i % 3), i))


def test_background_overlap_validates_n_and_counts_half_exactly():
    upd = torch.tensor([True, True, False, True])
    for bad in (True, 2.0, 0):
        with _raises(f"n_background_docs must be an int >= 1, got {bad!r}"):
            background_overlap(upd, torch.zeros(4), bad)
    with _raises("document frequencies must be in [0, 5] (n_background_docs)"):
        background_overlap(upd, torch.tensor([-1.0, 0.0, 0.0, 0.0]), 5)
    # N = 5: df 2 is read by fewer than half (2 * 2 < 5), df 3 by at least half, df 5 by all.
    out = background_overlap(upd, torch.tensor([2.0, 3.0, 5.0, 5.0]), 5)
    assert out == {"updated": 3, "read_by_half": 2 / 3, "read_by_all": 1 / 3}
    one = background_overlap(torch.tensor([True, True]), torch.tensor([0.0, 1.0]), 1)
    assert one == {"updated": 2, "read_by_half": 0.5, "read_by_all": 0.5}


def test_background_counts_validation_and_totals():
    for bad in (True, 0, 2.0):
        with _raises(f"n_slots must be an int >= 1, got {bad!r}"):
            BackgroundCounts(bad)
    one = BackgroundCounts(1)
    one.add(torch.tensor([2.0]))
    assert one.df.tolist() == [1.0] and one.total.tolist() == [2.0]
    bg = BackgroundCounts(3)
    bg.add(torch.tensor([1.5, 0.0, 2.0]))
    bg.add(torch.tensor([0.5, 3.0, 0.0]))
    assert bg.df.tolist() == [2.0, 1.0, 1.0] and bg.total.tolist() == [2.0, 3.0, 2.0] and bg.n_docs == 2


# -- ddr.py ---------------------------------------------------------------------------------------------------------
def test_int_checks_name_the_value_and_accept_the_bound():
    with _raises("n must be an int >= 0, got -1"):
        ForgettingTracker(-1)
    with _raises("n must be an int >= 0, got True"):
        ForgettingTracker(True)
    assert ForgettingTracker(0).counts.tolist() == []
    with _raises("n must be an int >= 0, got -1"):
        removal_stages(-1, 0.5, 2, 4)
    assert removal_stages(0, 0.5, 2, 4) == {2: 0, 4: 0}
    with _raises("every must be an int >= 1, got 0"):
        removal_stages(10, 0.5, 0, 4)
    assert removal_stages(10, 0.5, 1, 2) == {1: 2, 2: 2}
    with _raises("until must be an int >= 0, got -1"):
        removal_stages(10, 0.5, 2, -1)
    assert removal_stages(10, 0.5, 2, 0) == {}
    for bad in (1.0, -0.25):
        with _raises(f"fraction must be in [0.0, 1.0), got {bad}"):
            removal_stages(10, bad, 2, 4)


def test_removal_schedule_messages_and_boundaries():
    for bad in (1.0, -0.25):
        with _raises(f"removal_fraction must be in [0.0, 1.0), got {bad}"):
            check_removal_schedule(bad, 2, 4, 5)
    with _raises("removal_every must be an int >= 1, got 0"):
        check_removal_schedule(0.5, 0, 4, 5)
    with _raises("removal_until must be an int >= 0, got -1"):
        check_removal_schedule(0.5, 2, -1, 5)
    check_removal_schedule(0.5, 2, 2, 3)  # every = 2 and until = every are allowed


def test_data_removal_epochs_message_and_last_epoch_stage_dropped():
    with _raises("epochs must be an int >= 1, got 0"):
        DataRemoval(4, fraction=0.0, every=1, until=0, epochs=0)
    assert DataRemoval(4, fraction=0.0, every=1, until=0, epochs=1).stages == {}
    dr = DataRemoval(10, fraction=0.5, every=2, until=4, epochs=4)
    assert dr.stages == {2: 2}  # the stage after epoch 4 = the last epoch trains nothing


def test_tracker_counts_are_integers_and_uint8_indices_are_indices():
    t = ForgettingTracker(3)
    assert t.counts.dtype == torch.long and t.observations.dtype == torch.long
    t.update(torch.tensor([2, 0], dtype=torch.uint8), [True, False])
    assert t.observations.tolist() == [1, 0, 1] and t.learned.tolist() == [False, False, True]
    t.update(torch.tensor([2, 1], dtype=torch.uint8), [False, True])
    assert t.counts.tolist() == [0, 0, 1] and t.counts.dtype == torch.long
    with _raises("indices must not repeat within one update"):
        t.update([1, 1], [True, True])
    among = t.ranking(torch.tensor([2, 0], dtype=torch.int32))
    assert among.dtype == torch.long and among.tolist() == [0, 2]  # never learned first


def _tie_order(idx: list[int], seed: int) -> list[int]:
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
    return [idx[i] for i in perm.tolist()]


def test_ranking_and_keep_default_seed_zero_and_stable_ties():
    n = 40
    t = ForgettingTracker(n)
    t.update(list(range(n)), [True] * n)
    t.update(list(range(n)), [i % 3 != 0 for i in range(n)])  # multiples of 3 forgotten once
    shuffled = _tie_order(list(range(n)), 0)
    expected = [i for i in shuffled if i % 3 == 0] + [i for i in shuffled if i % 3 != 0]
    assert t.ranking().tolist() == expected
    assert t.keep(0.5).tolist() == sorted(expected[:20])
    assert t.keep(1.0).tolist() == list(range(n))
    for bad in (1.5, -0.5):
        with _raises(f"fraction must be in [0.0, 1.0], got {bad}"):
            t.keep(bad)


def test_end_epoch_seeds_ties_by_epoch_and_records_learned():
    n = 20
    dr = DataRemoval(n, fraction=0.5, every=2, until=2, epochs=3)  # default seed 0; removes 10 after epoch 2
    dr.observe([True] * n)
    assert dr.end_epoch(1) is None
    dr.observe([True] * n)  # every example learned and never forgotten: all tied
    order = _tie_order(list(range(n)), 0 + 7919 * 2)
    active = dr.end_epoch(2)
    assert active.tolist() == sorted(order[:10])
    assert dr.removed[0].tolist() == sorted(order[10:])
    assert dr.stage_learned[0].tolist() == [True] * n
    assert dr.stage_counts[0].tolist() == [0] * n


def test_a_repeated_stage_end_removes_down_to_nothing():
    dr = DataRemoval(4, fraction=0.5, every=2, until=2, epochs=3)  # 2 per stage
    for expected in (2, 0, 0):
        assert dr.end_epoch(2).numel() == expected
