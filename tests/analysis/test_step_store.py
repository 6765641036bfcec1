"""The compact step store of the geometry analysis (issue 15): every storage gives the report of the full
snapshots (exactly in fp32, within fp16's scaled precision otherwise), memory is what it claims, disk leaves
nothing behind."""

import math

import numpy as np
import pytest
import torch

from avalanche_merge.analysis.geometry import geometry_report, steps_report
from avalanche_merge.analysis.step_store import StepStore


def snapshots(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = {"a.weight": torch.randn(12, 8, generator=g), "a.bias": torch.randn(12, generator=g),
             "b.weight": torch.randn(6, 12, generator=g) * 100}
    out = [theta]
    for i in range(n):
        scale = 10.0 ** -(i + 2)  # updates from 1e-2 down to 1e-5: fp16 without scaling would lose the small ones
        out.append({k: v + scale * torch.randn(v.shape, generator=g) for k, v in out[-1].items()})
    return out


def store_of(snaps, **kwargs):
    store = StepStore(**kwargs)
    for prev, cur in zip(snaps, snaps[1:], strict=False):
        store.append({k: cur[k] - prev[k] for k in cur})
    return store


def compare(a, b, rtol):
    for key in ("step_total_norm", "cumulative_total_norm"):
        np.testing.assert_allclose(a[key], b[key], rtol=rtol)
    for key in ("step_cosine", "cumulative_cosine"):
        np.testing.assert_allclose(np.asarray(a[key], float), np.asarray(b[key], float), atol=rtol)
    assert a["names"] == b["names"]


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_fp32_store_reproduces_the_snapshot_report(storage, tmp_path):
    snaps = snapshots()
    store = store_of(snaps, storage=storage, folder=tmp_path)
    names = list(snaps[0])
    rep = steps_report(store.steps(names), store.cumulative(names))
    ref = geometry_report(snaps)
    compare(rep, ref, rtol=1e-5)
    assert rep["sign_conflict_rate"] == pytest.approx(ref["sign_conflict_rate"])
    np.testing.assert_allclose(rep["effective_rank"], ref["effective_rank"], rtol=1e-5)
    store.close()
    assert not list(tmp_path.iterdir())  # the disk folder is gone


def test_fp16_store_is_scaled_per_tensor_and_stays_close(tmp_path):
    snaps = snapshots()
    store = store_of(snaps, dtype="float16", storage="disk", folder=tmp_path)
    names = list(snaps[0])
    steps = store.steps(names)
    for i, step in enumerate(steps):
        for n in names:
            exact = snaps[i + 1][n] - snaps[i][n]
            err = (step[n] - exact).abs().max()
            assert err <= 2 ** -11 * exact.abs().max() * 1.01, (i, n)  # relative to the tensor's largest entry
            assert step[n].abs().max() > 0  # a 1e-5 update is not flushed to zero
    compare(steps_report(steps, store.cumulative(names)), geometry_report(snaps), rtol=2e-3)


def test_memory_store_holds_what_it_says():
    snaps = snapshots(n=3)
    n_params = sum(v.numel() for v in snaps[0].values())
    assert store_of(snaps).nbytes_in_memory() == 3 * 4 * n_params
    assert store_of(snaps, dtype="float16").nbytes_in_memory() == 3 * 2 * n_params
    assert store_of(snaps, storage="disk").nbytes_in_memory() == 0


def test_cumulative_is_the_prefix_sum_of_steps():
    snaps = snapshots(n=3)
    store = store_of(snaps)
    cumulative = store.cumulative(list(snaps[0]))
    for i in range(3):
        for n in snaps[0]:
            torch.testing.assert_close(cumulative[i][n], snaps[i + 1][n] - snaps[0][n], rtol=0, atol=1e-4)


def test_store_never_keeps_the_callers_tensor():
    step = {"w": torch.ones(3)}
    store = StepStore()
    store.append(step)
    step["w"].add_(1.0)
    assert torch.equal(store.tensor(0, "w"), torch.ones(3))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"storage": "cloud"}, r"storage must be one of \['memory', 'disk'\], got 'cloud'"),
    ({"dtype": "int8"}, r"dtype must be one of \['float32', 'float16'\], got 'int8'"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepStore(**kwargs)


def test_zero_step_is_stored_without_dividing_by_zero():
    store = StepStore(dtype="float16")
    store.append({"w": torch.zeros(4)})
    assert torch.equal(store.tensor(0, "w"), torch.zeros(4)) and not math.isnan(float(store.tensor(0, "w").sum()))


def test_steps_of_any_float_dtype_are_kept_in_float32_or_float16():
    step = {"w": torch.tensor([0.1, -0.25, 0.3], dtype=torch.float64)}
    exact, half = StepStore(), StepStore(dtype="float16")
    exact.append(step)
    half.append(step)
    assert exact.nbytes_in_memory() == 3 * 4 and half.nbytes_in_memory() == 3 * 2  # never float64
    assert exact.tensor(0, "w").dtype == half.tensor(0, "w").dtype == torch.float32
    torch.testing.assert_close(exact.tensor(0, "w"), step["w"].float())


def test_empty_tensors_are_stored():
    store = StepStore(dtype="float16")
    store.append({"w": torch.zeros(0, 3)})
    assert store.tensor(0, "w").shape == (0, 3)


def test_disk_steps_live_in_a_geometry_folder_under_the_given_one_and_go_with_the_store(tmp_path):
    store = StepStore(storage="disk", folder=tmp_path)
    store.append({"w": torch.ones(2)})
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("geometry-") and [p.name for p in folder.iterdir()] == ["step0000.safetensors"]
    del store  # a run that dies without close() leaves nothing behind
    import gc

    gc.collect()
    assert not list(tmp_path.iterdir())


def test_a_non_finite_step_keeps_its_finite_entries_exactly_in_float16():
    store = StepStore(dtype="float16")
    store.append({"w": torch.tensor([float("inf"), 3e-7, -0.5])})  # a diverged step: scale 1, not inf or 2
    expected = torch.tensor([float("inf"), 3e-7, -0.5]).to(torch.float16).float()
    assert torch.equal(store.tensor(0, "w"), expected)


def test_close_tolerates_a_folder_removed_by_someone_else(tmp_path):
    import shutil

    store = StepStore(storage="disk", folder=tmp_path)
    store.append({"w": torch.ones(2)})
    shutil.rmtree(next(tmp_path.iterdir()))
    store.close()
    assert len(store) == 0
