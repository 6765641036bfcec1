"""Tests written against surviving mutants of ``avalanche_merge/lora/*.py`` (experiments/mutation.py).

Every expected value is computed by hand (in the comments) or by an independent computation, on data in a random
rotation of the coordinates (never axis-aligned), so that each test fails on a plausible wrong implementation:
a wrong schedule index, a stale input, a missing scaling, a sign flip, a mean instead of a sum, a wrong threshold
comparison, an off-by-one in a count.
"""

import pytest
import torch
from test_cllora import TASKS, X, perturb_shared, tiny, train_head_task, with_head
from test_cllora import train_task as cl_train
from test_inflora_gpm import MLP, D, task_data
from torch import nn

from avalanche_merge.lora import ContinualLoRA, LoRAConfig, OLoRA, OLoRAConfig, make_learner
from avalanche_merge.lora.adapters import (
    activate,
    adapter_deltas,
    adapter_names,
    adapter_parameters,
    adapter_state,
    add_adapter,
    delta_weight,
    linear_names,
    load_adapter_state,
    lora_layers,
    resolve_targets,
)
from avalanche_merge.lora.cllora import SHARED
from avalanche_merge.lora.config import check_positive_int, check_threshold
from avalanche_merge.lora.inflora import energy_matrix, subspace_init
from avalanche_merge.lora.learner import SequentialLoRAConfig
from avalanche_merge.lora.olora import orthogonality_penalty
from avalanche_merge.lora.registry import list_learners, make_config, register_learner
from avalanche_merge.lora.sdlora import direction_norm, raw_weights
from avalanche_merge.lora.subspace import (
    DualGPM,
    InputCovariance,
    collect_covariances,
    complement,
    directions_needed,
    eigh_descending,
    gpm_threshold,
    gpm_update,
    inflora_threshold,
    project_rows,
)
from avalanche_merge.protocol import replace_module
from avalanche_merge.protocol.per_task import PerTaskHead

F64 = torch.float64


def rotation(d: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)).Q


def spectral(values, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag(values) Q^T`` for a random rotation Q (returned too)."""
    q = rotation(len(values), seed)
    return q @ torch.diag(torch.tensor(values, dtype=F64)) @ q.T, q


def proj(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


# -- subspace: schedules ------------------------------------------------------------------------------------------
def test_gpm_threshold_schedule_values_and_checks():
    assert gpm_threshold(0.9, 0.0, 7) == pytest.approx(0.9)  # increment 0 is allowed
    assert gpm_threshold(0.5, 0.1, 3) == pytest.approx(0.8)  # 0.5 + 0.1 * 3
    assert gpm_threshold(0.5, 0.2, 3) == 1.0  # 1.1 capped at exactly 1
    with pytest.raises(ValueError, match=r"threshold_increment must be >= 0, got -0.01"):
        gpm_threshold(0.9, -0.01, 0)
    with pytest.raises(ValueError, match=r"^threshold must be in"):
        gpm_threshold(0.0, 0.1, 0)


def test_inflora_threshold_schedule_values_and_checks():
    # 0.6 + (0.9 - 0.6) * t / 3
    assert [inflora_threshold(0.6, 0.9, t, 3) for t in (0, 1, 2, 3, 8)] == pytest.approx([0.6, 0.7, 0.8, 0.9, 0.9])
    assert inflora_threshold(0.9, 0.5, 1, 4) == pytest.approx(0.8)  # a decreasing schedule works as well
    with pytest.raises(ValueError, match=r"^threshold must be in"):
        inflora_threshold(1.5, 0.9, 0, 3)
    with pytest.raises(ValueError, match=r"^threshold_end must be in"):
        inflora_threshold(0.9, 1.5, 0, 3)
    with pytest.raises(ValueError, match=r"^total_tasks must be >= 1, got 0"):
        inflora_threshold(0.9, 1.0, 0, 0)


# -- subspace: input covariances ----------------------------------------------------------------------------------
def test_input_covariance_sums_counts_and_restarts():
    layer = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    x1, x2, x3 = (torch.randn(n, 4, generator=g) @ rotation(4, 1).float() for n in (5, 2, 7))
    stats = InputCovariance({"l": layer})
    with pytest.raises(RuntimeError, match=r"no input reached modules \['l'\]"):
        stats.covariances()
    stats.start()
    with pytest.raises(RuntimeError, match="already started"):
        stats.start()
    layer(x1)
    layer(x2)
    stats.stop()
    layer(x3)  # after stop: not counted
    both = torch.cat([x1, x2]).double()
    assert stats.counts["l"] == 7
    assert torch.allclose(stats.sums["l"], both.T @ both, atol=1e-10)
    assert torch.allclose(stats.covariances()["l"], both.T @ both / 7, atol=1e-10)
    assert stats.covariances()["l"].dtype == F64
    with stats:  # restartable after stop
        layer(x3)
    everything = torch.cat([x1, x2, x3]).double()
    assert stats.counts["l"] == 14
    assert torch.allclose(stats.covariances()["l"], everything.T @ everything / 14, atol=1e-10)
    layer(x1)  # the context manager removed the hook
    assert stats.counts["l"] == 14


class _Wrapper(nn.Module):
    """Like a peft layer: the wrapped layer sees a different input (here 2 x) than the wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.base_layer(2 * x)


def test_input_covariance_hooks_the_base_layer_when_there_is_one():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)) @ rotation(3, 3).float()
    wrapper = _Wrapper()
    with InputCovariance({"w": wrapper}) as stats:
        wrapper(x)
    assert torch.allclose(stats.covariances()["w"], 4 * x.double().T @ x.double() / 4, atol=1e-6)
    odd = nn.Linear(3, 2)
    odd.base_layer = "not a module"  # an attribute of that name that is no module: hook the module itself
    with InputCovariance({"o": odd}) as stats:
        odd(x)
    assert torch.allclose(stats.covariances()["o"], x.double().T @ x.double() / 4, atol=1e-6)


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(x))


def test_collect_covariances_in_eval_mode_and_mode_restored():
    model = _DropoutNet()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)) @ rotation(4, 2).float()
    flat = x.double()
    for training in (True, False):
        model.train(training)
        cov = collect_covariances(model, ["fc"], [x[:2], x[2:]])["fc"]
        assert torch.allclose(cov, flat.T @ flat / 6, atol=1e-10)  # dropout off while collecting
        assert model.training is training and model.drop.training is training


def test_collect_covariances_passes_dict_batches_as_keywords():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, *, inputs):
            return self.fc(inputs)

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    cov = collect_covariances(Keyword(), ["fc"], [{"inputs": x}])["fc"]
    assert torch.allclose(cov, x.double().T @ x.double() / 5, atol=1e-10)


# -- subspace: GPM criterion ----------------------------------------------------------------------------------------
def test_eigh_descending_sorts_and_clamps():
    cov, q = spectral([0.5, -1e-3, 3.0, 2.0], seed=3)
    values, vectors = eigh_descending(cov)
    assert torch.allclose(values, torch.tensor([3.0, 2.0, 0.5, 0.0], dtype=F64), atol=1e-12)
    for i, j in enumerate((2, 3, 0)):
        assert abs(float(vectors[:, i] @ q[:, j])) == pytest.approx(1.0, abs=1e-10)


def test_directions_needed_at_the_boundaries():
    v = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)  # cumsum 4, 7, 9, 10
    assert directions_needed(v, 7.0, 10.0) == 2  # exactly reached by 2
    assert directions_needed(v, 7.0 + 1e-6, 10.0) == 3
    assert directions_needed(v, 4.0, 10.0) == 1
    assert directions_needed(v, 0.5, 10.0) == 1
    assert directions_needed(v, 0.0, 10.0) == 0
    assert directions_needed(v, -3.0, 10.0) == 0
    assert directions_needed(v, 5e-10, 10.0) == 0  # below the tolerance 1e-10 * total = 1e-9
    assert directions_needed(v, 2e-9, 10.0) == 1
    assert directions_needed(v, 10.0, 10.0) == 4
    assert directions_needed(v, 12.0, 10.0) == 4  # never more than the non-empty directions
    assert directions_needed(v, 1e-10, 1.0) == 0  # exactly the tolerance: nothing needed
    assert directions_needed(torch.tensor([0.5, 0.5], dtype=F64), 0.5000000001, 1.0) == 1  # 0.5 >= needed - tol
    t = torch.tensor([0.6, 0.4, 1e-10, 0.0], dtype=F64)  # 1e-10 is exactly the tolerance: empty
    assert directions_needed(t, 2.0, 1.0) == 2
    z = torch.tensor([5.0, 1.0, 1e-12, 0.0], dtype=F64)  # 1e-12 < tol = 6e-10: empty
    assert directions_needed(z, 6.0, 6.0) == 2
    assert directions_needed(z, 7.0, 6.0) == 2
    w = torch.tensor([5.0, 1.0, 1e-9, 0.0], dtype=F64)  # 1e-9 > tol: counts
    assert directions_needed(w, 7.0, 6.0) == 3


def test_complement_is_orthonormal_and_orthogonal():
    q = rotation(6, 4)
    basis = q[:, :2]
    comp = complement(basis)
    assert comp.shape == (6, 4)
    assert torch.allclose(comp.T @ comp, torch.eye(4, dtype=F64), atol=1e-12)
    assert torch.allclose(proj(comp), torch.eye(6, dtype=F64) - proj(basis), atol=1e-12)


def test_gpm_update_zero_covariance_and_errors():
    old = rotation(5, 5)[:, :2]
    assert torch.equal(gpm_update(torch.zeros(5, 5), old, 0.9), old)
    assert gpm_update(torch.zeros(5, 5), None, 0.9).shape == (5, 0)
    with pytest.raises(ValueError, match=r"basis has dimension 4, the covariance 5"):
        gpm_update(torch.eye(5), torch.zeros(4, 1, dtype=F64), 0.9)
    with pytest.raises(ValueError, match=r"covariance must be a square matrix, got shape \(5, 4\)"):
        gpm_update(torch.zeros(5, 4), None, 0.9)
    with pytest.raises(ValueError, match=r"covariance must be a square matrix, got shape \(5,\)"):
        gpm_update(torch.zeros(5), None, 0.9)


def test_gpm_update_float32_and_small_covariances():
    cov, q = spectral([0.2, 0.1, 0.05, 0.05, 0.0], seed=15)  # trace 0.4 < 1
    basis = gpm_update(cov.float(), None, 0.7)  # 0.2 + 0.1 = 0.3 >= 0.28
    assert basis.dtype == F64 and basis.shape == (5, 2)
    assert torch.allclose(proj(basis), proj(q[:, :2]), atol=1e-5)
    grown = gpm_update(cov, q[:, :1], 0.7)
    assert grown.shape == (5, 2) and torch.allclose(proj(grown), proj(q[:, :2]), atol=1e-9)


def test_gpm_update_uses_the_symmetric_part():
    cov, q = spectral([5.0, 3.0, 1.0, 0.5, 0.5], seed=6)
    skew = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    bent = cov + 2.0 * (skew - skew.T)  # same symmetric part
    for threshold, kept in ((0.5, 1), (0.8, 2), (0.9, 3)):  # energies 5, 8, 9 of 10
        basis = gpm_update(bent, None, threshold)
        assert basis.shape == (5, kept)
        assert torch.allclose(proj(basis), proj(q[:, :kept]), atol=1e-9)


def test_gpm_update_accepts_float32_basis_and_exact_threshold():
    cov, q = spectral([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], seed=7)
    old = q[:, :1].float()
    grown = gpm_update(cov, old, 0.7)  # captured 4, needed exactly 7: one more direction
    assert grown.dtype == F64 and grown.shape == (6, 2)
    assert torch.allclose(proj(grown), proj(q[:, :2]), atol=1e-6)
    assert torch.equal(gpm_update(cov, old, 0.4), old.double())  # already captures exactly 0.4
    full = gpm_update(cov, None, 1.0)
    assert full.shape == (6, 4)  # never the empty directions


def test_gpm_update_new_directions_exactly_orthogonal_to_the_old_basis():
    """A tiny direction next to the old basis' null space: eigh mixes them (error ~ eps / gap), the returned basis
    must still be orthonormal (re-orthogonalised against U)."""
    cov, q = spectral([1.0, 1.0, 1e-8, 1e-8, 0.0, 0.0, 0.0, 0.0], seed=8)
    old = q[:, :2] @ rotation(2, 9)
    grown = gpm_update(cov, old, 1.0)
    assert grown.shape == (8, 4)
    assert torch.equal(grown[:, :2], old)
    assert (old.T @ grown[:, 2:]).abs().max() < 1e-13
    assert torch.allclose(grown.T @ grown, torch.eye(4, dtype=F64), atol=1e-13)


def test_project_rows_removes_the_span():
    q = rotation(5, 10)
    basis = q[:, :2]
    m = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = project_rows(m, basis.float())
    assert out.dtype == F64
    assert torch.allclose(out, m @ proj(q[:, 2:]), atol=1e-6)
    assert project_rows(m.to("meta"), basis).device.type == "meta"  # the basis follows the matrix' device


def test_dual_gpm_fresh_memory_is_empty_float64():
    memory = DualGPM(5)
    assert memory.rank == 0 and memory.retain is False
    assert memory.stored.dtype == F64 and memory.stored.shape == (5, 0)
    assert memory.basis().shape == (5, 0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(memory.project_out(x), x)
    assert memory.state()["stored"].dtype == F64


# -- subspace: DualGPM ------------------------------------------------------------------------------------------------
def test_dual_gpm_stays_in_basis_mode_at_exactly_half():
    cov, q = spectral([4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0], seed=11)
    memory = DualGPM(8)
    memory.update(cov, 1.0)  # 4 directions = d / 2: still stored as a basis
    assert memory.retain is False and memory.rank == 4 and memory.stored.shape == (8, 4)
    assert torch.allclose(proj(memory.basis()), proj(q[:, :4]), atol=1e-9)
    assert torch.allclose(proj(memory.complement_basis()), proj(q[:, 4:]), atol=1e-9)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(memory.project_out(x), proj(q[:, 4:]) @ x, atol=1e-9)
    assert torch.allclose(memory.project_out(x.float()), (proj(q[:, 4:]) @ x).float(), atol=1e-5)
    assert memory.project_out(x.to("meta")).device.type == "meta"


def test_dual_gpm_complement_mode_update_counts():
    q = rotation(8, 12)
    memory = DualGPM(8)
    memory.update(q @ torch.diag(torch.tensor([5.0, 4, 3, 2, 1, 0, 0, 0], dtype=F64)) @ q.T, 1.0)
    assert memory.retain and memory.rank == 5 and memory.stored.shape == (8, 3)
    assert torch.allclose(proj(memory.complement_basis()), proj(q[:, 5:]), atol=1e-9)
    x = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.allclose(memory.project_out(x), proj(q[:, 5:]) @ x, atol=1e-9)
    assert torch.allclose(memory.project_out(x.float()), (proj(q[:, 5:]) @ x).float(), atol=1e-5)
    assert memory.project_out(x.to("meta")).device.type == "meta"
    # next task: energy 6 in M (q0), 3 and 1 on complement directions q5, q6: total 10
    cov = q @ torch.diag(torch.tensor([6.0, 0, 0, 0, 0, 3, 1, 0], dtype=F64)) @ q.T
    memory.update(cov, 0.6)  # M already captures exactly 0.6: nothing added
    assert memory.rank == 5
    stored = memory.stored.clone()
    memory.update(torch.zeros(8, 8, dtype=F64), 1.0)  # no energy: the memory is left as it is
    assert torch.equal(memory.stored, stored)
    memory.update(0.01 * cov.float(), 0.55)  # a float32 covariance: the same criterion
    assert memory.rank == 5
    memory.update(0.01 * cov, 0.9)  # needs 0.09: q5 (0.03) reaches it
    assert memory.rank == 6
    assert torch.allclose(proj(memory.basis()), proj(q[:, :6]), atol=1e-9)
    memory.update(cov, 1.0)  # needs q6 as well, never the empty q7
    assert memory.rank == 7 and memory.stored.shape == (8, 1)
    assert torch.allclose(proj(memory.stored), proj(q[:, 7:]), atol=1e-9)


def test_dual_gpm_complement_mode_symmetrises_and_checks():
    q = rotation(6, 13)
    memory = DualGPM(6)
    memory.update(q @ torch.diag(torch.tensor([3.0, 2, 1, 1, 0, 0], dtype=F64)) @ q.T, 1.0)
    assert memory.retain and memory.rank == 4
    cov = q @ torch.diag(torch.tensor([1.0, 0, 0, 0, 4, 2], dtype=F64)) @ q.T  # total 7, M has 1
    skew = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    memory.update(cov + (skew - skew.T), 5 / 7)  # needs 5: q4 (4) reaches 5 exactly
    assert memory.rank == 5
    assert torch.allclose(proj(memory.stored), proj(q[:, 5:]), atol=1e-9)
    memory.update(cov, 1.0)  # needs 6: q5 (2) as well
    assert memory.rank == 6 and memory.stored.shape == (6, 0)
    with pytest.raises(ValueError, match=r"covariance has dimension 5, the memory 6"):
        memory.update(torch.eye(5), 0.9)
    with pytest.raises(ValueError, match=r"^dim must be >= 1, got 0"):
        DualGPM(0)


def test_dual_gpm_state_round_trip_in_both_modes():
    q = rotation(6, 14)
    for values, retain in (([3.0, 1, 0, 0, 0, 0], False), ([3.0, 2, 1, 1, 0, 0], True)):
        memory = DualGPM(6)
        memory.update(q @ torch.diag(torch.tensor(values, dtype=F64)) @ q.T, 1.0)
        assert memory.retain is retain
        state = memory.state()
        assert torch.equal(state["retain"], torch.tensor([int(retain)]))
        restored = DualGPM.from_state({"stored": state["stored"].float(), "retain": state["retain"]})
        assert restored.dim == 6 and restored.retain is retain and restored.rank == memory.rank
        assert restored.stored.dtype == F64
        assert torch.allclose(restored.stored, memory.stored, atol=1e-6)


# -- inflora --------------------------------------------------------------------------------------------------------
def _memory(q: torch.Tensor, m: int) -> DualGPM:
    """A DualGPM whose space M is spanned by the first m columns of q."""
    memory = DualGPM(q.shape[0])
    memory.update(q[:, :m] @ torch.diag(torch.arange(m, 0, -1, dtype=F64)) @ q[:, :m].T, 1.0)
    assert memory.rank == m
    return memory


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_subspace_init_fills_free_directions_and_zeroes_rows_in_m(scale):
    """d = 8, M = 3 directions, energy on 2 free directions only: rows 0-1 the energetic directions, rows 2-4 an
    orthonormal basis of the 3 free directions without energy (not M), rows 5.. zero (only M is left)."""
    q = rotation(8, 20)
    memory = _memory(q, 3)
    cov = scale * (q[:, 3:5] @ torch.diag(torch.tensor([2.0, 1.0], dtype=F64)) @ q[:, 3:5].T)
    a = subspace_init(cov, memory, 7)
    assert a.shape == (7, 8) and a.dtype == F64
    assert abs(float(a[0] @ q[:, 3])) == pytest.approx(1.0, abs=1e-9)
    assert abs(float(a[1] @ q[:, 4])) == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(a[:5] @ a[:5].T, torch.eye(5, dtype=F64), atol=1e-9)
    assert (a[:2] @ q[:, :3]).abs().max() < 1e-12  # nothing in M
    # the free directions without energy rank above M by the lift eps = 1e-9 ||C||: eigh resolves them to
    # ~ rounding / eps ~ 1e-7 (a lift at the rounding level would mix them with M completely)
    assert (a[2:] @ q[:, :3]).abs().max() < 1e-5
    assert torch.allclose(proj(a[2:5].T), proj(q[:, 5:]), atol=1e-5)
    assert torch.equal(a[5:], torch.zeros(2, 8, dtype=F64))
    padded = subspace_init(cov, memory, 10)  # rank > d: zero rows appended
    assert padded.shape == (10, 8) and torch.equal(padded[5:], torch.zeros(5, 8, dtype=F64))
    assert torch.allclose(padded[:2].abs(), a[:2].abs(), atol=1e-9)


def test_subspace_init_without_memory_and_from_float32():
    cov, q = spectral([3.0, 2.0, 1.0, 0.0, 0.0], seed=21)
    bent = cov + (lambda s: s - s.T)(torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=F64))
    a = subspace_init(bent, None, 5)  # the symmetric part counts
    for i in range(3):
        assert abs(float(a[i] @ q[:, i])) == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(a @ a.T, torch.eye(5, dtype=F64), atol=1e-9)  # the empty directions are filled too
    a32 = subspace_init(bent.float(), None, 2)  # float32 input
    assert a32.dtype == F64
    for i in range(2):
        assert abs(float(a32[i] @ q[:, i])) == pytest.approx(1.0, abs=1e-5)


def test_energy_matrix_in_float64_from_float32():
    cov32 = (spectral([3.0, 1.0, 0.5, 0.25], seed=22)[0] * 1000).round().float() / 1000  # float32 input
    c = cov32.double()
    assert energy_matrix(cov32, "squared").dtype == F64
    assert torch.allclose(energy_matrix(cov32, "squared"), c @ c, rtol=1e-13, atol=1e-13)
    assert torch.equal(energy_matrix(cov32, "eigenvalues"), c)


def _inflora(**options):
    torch.manual_seed(0)
    return make_learner("inflora", MLP(), rank=2, target_modules=("fc1",), **options)


def test_inflora_total_tasks_from_the_stream_is_saved_and_restored():
    learner = _inflora(threshold=0.6, threshold_end=0.9)
    learner.set_stream_length(3)
    learner.set_stream_length(3)  # a configured or taken length equal to the stream's is fine
    x, _ = task_data(0)
    learner.begin_task([x])
    learner.end_task([x])
    state = learner.extra_state()
    assert torch.equal(state["total_tasks"], torch.tensor([3], dtype=torch.int64))
    assert state["total_tasks"].dtype == torch.int64
    fresh = _inflora(threshold=0.6, threshold_end=0.9)
    fresh.load_extra_state(state)
    assert fresh.total_tasks == 3
    assert fresh.threshold(1) == pytest.approx(0.7)  # 0.6 + 0.3 * 1 / 3
    assert fresh.memory["fc1"].rank == learner.memory["fc1"].rank
    fixed = _inflora(total_tasks=4)
    fixed.set_stream_length(4)
    assert "total_tasks" in fixed.extra_state()
    assert "total_tasks" not in _inflora().extra_state()
    assert fixed.extra_state()["total_tasks"].item() == 4
    with pytest.raises(ValueError, match=r"^n_tasks must be >= 1, got 0"):
        _inflora().set_stream_length(0)
    with pytest.raises(ValueError, match=r"^InfLoRA's threshold schedule needs total_tasks"):
        _inflora().threshold(0)


# -- gpm -------------------------------------------------------------------------------------------------------------
def _inputs(model, x):
    """The inputs of fc1 and fc2 of the test MLP (float64), computed independently of the hooks."""
    with torch.no_grad():
        return {"fc1": x.double(), "fc2": torch.relu(model.fc1(x)).double()}


def _cov(h):
    return h.T @ h / len(h)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def test_gpm_fine_tune_projects_gradients_and_steps_and_grows_bases_per_layer():
    torch.manual_seed(0)
    model = MLP()
    learner = make_learner("gpm", model, target_modules=("fc1", "fc2"), threshold=0.9, threshold_increment=0.05)
    x0, y0 = task_data(0)
    x1, y1 = task_data(1)
    learner.begin_task([x0])
    assert learner.task == 0
    learner.end_task([x0])
    h0 = _inputs(model, x0)
    old = {n: gpm_update(_cov(h0[n]), None, 0.9) for n in h0}
    for n in old:
        assert torch.allclose(proj(learner.bases[n]), proj(old[n]), atol=1e-8), n
    assert (proj(old["fc1"]) - proj(old["fc2"])).abs().max() > 0.1  # two different bases
    learner.begin_task([x1])
    assert learner.task == 1
    weights = {n: model.get_submodule(n).weight for n in old}
    start = {n: w.detach().clone() for n, w in weights.items()}
    _grads(model, torch.cat([x0, x1]), torch.cat([y0, y1]))  # old inputs too: a gradient partly in span(U)
    raw = {n: w.grad.clone() for n, w in weights.items()}
    learner.after_backward()
    for n, w in weights.items():
        expected = raw[n].double() - raw[n].double() @ proj(old[n])
        assert torch.allclose(w.grad.double(), expected, atol=1e-6), n
        assert w.grad.norm() > 0.1 * raw[n].norm() and (w.grad - raw[n]).norm() > 0.01 * raw[n].norm()
    with torch.no_grad():
        for w in weights.values():
            w -= 0.5 * w.grad
    learner.after_step()
    for n, w in weights.items():  # the SGD step already lies in the allowed set: kept as it is
        assert torch.allclose(w.detach(), start[n] - 0.5 * w.grad, atol=1e-6), n
    with torch.no_grad():  # an update with a part in span(U): only that part is removed
        for w in weights.values():
            w += 0.01 * torch.ones_like(w)
    learner.after_step()
    for n, w in weights.items():
        moved = (start[n] - 0.5 * w.grad + 0.01).double()
        expected = start[n].double() + (moved - start[n].double()) @ (torch.eye(D, dtype=F64) - proj(old[n]))
        assert torch.allclose(w.detach().double(), expected, atol=1e-5), n
    learner.end_task([x1])
    h1 = _inputs(model, x1)
    for n in old:  # old basis kept as the first columns, extended at threshold 0.9 + 0.05 * 1
        grown = gpm_update(_cov(h1[n]), old[n], 0.95)
        assert learner.bases[n].shape == grown.shape
        assert torch.allclose(learner.bases[n][:, :old[n].shape[1]], old[n], atol=1e-8), n
        assert torch.allclose(proj(learner.bases[n]), proj(grown), atol=1e-6), n


def test_gpm_lora_projects_the_new_a_gradient_with_a_one_column_basis():
    torch.manual_seed(1)
    model = MLP()
    learner = make_learner("gpm_lora", model, rank=3, target_modules=("fc1", "fc2"), threshold=0.2)
    x0, y0 = task_data(0)
    learner.begin_task([x0])
    learner.end_task([x0])
    assert learner.bases["fc1"].shape == (D, 1)  # one direction of 8 equal ones reaches 0.2
    x1, y1 = task_data(1)
    learner.begin_task([x1])
    layers = learner.layers()
    for n, layer in layers.items():  # the new A starts off the old inputs
        a = layer.lora_A["task1"].weight
        assert (a.double() @ learner.bases[n]).abs().max() < 1e-6 and a.abs().max() > 0.01
        with torch.no_grad():
            layer.lora_B["task1"].weight.normal_()  # so that A gets a gradient
    _grads(model, x1, y1)
    raw = {n: layer.lora_A["task1"].weight.grad.clone() for n, layer in layers.items()}
    learner.after_backward()
    for n, layer in layers.items():
        u = learner.bases[n]
        expected = raw[n].double() - raw[n].double() @ proj(u)
        assert torch.allclose(layer.lora_A["task1"].weight.grad.double(), expected, atol=1e-6), n
        assert (raw[n].double() @ u).abs().max() > 1e-4  # there was something to remove


def test_gpm_load_extra_state_checks_keys_and_restores_float64(tmp_path):
    torch.manual_seed(0)
    learner = make_learner("gpm", MLP(), target_modules=("fc1",), threshold=0.9)
    x0, _ = task_data(0)
    learner.begin_task([x0])
    learner.end_task([x0])
    state = learner.extra_state()
    fresh = make_learner("gpm", MLP(), target_modules=("fc1",), threshold=0.9)
    fresh.load_extra_state({k: v.float() for k, v in state.items()})
    assert fresh.bases["fc1"].dtype == F64
    assert torch.allclose(fresh.bases["fc1"], learner.bases["fc1"], atol=1e-6)
    before = fresh.model.fc1.weight.detach().clone()
    fresh.after_step()  # outside a task (no start weights): nothing to restore
    assert torch.equal(fresh.model.fc1.weight, before)
    lora = make_learner("gpm_lora", MLP(), target_modules=("fc1",))
    with pytest.raises(ValueError, match=r"GPMLoRA state has unexpected key 'bases::fc1'"):
        lora.load_extra_state({"bases::fc1": state["basis::fc1"]})
    with pytest.raises(ValueError, match=r"unexpected key 'basis::fc2'"):
        lora.load_extra_state({"basis::fc2": state["basis::fc1"]})
    with pytest.raises(ValueError, match=r"^GPMFineTune.begin_task needs the new task's inputs"):
        fresh.begin_task()


# -- olora ----------------------------------------------------------------------------------------------------------
def test_orthogonality_penalty_by_hand_and_only_the_new_factor_gets_a_gradient():
    q = rotation(4, 30)
    old = [torch.stack([q[0], q[1] + q[2]]).float(), (2 * q[3])[None].float()]
    new = (q[1] - 3 * q[3]).float()[None].requires_grad_(True)  # one row
    # |<q0, new>| + |<q1 + q2, new>| + |<2 q3, new>| = 0 + 1 + 6
    total = orthogonality_penalty(old, new)
    assert float(total) == pytest.approx(7.0, abs=1e-5)
    old[0].requires_grad_(True)
    total = orthogonality_penalty(old, new)
    total.backward()
    assert old[0].grad is None and new.grad is not None
    assert float(orthogonality_penalty([], new)) == 0.0
    with pytest.raises(ValueError, match=r"old adapter has input dim 3, new one 4"):
        orthogonality_penalty([torch.ones(2, 3)], new)


def _olora(**options):
    torch.manual_seed(0)
    return make_learner("olora", MLP(), target_modules=("fc1", "fc2"), **options)


def test_olora_penalty_none_before_a_task_and_on_the_first_task_without_lambda2():
    learner = _olora(rank=2)
    assert learner.penalty() is None
    learner.begin_task()
    assert learner.penalty() is None  # no old adapter, lambda2 = 0
    weighted = _olora(rank=2, lambda1=0.7, lambda2=0.3)
    weighted.begin_task()
    layers = weighted.layers()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["task0"].weight.normal_()
    expected = 0.3 * sum(float(layer.lora_A["task0"].weight.pow(2).sum() + layer.lora_B["task0"].weight.pow(2).sum())
                         for layer in layers.values())
    assert float(weighted.penalty()) == pytest.approx(expected, rel=1e-5)


def test_olora_penalty_sums_layers_and_old_adapters_without_lambda2():
    learner = _olora(rank=2, lambda1=0.25)
    for _ in range(3):
        learner.begin_task()
    layers = learner.layers()
    expected = 0.25 * sum(float((layer.lora_A[o].weight @ layer.lora_A["task2"].weight.T).abs().sum())
                          for layer in layers.values() for o in ("task0", "task1"))
    assert expected > 0
    assert float(learner.penalty()) == pytest.approx(expected, rel=1e-5)


def test_olora_defaults_are_the_authors():
    cfg = OLoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.lambda1, cfg.lambda2) == (
        8, 32.0, 0.1, ("q", "v"), 0.5, 0.0)
    assert cfg.scaling == 4.0
    with pytest.raises(ValueError, match=r"^lambda2 must be in \[0.0, inf\], got -1"):
        OLoRAConfig(lambda2=-1)
    assert OLoRAConfig(lambda1=0.0, lambda2=0.0).lambda1 == 0.0


# -- config / registry ----------------------------------------------------------------------------------------------
def test_lora_config_checks_and_normalisation():
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.train_head, cfg.head, cfg.max_samples,
            cfg.lr) == (4, 4.0, 0.0, ("q", "k", "v"), True, "auto", 512, None)
    assert LoRAConfig(rank=6).alpha == 6.0 and LoRAConfig(rank=6).scaling == 1.0
    assert LoRAConfig(rank=4, alpha=2.0).scaling == 0.5
    assert LoRAConfig(target_modules="fc1").target_modules == ("fc1",)
    assert LoRAConfig(target_modules=["a", "b"]).target_modules == ("a", "b")
    assert LoRAConfig(rank=1, max_samples=1, dropout=0.0, lr=1e-9).rank == 1
    with pytest.raises(TypeError, match=r"^rank must be an int, got bool"):
        LoRAConfig(rank=True)
    with pytest.raises(TypeError, match=r"^max_samples must be an int, got float"):
        LoRAConfig(max_samples=2.0)
    with pytest.raises(ValueError, match=r"^max_samples must be >= 1, got 0"):
        LoRAConfig(max_samples=0)
    with pytest.raises(ValueError, match=r"^alpha must be in \(0.0, inf\], got 0"):
        LoRAConfig(alpha=0)
    with pytest.raises(ValueError, match=r"^dropout must be in \[0.0, 1.0\), got -0.1"):
        LoRAConfig(dropout=-0.1)
    with pytest.raises(ValueError, match=r"^target_modules must be a non-empty list of module names, got \('a', ''\)"):
        LoRAConfig(target_modules=["a", ""])
    with pytest.raises(ValueError, match=r"target_modules must be a non-empty list"):
        LoRAConfig(target_modules=["a", 3])
    with pytest.raises(ValueError, match=r"^lr must be in \(0.0, inf\], got -1"):
        LoRAConfig(lr=-1)
    check_positive_int("n", 1)
    check_threshold("t", 1.0)
    with pytest.raises(ValueError, match=r"^t must be in \(0.0, 1.0\], got 0.0"):
        check_threshold("t", 0.0)


def test_registry_lists_makes_and_rejects():
    assert {"lora", "olora", "inflora", "gpm", "gpm_lora", "sdlora"} <= set(list_learners())
    cfg = make_config("olora", rank=3, lambda1=0.2)
    assert isinstance(cfg, OLoRAConfig) and (cfg.rank, cfg.lambda1) == (3, 0.2)
    learner = make_learner("gpm", MLP(), target_modules=("fc1",), threshold=0.8)
    assert type(learner).name == "gpm" and learner.config.threshold == 0.8 and learner.targets == ["fc1"]
    with pytest.raises(TypeError, match=r"^register_learner needs a ContinualLoRA subclass, got <class 'int'>"):
        register_learner(int)
    with pytest.raises(TypeError, match=r"register_learner needs a ContinualLoRA subclass"):
        register_learner("olora")


# -- adapters -------------------------------------------------------------------------------------------------------
class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
        self.fc1 = nn.Linear(6, 6)
        self.head = nn.Sequential(nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.fc1(self.block(x)))


def test_resolve_targets_full_and_short_names_order_dedup_and_exclusion():
    model = _Nested()
    assert linear_names(model) == ["block.0", "block.2", "fc1", "head.0"]
    assert resolve_targets(model, ["fc1", "0"]) == ["block.0", "fc1", "head.0"]  # module order, short names
    assert resolve_targets(model, ["fc1", "block.2", "fc1"]) == ["block.2", "fc1"]  # deduplicated, full name
    assert resolve_targets(model, ["0"], exclude=["head"]) == ["block.0"]  # excluded with its submodules
    assert resolve_targets(model, ["0"], exclude=["hea"]) == ["block.0", "head.0"]  # a prefix is no parent
    with pytest.raises(ValueError, match=r"^target module 'nope' matches no nn.Linear layer of _Nested; "
                                         r"valid names: \['0', '2', 'fc1'\]"):
        resolve_targets(model, ["nope"], exclude=["head"])
    add_adapter(model, "t0", LoRAConfig(rank=2), ["block.2", "fc1"])
    # after injection: the peft layers count, never their base_layer or lora_A / lora_B children
    assert resolve_targets(model, ["fc1", "2"]) == ["block.2", "fc1"]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        resolve_targets(model, ["base_layer"])
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        resolve_targets(model, ["t0"])
    assert linear_names(model) == ["block.0", "block.2.base_layer", "block.2.lora_A.t0", "block.2.lora_B.t0",
                                   "fc1.base_layer", "fc1.lora_A.t0", "fc1.lora_B.t0", "head.0"]


def test_multihead_attention_refused_only_for_its_out_proj():
    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out_proj = nn.Linear(4, 4)  # a top-level layer named like MHA's: allowed
            self.attn = nn.MultiheadAttention(4, 2)

    model = Top()
    assert resolve_targets(model, ["out_proj"], exclude=["attn"]) == ["out_proj"]
    with pytest.raises(ValueError, match=r"^'attn.out_proj' is the output projection of an nn.MultiheadAttention"):
        resolve_targets(model, ["attn.out_proj"])


def test_delta_weight_is_scaling_times_b_a_and_matches_the_forward():
    torch.manual_seed(0)
    model = _Nested()
    add_adapter(model, "t0", LoRAConfig(rank=2, alpha=8.0), ["fc1", "block.0"])
    add_adapter(model, "t1", LoRAConfig(rank=3, alpha=1.5), ["fc1"])
    assert adapter_names(model) == ["t0", "t1"]
    layer = lora_layers(model)["fc1"]
    with torch.no_grad():
        for name in ("t0", "t1"):
            layer.lora_B[name].weight.normal_()
    a, b = layer.lora_A["t0"].weight, layer.lora_B["t0"].weight
    assert torch.allclose(delta_weight(layer, "t0"), 4.0 * b @ a)  # alpha / rank = 8 / 2
    deltas = adapter_deltas(model, "t1")
    assert set(deltas) == {"fc1"} and not deltas["fc1"].requires_grad
    assert torch.allclose(deltas["fc1"], 0.5 * layer.lora_B["t1"].weight @ layer.lora_A["t1"].weight)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    activate(model, ["t0", "t1"], ["t1"])
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ (delta_weight(layer, "t0") + delta_weight(layer, "t1")).T
        assert torch.allclose(layer(x), expected, atol=1e-5)
    assert {p.requires_grad for p in adapter_parameters(model, "t1")} == {True}
    assert {p.requires_grad for p in adapter_parameters(model, "t0")} == {False}
    assert len(adapter_parameters(model, "t1")) == 2 and len(adapter_parameters(model, "t0")) == 4
    assert layer.active_adapters == ["t0", "t1"]
    activate(model, ["t0"])
    assert layer.active_adapters == ["t0"] and lora_layers(model)["block.0"].active_adapters == ["t0"]
    assert not any(p.requires_grad for n in ("t0", "t1") for p in adapter_parameters(model, n))


def test_load_adapter_state_checks_keys_and_shapes():
    torch.manual_seed(0)
    model = _Nested()
    add_adapter(model, "t0", LoRAConfig(rank=2), ["fc1", "block.0"])
    state = adapter_state(model, "t0")
    assert list(state) == ["block.0.lora_A", "block.0.lora_B", "fc1.lora_A", "fc1.lora_B"]
    new = {k: torch.randn_like(v) for k, v in state.items()}
    load_adapter_state(model, "t0", new)
    assert all(torch.equal(adapter_state(model, "t0")[k], v) for k, v in new.items())
    with pytest.raises(ValueError, match=r"^adapter 't0': state does not match the model \(missing \['fc1.lora_B'\], "
                                         r"unexpected \['fc9.lora_B'\]\)"):
        load_adapter_state(model, "t0", {**{k: v for k, v in new.items() if k != "fc1.lora_B"},
                                         "fc9.lora_B": new["fc1.lora_B"]})
    with pytest.raises(ValueError, match=r"^adapter 't0': fc1.lora_A has shape \(3, 6\), the model \(2, 6\)"):
        load_adapter_state(model, "t0", {**new, "fc1.lora_A": torch.zeros(3, 6)})


def test_adapter_names_in_first_seen_layer_order_when_adapters_target_different_layers():
    model = _Nested()
    add_adapter(model, "t0", LoRAConfig(rank=2), ["fc1"])
    add_adapter(model, "t1", LoRAConfig(rank=2), ["block.0", "fc1"])
    assert adapter_names(model) == ["t1", "t0"]  # block.0 comes first in the model and holds only t1


# -- learner --------------------------------------------------------------------------------------------------------
class _PerTaskMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, D)
        self.head = PerTaskHead(D, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))


def test_learner_head_selection_and_exclusion():
    torch.manual_seed(0)
    learner = make_learner("lora", MLP(), target_modules=("fc1",))
    assert learner.head_name == "head"
    params = {id(p) for p in learner.begin_task()}
    assert {id(learner.model.head.weight), id(learner.model.head.bias)} <= params
    named = make_learner("lora", MLP(), target_modules=("fc1",), head="fc2")
    assert named.head_name == "fc2"
    named.begin_task()
    assert named.model.fc2.weight.requires_grad and not named.model.head.weight.requires_grad
    with pytest.raises(ValueError, match=r"target module 'head' matches no nn.Linear"):
        make_learner("lora", MLP(), target_modules=("fc1", "head"))  # the trained head is no LoRA target
    frozen = make_learner("lora", MLP(), target_modules=("fc1", "head"), train_head=False)
    assert frozen.head_name is None and frozen.targets == ["fc1", "head"]
    params = {id(p) for p in frozen.begin_task()}
    assert all(".lora_" in n for n, p in frozen.model.named_parameters() if id(p) in params)
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, got int"):
        ContinualLoRA(3)
    with pytest.raises(TypeError, match=r"^OLoRA needs a OLoRAConfig, got LoRAConfig"):
        OLoRA(MLP(), config=LoRAConfig(target_modules=("fc1",)))
    assert SequentialLoRAConfig().rank == 8 and SequentialLoRAConfig().target_modules == ("q", "v")
    with pytest.raises(RuntimeError, match=r"^end_task called before begin_task"):
        frozen.__class__(MLP(), config=frozen.config).end_task()
    started = _inflora(total_tasks=2)
    started.begin_task([task_data(0)[0]])
    with pytest.raises(ValueError, match=r"^InfLoRA.end_task needs the task's inputs"):
        started.end_task()


def test_learner_per_task_head_trains_only_the_current_task_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _PerTaskMLP()
    learner = make_learner("lora", model, rank=2, target_modules=("fc1",))
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    for task in range(2):
        model.head.add_task([2 * task, 2 * task + 1])
        learner.begin_task()
        assert model.head.heads[task].weight.requires_grad
        with torch.no_grad():
            model.head.heads[task].weight.normal_()
            model.fc1.lora_B["task0"].weight.normal_()
    assert not model.head.heads[0].weight.requires_grad  # the finished task's head stays frozen
    learner.save(tmp_path / "l.safetensors")
    torch.manual_seed(0)  # the same base model; adapters and head come from the file
    fresh_model = _PerTaskMLP()
    fresh = make_learner("lora", fresh_model, rank=2, target_modules=("fc1",))
    fresh.load(tmp_path / "l.safetensors")
    assert fresh_model.head.task_classes == [[0, 1], [2, 3]] and fresh.task == 1
    model.eval(), fresh_model.eval()
    with torch.no_grad():
        assert torch.equal(fresh_model(x), model(x))


def test_gpm_and_inflora_file_round_trip_restores_the_memory(tmp_path):
    x0, _ = task_data(0)
    for method, options in (("gpm_lora", {"threshold": 0.9}), ("inflora", {"total_tasks": 3})):
        torch.manual_seed(0)
        learner = make_learner(method, MLP(), rank=2, target_modules=("fc1",), **options)
        learner.begin_task([x0])
        learner.end_task([x0])
        learner.save(tmp_path / f"{method}.safetensors")
        torch.manual_seed(1)
        fresh = make_learner(method, MLP(), rank=2, target_modules=("fc1",), **options)
        fresh.load(tmp_path / f"{method}.safetensors")
        assert fresh.extra_state().keys() == learner.extra_state().keys() and len(fresh.extra_state()) > 0
        assert all(torch.equal(v, fresh.extra_state()[k]) for k, v in learner.extra_state().items())
    plain = make_learner("lora", MLP(), target_modules=("fc1",))
    with pytest.raises(ValueError, match=r"^SequentialLoRA has no extra state, got keys \['a'\]"):
        plain.load_extra_state({"a": torch.zeros(1)})


def test_resolve_targets_keeps_module_order_not_alphabetical():
    model = nn.Sequential()
    model.add_module("zeta", nn.Linear(3, 3))
    model.add_module("alpha", nn.Linear(3, 3))
    model.add_module("mid", nn.Linear(3, 3))
    assert resolve_targets(model, ["mid", "alpha", "zeta"]) == ["zeta", "alpha", "mid"]


def test_multihead_attention_refused_when_nested_or_the_model_itself():
    outer = nn.Module()
    outer.enc = nn.Module()
    outer.enc.attn = nn.MultiheadAttention(4, 2)
    with pytest.raises(ValueError, match=r"^'enc.attn.out_proj' is the output projection"):
        resolve_targets(outer, ["out_proj"])
    with pytest.raises(ValueError, match=r"^'out_proj' is the output projection"):
        resolve_targets(nn.MultiheadAttention(4, 2), ["out_proj"])


def test_add_adapter_passes_dropout_and_is_silent_about_multiple_adapters():
    import warnings

    model = _Nested()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_adapter(model, "t0", LoRAConfig(rank=2, dropout=0.25), ["fc1"])
        add_adapter(model, "t1", LoRAConfig(rank=3, dropout=0.5, alpha=6.0), ["fc1"])
    assert not [w for w in caught if "multiple adapters" in str(w.message)]
    layer = lora_layers(model)["fc1"]
    assert layer.lora_dropout["t0"].p == 0.25 and layer.lora_dropout["t1"].p == 0.5
    assert layer.r == {"t0": 2, "t1": 3} and layer.scaling == {"t0": 1.0, "t1": 2.0}


# -- sdlora ---------------------------------------------------------------------------------------------------------
def _sdlora(model=None, **options):
    torch.manual_seed(0)
    return make_learner("sdlora", MLP() if model is None else model, rank=2, target_modules=("fc1", "fc2"), **options)


def test_direction_norm_by_hand_and_raw_weights_of_a_plain_layer():
    torch.manual_seed(0)
    model = MLP()
    add_adapter(model, "t0", LoRAConfig(rank=2, alpha=6.0), ["fc1"])  # s = 3
    layer = lora_layers(model)["fc1"]
    with torch.no_grad():
        layer.lora_B["t0"].weight.normal_()
    a, b = raw_weights(layer, "t0")  # no parametrization: the plain weights
    assert a is layer.lora_A["t0"].weight and b is layer.lora_B["t0"].weight
    a64, b64 = a.detach().double(), b.detach().double()
    assert direction_norm(layer, "t0") == pytest.approx(float((3 * b64).norm() * a64.norm()), rel=1e-12)  # default
    assert direction_norm(layer, "t0", "product") == pytest.approx(float((3 * b64 @ a64).norm()), rel=1e-12)
    with pytest.raises(ValueError, match=r"^norm must be one of \['factors', 'product'\], got 'fro'"):
        direction_norm(layer, "t0", "fro")
    with pytest.raises(ValueError, match=r"^magnitude_init must be in \(0.0, inf\], got 0"):
        _sdlora(magnitude_init=0)


@pytest.mark.parametrize("magnitudes", ["component", "layer"])
def test_sdlora_magnitudes_follow_the_weights_dtype_and_device(magnitudes):
    learner = _sdlora(MLP().double(), magnitudes=magnitudes)
    learner.begin_task()
    for module in learner._magnitudes["task0"].values():
        assert module.magnitude.dtype == module.inv_norm.dtype == module.norm.dtype == F64
        assert float(module.magnitude) == 0.8  # exactly the float64 0.8
    layer = learner.layers()["fc1"]
    raw = raw_weights(layer, "task0")[1].detach().clone()
    with torch.no_grad():
        raw.normal_()
        layer.lora_B["task0"].parametrizations.weight.original.copy_(raw)
    assert torch.equal(layer.lora_B["task0"].weight, raw * 0.8)
    meta = _sdlora(MLP().to("meta"), magnitudes=magnitudes)
    meta.begin_task()
    for module in meta._magnitudes["task0"].values():
        assert module.magnitude.device.type == module.inv_norm.device.type == module.norm.device.type == "meta"


def test_sdlora_fresh_state_and_load_extra_state_in_place():
    fresh = _sdlora()
    state = fresh.extra_state()
    assert state.keys() == {"frozen", "normalised"}
    assert int(state["frozen"]) == 0 and int(state["normalised"]) == 0
    for magnitudes in ("component", "layer"):
        learner = _sdlora(magnitudes=magnitudes)
        x, y = task_data(0)
        for _ in range(2):
            learner.begin_task()
            with torch.no_grad():
                for layer in learner.layers().values():
                    layer.lora_B[learner.adapters[-1]].parametrizations.weight.original.normal_()
                for p in learner.magnitude_parameters():
                    p.mul_(1.5)
            learner.end_task()
        saved = learner.extra_state()
        expected = learner.model(x).detach()
        with torch.no_grad():
            for p in learner.magnitude_parameters():
                p.fill_(3.0)
        assert not torch.allclose(learner.model(x), expected)
        learner.load_extra_state(saved)  # into the same learner: its registered magnitudes take the values
        assert torch.allclose(learner.model(x), expected, atol=1e-6)
        assert all(torch.equal(v, learner.extra_state()[k]) for k, v in saved.items())


def test_save_load_with_a_config_field_json_cannot_write_natively(tmp_path):
    from dataclasses import dataclass, field

    @dataclass(kw_only=True)
    class TaggedConfig(LoRAConfig):
        tags: frozenset = field(default_factory=lambda: frozenset({"a"}))

    class Tagged(ContinualLoRA):
        name = "tagged"
        config_cls = TaggedConfig

    torch.manual_seed(0)
    learner = Tagged(MLP(), config=TaggedConfig(target_modules=("fc1",)))
    learner.begin_task()
    with torch.no_grad():
        learner.layers()["fc1"].lora_B["task0"].weight.normal_()
    learner.save(tmp_path / "t.safetensors")  # the frozenset is written as a list
    torch.manual_seed(0)
    fresh = Tagged(MLP(), config=TaggedConfig(target_modules=("fc1",)))
    fresh.load(tmp_path / "t.safetensors")
    assert torch.equal(adapter_state(fresh.model, "task0")["fc1.lora_B"],
                       adapter_state(learner.model, "task0")["fc1.lora_B"])
    with pytest.raises(ValueError, match="was saved with config"):
        other = Tagged(MLP(), config=TaggedConfig(target_modules=("fc1",), tags=frozenset({"b"})))
        other.load(tmp_path / "t.safetensors")


def test_load_a_file_written_without_head_extra_metadata(tmp_path):
    """Files from before the per-task head support have no 'head_extra' entry: their head still loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    learner = make_learner("lora", MLP(), rank=2, target_modules=("fc1",))
    learner.begin_task()
    with torch.no_grad():
        learner.model.head.weight.normal_()
    learner.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "head_extra"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    torch.manual_seed(1)
    fresh = make_learner("lora", MLP(), rank=2, target_modules=("fc1",))
    fresh.load(tmp_path / "old.safetensors")
    assert torch.equal(fresh.model.head.weight, learner.model.head.weight)


def test_register_learner_adds_the_class_under_its_name():
    from avalanche_merge.lora.registry import LEARNERS

    class Probe(ContinualLoRA):
        name = "probe_for_mutants"

    assert register_learner(Probe) is Probe
    try:
        assert "probe_for_mutants" in list_learners() and LEARNERS.get("probe_for_mutants") is Probe
        learner = make_learner("probe_for_mutants", MLP(), target_modules=("fc1",), rank=3)
        assert type(learner) is Probe and learner.config.rank == 3
    finally:
        LEARNERS.remove("probe_for_mutants")
    assert "probe_for_mutants" not in list_learners()


def test_dual_gpm_complement_mode_needs_two_directions():
    """Complement mode: M holds 4 of 6 directions; a task with 1 in M and 4, 2 on two free directions needs both
    at threshold 1 (4 alone < 6)."""
    q = rotation(6, 16)
    memory = DualGPM(6)
    memory.update(q @ torch.diag(torch.tensor([3.0, 2, 1, 1, 0, 0], dtype=F64)) @ q.T, 1.0)
    assert memory.retain and memory.rank == 4
    memory.update(q @ torch.diag(torch.tensor([1.0, 0, 0, 0, 4, 2], dtype=F64)) @ q.T, 1.0)
    assert memory.rank == 6 and memory.stored.shape == (6, 0)


class _ColonNames(nn.Module):
    """Module names may contain '::' (torch only forbids '.'), the separator of the learners' state keys."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("enc::fc", nn.Linear(D, D))
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        return self.head(torch.relu(self.get_submodule("enc::fc")(x)))


@pytest.mark.parametrize(("method", "options"), [("inflora", {"total_tasks": 2}), ("gpm_lora", {}), ("gpm", {})])
def test_state_keys_round_trip_with_colons_in_layer_names(method, options):
    x0, _ = task_data(0)
    torch.manual_seed(0)
    learner = make_learner(method, _ColonNames(), rank=2, target_modules=("enc::fc",), **options)
    learner.begin_task([x0])
    learner.end_task([x0])
    state = learner.extra_state()
    fresh = make_learner(method, _ColonNames(), rank=2, target_modules=("enc::fc",), **options)
    fresh.load_extra_state(state)
    assert fresh.extra_state().keys() == state.keys()
    assert all(torch.equal(v, fresh.extra_state()[k]) for k, v in state.items())


# -- cllora ---------------------------------------------------------------------------------------------------------
def test_cllora_functions_by_hand():
    from avalanche_merge.lora.cllora import block_orthogonality, logit_kd, random_orthogonal, reassignment_weights

    # eps = 1e-8 matters for tiny vectors: cur = v * 1e-8 / (1e-8 + 1e-8) = v / 2 (unit v), same for p
    v, w = rotation(3, 40)[0], rotation(3, 40)[1] + rotation(3, 40)[0]
    got = block_orthogonality([1e-8 * w], 1e-8 * v)
    expected = abs(float((1e-8 * w / (1e-8 * w.norm() + 1e-8)) @ (v / 2)))
    assert float(got) == pytest.approx(expected, rel=1e-6) and expected > 0.1
    # logits with a token axis: softmax over the classes (last axis), sum over classes, mean over the rest
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 5, generator=g, dtype=F64), torch.randn(2, 3, 5, generator=g, dtype=F64)
    p = torch.exp(t / 2) / torch.exp(t / 2).sum(-1, keepdim=True)
    logq = s / 2 - torch.log(torch.exp(s / 2).sum(-1, keepdim=True))
    assert float(logit_kd(s, t, 2.0)) == pytest.approx(float(-(p * logq).sum(-1).mean()), rel=1e-12)
    # the unique QR: out @ G = R upper triangular with a positive diagonal
    torch.manual_seed(5)
    gauss = torch.randn(6, 4)
    torch.manual_seed(5)
    out = random_orthogonal(4, 6)
    r = out @ gauss
    assert torch.allclose(out @ out.T, torch.eye(4), atol=1e-5)
    assert torch.allclose(torch.tril(r, -1), torch.zeros(4, 4), atol=1e-5) and (torch.diagonal(r) > 0).all()
    assert random_orthogonal(2, 3, like=torch.zeros(1, dtype=F64)).dtype == F64
    # small rows (sum of norms 0.5 < 1): w_i = 3 ||b_i|| / 0.5
    b = torch.tensor([[0.3, 0.0], [0.0, 0.1], [0.06, 0.08]])
    assert torch.allclose(reassignment_weights(b), torch.tensor([1.8, 0.6, 0.6]), atol=1e-6)


class _Blocks(nn.Module):
    def __init__(self, n: int, width: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Module() for _ in range(n))
        for block in self.blocks:
            block.q = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        for block in self.blocks:
            x = x + block.q(x)
        return self.head(x)


def test_cllora_block_weights_init_dtype_and_one_specific_layer():
    torch.manual_seed(0)
    many = make_learner("cllora", _Blocks(40), target_modules=("q",), rank=4, shared_blocks=0)  # rank = width ok
    many.begin_task()
    beta = many.block_weights["task0"]
    assert beta.shape == (40,) and 0.5 <= float(beta.min()) < 0.75 and 1.25 < float(beta.max()) < 1.5
    one = make_learner("cllora", _Blocks(3).double(), target_modules=("q",), rank=2, shared_blocks=2)
    one.begin_task()
    assert one.specific_targets == ["blocks.2.q"] and one.block_weights["task0"].dtype == F64
    assert one.layers()["blocks.0.q"].lora_A[SHARED].weight.dtype == F64


def _cl(**options):
    torch.manual_seed(0)
    return make_learner("cllora", tiny(), rank=2, **options)


def test_cllora_penalty_is_kd_plus_orthogonality_by_hand():
    from avalanche_merge.lora.cllora import block_orthogonality, logit_kd

    learner = _cl(orth_weight=0.5)
    cl_train(learner)
    learner.begin_task()
    assert learner.task == 1
    perturb_shared(learner)
    learner.model.train()
    student = learner.model(x=X)  # keyword input: the teacher gets it too
    with torch.no_grad():
        learner.model(X[:2] + 1)  # a no-grad forward in between is not captured
    got = learner.penalty()
    layers = learner.layers()
    new = {t: layers[t].lora_B[SHARED].weight.detach().clone() for t in learner.shared_targets}
    with torch.no_grad():  # the teacher: the same model with the previous task's shared B
        for t in learner.shared_targets:
            layers[t].lora_B[SHARED].weight.copy_(learner.old_shared[t])
        teacher = learner.model(X)
        for t in learner.shared_targets:
            layers[t].lora_B[SHARED].weight.copy_(new[t])
        betas = learner.block_weights
        orth = block_orthogonality([betas["task0"]], betas["task1"])
    expected = 5.0 * logit_kd(student, teacher, 2.0) + 0.5 * orth
    assert float(orth) > 0.1
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_cllora_penalty_none_without_old_task_or_weights():
    learner = _cl()
    learner.begin_task()
    learner.model.train()
    learner.model(X)
    assert learner.penalty() is None  # task 0: no teacher, no earlier block weights
    off = _cl(kd_weight=0.0, orth_weight=0.0)
    cl_train(off)
    off.begin_task()
    assert off.penalty() is None  # before any forward
    off.model.train()
    off.model(X)
    assert off.penalty() is None
    early = _cl()
    early.begin_task()  # a first task without training steps (no penalty call yet)
    early.end_task()
    early.begin_task()
    p = early.penalty()  # task 1 before any forward: only the block-weight term
    assert p is not None and float(p) < 1e-3


def test_cllora_feature_kd_ignores_no_grad_forwards():
    learner = _cl(kd_target="features", orth_weight=0.0)
    learner.begin_task()  # a first task without training steps (no penalty call yet)
    perturb_shared(learner)
    learner.end_task()
    learner.begin_task()
    perturb_shared(learner)
    learner.model.train()
    learner.model(X)
    reference = float(learner.penalty())
    learner.model(X)
    with torch.no_grad():
        learner.model(X + 1)
    assert float(learner.penalty()) == pytest.approx(reference, rel=1e-6) and reference > 0


def test_cllora_sum_inference_activates_every_task():
    learner = _cl(inference="sum")
    cl_train(learner)
    learner.begin_task()
    assert learner.active_adapters() == [SHARED, "task0", "task1"]
    assert learner.layers()[learner.specific_targets[0]].active_adapters == ["task0", "task1"]


def test_cllora_file_round_trip_after_the_first_and_second_task(tmp_path):
    for tasks in (1, 2):
        learner = _cl()
        for _ in range(tasks):
            learner.begin_task()
            perturb_shared(learner)
            learner.end_task()
        learner.save(tmp_path / f"{tasks}.safetensors")
        fresh = _cl()
        fresh.load(tmp_path / f"{tasks}.safetensors")
        assert fresh.adapters == learner.adapters
        assert fresh.extra_state().keys() == learner.extra_state().keys()
    other = _cl(orth_weight=0.3)
    with pytest.raises(ValueError, match="was saved with config"):
        other.load(tmp_path / "2.safetensors")
    assert other.adapters == []  # nothing created for a file of another config


def test_cllora_per_task_heads_freeze_and_paths_repeat():
    model, head = with_head()
    torch.manual_seed(0)
    learner = make_learner("cllora", model, rank=2)
    for classes in TASKS[:2]:
        train_head_task(learner, head, classes, steps=1)
    assert not head.initial.weight.requires_grad
    assert not any(p.requires_grad for h in head.heads[:-1] for p in h.parameters())
    learner.model.eval()
    with torch.no_grad():
        first, second = learner.model(X), learner.model(x=X)
    assert torch.equal(first, second)
    bare = tiny()
    replace_module(bare, "head", PerTaskHead(16, 4))  # no initial head
    plain = make_learner("cllora", bare, rank=2)
    plain.model.head.add_task([0, 1])
    plain.begin_task()


def test_cllora_auto_inference_is_fixed_when_the_first_task_begins():
    learner = _cl()  # inference="auto", a plain linear head: "sum"
    learner.begin_task()
    assert learner.inference == "sum"
    replace_module(learner.model, "head", PerTaskHead(16, 4))  # a per-task head added later changes nothing
    assert learner.inference == "sum"
    model, _ = with_head()
    torch.manual_seed(0)
    paths = make_learner("cllora", model, rank=2)
    paths.begin_task()
    assert paths.inference == "paths"
    replace_module(paths.model, "head", nn.Linear(16, 4))
    assert paths.inference == "paths"
