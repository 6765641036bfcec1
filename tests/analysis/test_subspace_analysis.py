"""Principal angles, update subspaces, overlap matrices of LoRA adapters, and their plots."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from avalanche_merge.analysis.subspace import (
    lora_overlap,
    lora_snapshot,
    lora_update_since,
    orthonormal_basis,
    overlap_matrix,
    principal_angles,
    subspace_overlap,
    update_subspace,
)
from avalanche_merge.analysis.subspace_plots import plot_interference, plot_overlap_matrix

E = np.eye(6)


def test_principal_angles_known_cases():
    np.testing.assert_allclose(principal_angles(E[:, :2], E[:, :2]), [0, 0], atol=1e-12)
    np.testing.assert_allclose(principal_angles(E[:, :2], E[:, 2:4]), [math.pi / 2] * 2, atol=1e-12)
    np.testing.assert_allclose(principal_angles(E[:, :1], E[:, :1] + E[:, 1:2]), [math.pi / 4], atol=1e-12)
    # ascending: one shared direction, one at 45 degrees
    np.testing.assert_allclose(principal_angles(E[:, :2], np.c_[E[:, 1], E[:, 0] + E[:, 2]]),
                               [0, math.pi / 4], atol=1e-12)
    # small angles come from the sines: arccos would lose them (cos = 1 - 5e-19 rounds to 1)
    np.testing.assert_allclose(principal_angles(E[:, :1], E[:, :1] + 1e-9 * E[:, 1:2]), [1e-9], rtol=1e-6)
    # different dimensions: min(p, q) angles; rank-deficient inputs use their numerical rank
    assert principal_angles(E[:, :3], E[:, :1]).shape == (1,)
    assert principal_angles(np.c_[E[:, 0], 2 * E[:, 0]], E[:, :3]).shape == (1,)
    assert principal_angles(np.zeros((6, 2)), E[:, :2]).shape == (0,)


def test_principal_angles_invariant_and_match_scipy():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(20, 3, generator=g), torch.randn(20, 4, generator=g)
    ref = principal_angles(U, V)
    assert np.all(np.diff(ref) >= 0) and np.all((ref >= 0) & (ref <= math.pi / 2))
    M = torch.randn(4, 4, generator=g) + 4 * torch.eye(4)  # invertible change of basis
    np.testing.assert_allclose(principal_angles(5 * U, V.double() @ M.double()), ref, atol=1e-10)
    np.testing.assert_allclose(principal_angles(V, U), ref, atol=1e-12)
    linalg = pytest.importorskip("scipy.linalg")
    np.testing.assert_allclose(ref, np.sort(linalg.subspace_angles(U.numpy(), V.numpy())), atol=1e-6)


def test_principal_angles_errors():
    with pytest.raises(ValueError, match="same number of rows"):
        principal_angles(np.ones((4, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="must be a matrix"):
        principal_angles(np.ones(4), np.ones((4, 2)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        principal_angles(np.full((4, 2), np.nan), np.ones((4, 2)))


def test_update_subspace_sides_rank_energy():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g)
    delta = B @ A  # float32, rank 3
    q_in, q_out = update_subspace(delta), update_subspace(delta, side="output")
    assert q_in.shape == (5, 3) and q_out.shape == (7, 3)
    torch.testing.assert_close(q_in.T @ q_in, torch.eye(3, dtype=torch.float64))
    np.testing.assert_allclose(principal_angles(q_in, A.T), 0, atol=1e-6)  # rows of A
    np.testing.assert_allclose(principal_angles(q_out, B), 0, atol=1e-6)  # columns of B
    assert update_subspace(delta, rank=2).shape == (5, 2)
    diag = torch.diag(torch.tensor([10.0, 1.0, 0.1]))
    assert update_subspace(diag, energy=0.95).shape[1] == 1
    assert update_subspace(diag, energy=0.999).shape[1] == 2
    assert update_subspace(diag, energy=1.0).shape[1] == 3
    assert update_subspace(torch.zeros(4, 3)).shape == (3, 0)
    assert orthonormal_basis(np.ones((4, 3))).shape == (4, 1)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        update_subspace(delta, rank=0)
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        update_subspace(delta, energy=1.5)
    with pytest.raises(ValueError, match="side must be one of"):
        update_subspace(delta, side="left")


def test_subspace_overlap_values_and_invariance():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(6, 2, generator=g), torch.randn(2, 6, generator=g)
    M = torch.tensor([[2.0, 1.0], [0.5, 3.0]])
    same = (B @ M) @ (torch.linalg.inv(M) @ A)  # same update, other factorisation
    assert subspace_overlap(B @ A, 3 * same) == pytest.approx(1.0)
    orth = torch.randn(6, 2, generator=g) @ torch.tensor(E[:, 2:4].T, dtype=torch.float32)
    assert subspace_overlap(torch.randn(6, 2) @ torch.tensor(E[:, :2].T, dtype=torch.float32), orth) == \
        pytest.approx(0.0, abs=1e-12)
    # 45 degrees between two lines: cos^2 = 1/2
    a, b = np.outer(E[:, 0], E[:, 0]), np.outer(E[:, 0], E[:, 0] + E[:, 1])
    assert subspace_overlap(a, b) == pytest.approx(0.5)
    assert subspace_overlap(a, b, side="output") == pytest.approx(1.0)  # same column e0
    assert math.isnan(subspace_overlap(a, np.zeros((6, 6))))
    with pytest.raises(ValueError, match="shape mismatch"):
        subspace_overlap(np.ones((6, 6)), np.ones((6, 5)))
    assert subspace_overlap(np.ones((6, 6)), np.ones((5, 6))) == pytest.approx(1.0)  # input sides agree


def test_overlap_matrix_symmetric_with_unit_diagonal():
    g = torch.Generator().manual_seed(3)
    tasks = [{"q": torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g),
              "v": torch.randn(8, 2, generator=g) @ torch.randn(2, 6, generator=g)} for _ in range(3)]
    tasks.append({"q": tasks[0]["q"] * -2})  # only one layer, same subspace as task 0
    M, per_layer = overlap_matrix(tasks)
    assert M.shape == (4, 4) and set(per_layer) == {"q", "v"}
    np.testing.assert_allclose(M, M.T)
    np.testing.assert_allclose(np.diag(M), 1.0)
    assert np.all((M >= 0) & (M <= 1))
    assert M[0, 3] == pytest.approx(1.0)  # mean over the common layer only
    assert math.isnan(per_layer["v"][0, 3])
    assert M[0, 1] == pytest.approx((per_layer["q"][0, 1] + per_layer["v"][0, 1]) / 2)
    assert per_layer["q"][0, 1] == pytest.approx(subspace_overlap(tasks[0]["q"], tasks[1]["q"]))
    M1, _ = overlap_matrix(tasks[:1])
    assert M1.tolist() == [[1.0]]
    with pytest.raises(ValueError, match="shape mismatch"):
        overlap_matrix([{"q": torch.ones(4, 4)}, {"q": torch.ones(4, 3)}])
    with pytest.raises(ValueError, match="share no layer"):
        overlap_matrix([{"q": torch.ones(4, 4)}, {"k": torch.ones(4, 4)}])
    with pytest.raises(ValueError, match="at least one task"):
        overlap_matrix([])
    with pytest.raises(ValueError, match="rank must be"):
        overlap_matrix(tasks, rank=-1)


def _tiny_lora(n_adapters=3, rank=2):
    from avalanche_merge.lora.adapters import add_adapter, resolve_targets
    from avalanche_merge.lora.config import LoRAConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    config = LoRAConfig(target_modules=("0",), train_head=False, rank=rank)
    targets = resolve_targets(model, config.target_modules)
    assert targets == ["0"]
    for i in range(n_adapters):
        add_adapter(model, f"task{i}", config, targets)
    return model


def test_lora_overlap_orthogonal_and_identical_adapters():
    model = _tiny_lora()
    layer = model[0]
    rows = torch.eye(8)
    with torch.no_grad():
        layer.lora_A["task0"].weight.copy_(rows[:2])
        layer.lora_A["task1"].weight.copy_(rows[2:4])  # orthogonal input subspace
        layer.lora_A["task2"].weight.copy_(torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [1, -1, 0, 0, 0, 0, 0, 0]]))
        # same input subspace as task0, other basis
    M, _ = lora_overlap(model, source="factors")
    np.testing.assert_allclose(M, [[1, 0, 1], [0, 1, 0], [1, 0, 1]], atol=1e-12)
    # peft initialises B to zero: delta W = 0 has no subspace yet
    assert np.isnan(lora_overlap(model)[0]).all()
    with torch.no_grad():
        for name in ("task0", "task1", "task2"):
            layer.lora_B[name].weight.copy_(torch.randn(8, 2))
    M, per_layer = lora_overlap(model)
    np.testing.assert_allclose(M, [[1, 0, 1], [0, 1, 0], [1, 0, 1]], atol=1e-6)
    assert set(per_layer) == {"0"}
    M_sub, _ = lora_overlap(model, adapters=["task2", "task0"])
    assert M_sub[0, 1] == pytest.approx(1.0)
    M_out, _ = lora_overlap(model, side="output", source="factors")
    assert M_out.shape == (3, 3) and np.all(np.diag(M_out) == 1.0)
    with pytest.raises(ValueError, match="unknown adapters"):
        lora_overlap(model, adapters=["nope"])
    with pytest.raises(ValueError, match="source must be"):
        lora_overlap(model, source="weights")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_overlap(nn.Linear(3, 3))


def test_lora_update_since_counts_only_changed_adapters():
    from avalanche_merge.lora.adapters import delta_weight

    model = _tiny_lora(2)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B["task0"].weight.normal_()
    before = delta_weight(layer, "task1").double()
    snap = lora_snapshot(model)
    assert lora_update_since(model, snap)["0"].abs().max() == 0  # nothing changed: exact zero
    with torch.no_grad():
        layer.lora_B["task1"].weight.normal_()
    update = lora_update_since(model, snap)
    assert update["0"].dtype == torch.float64 and update["0"].shape == (8, 8)
    torch.testing.assert_close(update["0"], layer.scaling["task1"] * (layer.lora_B["task1"].weight.double()
                                                                      @ layer.lora_A["task1"].weight.double())
                               - before)


def test_plots_write_png(tmp_path):
    M, _ = overlap_matrix([{"l": torch.randn(5, 2) @ torch.randn(2, 5)} for _ in range(3)])
    out = plot_overlap_matrix(M, tmp_path / "sub" / "overlap.png", labels=["a", "b", "c"], title="t")
    assert out == tmp_path / "sub" / "overlap.png" and out.stat().st_size > 1000
    interference = np.array([[np.nan, np.nan], [0.4, np.nan]])
    out = plot_interference(interference, str(tmp_path / "interference.png"))
    assert out.exists() and out.stat().st_size > 1000
    assert plot_interference(np.full((1, 1), np.nan), tmp_path / "one.png").exists()
    with pytest.raises(ValueError, match="square"):
        plot_overlap_matrix(np.ones((2, 3)), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="labels"):
        plot_interference(np.ones((2, 2)), tmp_path / "bad.png", labels=["a"])
