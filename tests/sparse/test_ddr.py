"""SparCL's dynamic data removal: forgetting events, the stage schedule, per-stage counts, removal order."""

import pytest
import torch

from avalanche_merge.sparse.ddr import DataRemoval, ForgettingTracker, check_removal_schedule, removal_stages


# -- forgetting events ---------------------------------------------------------------------------------------------
def test_forgetting_events_match_a_hand_computed_sequence():
    t = ForgettingTracker(5)
    t.update([0, 1, 2, 3], torch.tensor([True, False, True, False]))
    t.update([0, 1, 2, 3], torch.tensor([False, False, True, True]))  # 0 forgotten
    t.update([0, 1, 2, 3], torch.tensor([True, False, False, True]))  # 2 forgotten
    t.update([3, 0], [False, False])  # 3 and 0 forgotten (any order of indices)
    t.update([4], [False])  # a first observation is never an event
    assert t.counts.tolist() == [2, 0, 1, 1, 0]
    assert t.learned.tolist() == [True, False, True, True, False]
    assert t.observations.tolist() == [4, 3, 3, 4, 1]
    with pytest.raises(ValueError, match="repeat"):
        t.update([1, 1], [True, True])
    with pytest.raises(ValueError, match="indices must be in"):
        t.update([5], [True])
    with pytest.raises(ValueError, match="same length"):
        t.update([0, 1], [True])


def _tracker_with(counts, never_learned=()):
    """A tracker whose examples have the given forgetting counts (learned, except ``never_learned``)."""
    t = ForgettingTracker(len(counts))
    idx = list(range(len(counts)))
    for r in range(max(counts)):
        t.update(idx, [i not in never_learned for i in idx])
        t.update(idx, [i not in never_learned and counts[i] <= r for i in idx])
    if not max(counts):
        t.update(idx, [i not in never_learned for i in idx])
    assert t.counts.tolist() == counts
    return t


def test_ranking_keeps_never_learned_and_most_forgotten_examples():
    t = _tracker_with([2, 0, 0, 1, 3, 0], never_learned=(1,))
    assert not t.learned[1]
    assert t.keep(0.5).tolist() == [0, 1, 4]  # never learned, 3 events, 2 events; the unforgettable ones go
    assert t.keep(4 / 6).tolist() == [0, 1, 3, 4]
    assert t.keep(1.0).tolist() == list(range(6)) and t.keep(0.0).tolist() == []
    assert t.keep(0.5, among=[2, 3, 5, 1]).tolist() == [1, 3]
    assert t.ranking()[:4].tolist() == [1, 4, 0, 3]


def test_ties_are_broken_by_a_seeded_order():
    t = _tracker_with([1, 0, 0, 0, 0, 2])
    picks = {tuple(t.keep(0.5, seed=s).tolist()) for s in range(30)}
    assert all(p[:1] == (0,) and p[-1] == 5 and len(p) == 3 for p in picks)  # 0 and 5 always, one tied example
    assert len(picks) > 1  # the tied one depends on the seed...
    assert t.keep(0.5, seed=4).tolist() == t.keep(0.5, seed=4).tolist()  # ...deterministically


# -- the schedule ----------------------------------------------------------------------------------------------------
def test_stages_follow_the_authors_script():
    # run_mag_prune_irr_sp_EM_0.75_gradient0.80.sh: REMOVE_N=3000 of 10000, RM_EPOCH=20, every 5 epochs
    assert removal_stages(10000, 0.3, 5, 20) == {5: 750, 10: 750, 15: 750, 20: 750}
    assert removal_stages(10, 0.3, 2, 5) == {2: 1, 4: 1}  # int(0.3 * 10 / 2) per stage, as int() in the script
    assert removal_stages(10, 0.0, 2, 5) == {} and removal_stages(10, 0.3, 5, 4) == {}


@pytest.mark.parametrize(
    "fraction, every, until, epochs, match",
    [
        (0.3, 1, 4, 10, "at least 2 epochs"),
        (0.3, 3, 2, 10, "removal_until=2"),
        (0.3, 5, 20, 2, "at least 6 epochs"),
        (0.3, 5, 20, 5, "at least 6 epochs"),  # the stage would end after the last epoch: nothing measured in time
    ],
)
def test_schedules_that_measure_no_forgetting_are_refused(fraction, every, until, epochs, match):
    with pytest.raises(ValueError, match=match):
        check_removal_schedule(fraction, every, until, epochs)
    with pytest.raises(ValueError, match=match):
        DataRemoval(10, fraction=fraction, every=every, until=until, epochs=epochs)


def test_no_removal_needs_no_statistics():
    check_removal_schedule(0.0, 1, 0, 1)
    removal = DataRemoval(10, fraction=0.0, every=5, until=20, epochs=2)
    assert removal.stages == {} and not removal.needs_observation(1) and removal.end_epoch(1) is None


def test_stages_after_the_last_epoch_are_dropped():
    removal = DataRemoval(100, fraction=0.4, every=3, until=9, epochs=7)
    assert removal.stages == {3: 13, 6: 13}  # the share of stage 9 is not redistributed (as in the script)
    assert [e for e in range(1, 8) if removal.needs_observation(e)] == [1, 2, 3, 4, 5, 6]


# -- per-stage counts and the removal order --------------------------------------------------------------------------
T, F = True, False
# four examples A, B, C, D observed after each of 12 epochs; stages end after epochs 6 and 12, one removal each
SCRIPT = {
    "A": [T, F, T, F, T, F] + [T, T, T, T, T, T],  # stage 1: 3 events, stage 2: 0 (3 in total)
    "B": [T, T, T, T, T, F] + [T, T, T, T, T, F],  # stage 1: 1 event, stage 2: 1 (2 in total)
    "C": [T, T, T, T, T, T] + [T, T, T, T, T, T],  # never forgotten
    "D": [F] * 12,  # never learned
}


def _run(script, epochs=13):
    removal = DataRemoval(4, fraction=0.5, every=6, until=12, epochs=epochs, seed=0)
    names = list(script)
    trained_on = []
    for epoch in range(1, epochs + 1):
        trained_on.append([names[i] for i in removal.active.tolist()])
        if removal.needs_observation(epoch):
            removal.observe(torch.tensor([script[names[i]][epoch - 1] for i in removal.active.tolist()]))
            removal.end_epoch(epoch)
    return removal, trained_on, names


def test_each_stage_removes_the_least_forgotten_examples_by_its_own_counts():
    removal, trained_on, names = _run(SCRIPT)
    assert removal.stages == {6: 1, 12: 1}
    # stage 1 removes C (0 events), never A (3 events) nor D (never learned)
    assert [names[i] for i in removal.removed[0].tolist()] == ["C"]
    # stage 2 counts from zero: A has 0 events in it, B has 1, so A goes. Counts accumulated over both stages would
    # remove B instead (2 < 3)
    assert [names[i] for i in removal.removed[1].tolist()] == ["A"]
    assert removal.stage_counts[1].tolist() == [0, 1, 0, 0]  # stage 2's own counts (C is no longer observed)
    assert [names[i] for i in removal.active.tolist()] == ["B", "D"]
    assert trained_on[6] == ["A", "B", "D"] and trained_on[12] == ["B", "D"]


def test_the_first_observation_of_a_stage_is_no_event():
    # B ends stage 1 correct and starts stage 2 wrong: with the counts restarted, that is no event of stage 2
    script = dict(SCRIPT, B=[T, F, T, T, T, T] + [F, T, T, T, T, T])
    removal, _, names = _run(script)
    assert [names[i] for i in removal.removed[0].tolist()] == ["C"]
    assert removal.stage_counts[1].tolist() == [0, 0, 0, 0]
