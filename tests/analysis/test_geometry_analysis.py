"""Parameter-space geometry of sequential training (``analysis.geometry``), checked against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from avalanche_merge.analysis.geometry import (
    cosine_matrix,
    effective_rank,
    effective_state,
    geometry_report,
    layer_norms,
    matrix_names,
    shared_names,
    sign_conflict_matrix,
    sign_conflict_rate,
    task_vectors,
    update_angles,
)
from avalanche_merge.lora.adapters import activate, add_adapter, resolve_targets
from avalanche_merge.lora.config import LoRAConfig
from avalanche_merge.merging.task_vector import TaskVector
from avalanche_merge.models.vit import TinyViT, TinyViTConfig


def tv(*values, name: str = "w") -> TaskVector:
    return TaskVector({name: torch.tensor(values, dtype=torch.float32)})


def tvs_of(**tensors) -> TaskVector:
    return TaskVector({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


def _tiny_vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(TinyViTConfig(dim=16, depth=3, heads=2))


# cosine ----------------------------------------------------------------------------------------------------------


def test_cosine_matrix_known_cases():
    v = tv(1.0, -2.0, 3.0, 0.5)
    np.testing.assert_allclose(cosine_matrix([v, v, v]), np.ones((3, 3)), atol=1e-6)
    np.testing.assert_allclose(cosine_matrix([v, -v]), [[1, -1], [-1, 1]], atol=1e-6)
    np.testing.assert_allclose(cosine_matrix([tv(1, 0, 2, 0), tv(0, 3, 0, -1)]), np.eye(2), atol=1e-7)
    # 45 degrees, and scaling does not matter
    np.testing.assert_allclose(cosine_matrix([tv(1, 0), tv(5, 5)])[0, 1], math.sqrt(0.5), atol=1e-6)
    # a zero vector has cosine 0 with everything (its own diagonal included)
    m = cosine_matrix([v, tv(0, 0, 0, 0), 2 * v])
    np.testing.assert_allclose(m, [[1, 0, 1], [0, 0, 0], [1, 0, 1]], atol=1e-6)
    assert m.dtype == np.float64


def test_cosine_matrix_flattens_over_all_tensors():
    a = tvs_of(x=[1.0, 0.0], y=[[0.0, 1.0]])
    b = tvs_of(x=[1.0, 0.0], y=[[0.0, -1.0]])
    # a = (1, 0, 0, 1), b = (1, 0, 0, -1): orthogonal over the whole vector although x alone is parallel
    np.testing.assert_allclose(cosine_matrix([a, b])[0, 1], 0.0, atol=1e-7)


# task vectors ----------------------------------------------------------------------------------------------------


def _snapshots(seed: int = 0, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    s = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}]
    for _ in range(n - 1):
        s.append({k: v + torch.randn(v.shape, generator=g) for k, v in s[-1].items()})
    return s


def test_task_vectors_steps_sum_to_cumulative():
    snaps = _snapshots()
    steps, cumulative = task_vectors(snaps)
    assert len(steps) == len(cumulative) == 3
    for i in range(3):
        for name in ("a", "b"):
            torch.testing.assert_close(steps[i][name], snaps[i + 1][name] - snaps[i][name])
            torch.testing.assert_close(cumulative[i][name], snaps[i + 1][name] - snaps[0][name])
            total = sum(s[name] for s in steps[: i + 1])
            torch.testing.assert_close(total, cumulative[i][name], rtol=1e-5, atol=1e-5)
    assert layer_norms(steps[0]) == pytest.approx(
        {n: float((snaps[1][n] - snaps[0][n]).norm()) for n in ("a", "b")}, rel=1e-6)


def test_identical_snapshots_give_zero_task_vectors():
    snap = _snapshots(n=1)[0]
    steps, cumulative = task_vectors([snap, {k: v.clone() for k, v in snap.items()}])
    assert layer_norms(steps[0]) == {"a": 0.0, "b": 0.0}
    assert cumulative[0].norm() == 0.0


def test_shared_names_exclude_changed_shapes_missing_names_and_integers():
    s0 = {"w": torch.zeros(2, 3), "head": torch.zeros(2, 4), "gone": torch.zeros(3), "steps": torch.tensor(3),
          "b": torch.zeros(4)}
    s1 = {"b": torch.ones(4), "head": torch.zeros(3, 4), "w": torch.ones(2, 3), "steps": torch.tensor(5)}
    s2 = {"b": 2 * torch.ones(4), "head": torch.zeros(3, 4), "w": 3 * torch.ones(2, 3), "gone": torch.ones(3),
          "steps": torch.tensor(9)}
    assert shared_names([s0, s1, s2]) == ["w", "b"]  # the first snapshot's order
    steps, cumulative = task_vectors([s0, s1, s2])
    assert steps[0].keys() == ["w", "b"]
    torch.testing.assert_close(steps[1]["w"], 2 * torch.ones(2, 3))
    torch.testing.assert_close(cumulative[1]["b"], 2 * torch.ones(4))


def test_task_vectors_errors():
    snap = _snapshots(n=1)[0]
    with pytest.raises(ValueError, match="at least two"):
        task_vectors([snap])
    with pytest.raises(ValueError, match="at least two"):
        task_vectors([])
    with pytest.raises(ValueError, match="share no"):
        task_vectors([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}])


# sign conflicts --------------------------------------------------------------------------------------------------


def test_sign_conflict_matrix_by_hand():
    a, b, c = tv(1, -1, 0, 2), tv(1, 1, 3, -1), tv(0, 0, 5, 0)
    m = sign_conflict_matrix([a, b, c])
    # a, b both non-zero at 0, 1, 3; signs differ at 1 and 3 -> 2/3
    assert m[0, 1] == pytest.approx(2 / 3) and m[1, 0] == pytest.approx(2 / 3)
    # a, c share no non-zero entry
    assert math.isnan(m[0, 2]) and math.isnan(m[2, 0])
    # b, c both non-zero at 2 only, same sign
    assert m[1, 2] == 0.0
    np.testing.assert_array_equal(np.diag(m), [0.0, 0.0, 0.0])


def test_sign_conflict_matrix_pools_counts_over_tensors():
    # x: one shared entry, in conflict; y: three shared entries, none in conflict -> 1/4 (not mean(1, 0) = 0.5)
    a = tvs_of(x=[1.0], y=[1.0, 2.0, 3.0])
    b = tvs_of(x=[-1.0], y=[1.0, 1.0, 1.0])
    assert sign_conflict_matrix([a, b])[0, 1] == pytest.approx(0.25)
    assert sign_conflict_rate([a, b]) == pytest.approx(0.25)


def test_sign_conflict_rate_by_hand():
    a = tv(1, -1, 0, 2, 0, -1)
    b = tv(1, 1, 3, 1, 0, -2)
    c = tv(2, 0, -1, 0, 4, -3)
    # idx 0: +,+,+ shared, unanimous   idx 1: -,+ conflict   idx 2: +,- conflict
    # idx 3: +,+ unanimous             idx 4: one non-zero: not counted   idx 5: -,-,- unanimous
    assert sign_conflict_rate([a, b, c]) == pytest.approx(2 / 5)
    # two vectors: matches the pairwise matrix
    assert sign_conflict_rate([a, b]) == pytest.approx(sign_conflict_matrix([a, b])[0, 1])
    assert math.isnan(sign_conflict_rate([tv(1, 0), tv(0, 1)]))
    assert math.isnan(sign_conflict_rate([tv(1, 0)]))


def test_density_trims_each_tensor_to_its_top_magnitudes():
    # Per tensor, density 0.5 keeps one entry of two: w1 keeps the 100s, w2 keeps the 1s -> no conflict left.
    # A model-wide trim would instead keep w1 = (100, -50) / (100, 50) and its conflict (rate 1/2).
    a = tvs_of(w1=[100.0, -50.0], w2=[1.0, 0.5])
    b = tvs_of(w1=[100.0, 50.0], w2=[1.0, 0.5])
    assert sign_conflict_rate([a, b]) == pytest.approx(0.25)
    assert sign_conflict_matrix([a, b])[0, 1] == pytest.approx(0.25)
    assert sign_conflict_rate([a, b], density=0.5) == 0.0
    assert sign_conflict_matrix([a, b], density=0.5)[0, 1] == 0.0
    # the small conflicting entries are what trimming removes
    a, b = tv(4, -0.1, 3, 0), tv(2, 0.2, 0, 5)
    assert sign_conflict_matrix([a, b])[0, 1] == pytest.approx(0.5)
    assert sign_conflict_matrix([a, b], density=0.5)[0, 1] == 0.0
    assert sign_conflict_matrix([a, b], density=1.0)[0, 1] == pytest.approx(0.5)


def test_density_is_validated():
    a, b = tv(1, 2), tv(2, 1)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="density"):
            sign_conflict_matrix([a, b], density=bad)
        with pytest.raises(ValueError, match="density"):
            sign_conflict_rate([a, b], density=bad)


# effective rank --------------------------------------------------------------------------------------------------


def test_effective_rank_known_cases():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    assert effective_rank(torch.outer(u, v)) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(torch.outer(u, v).float()) == pytest.approx(1.0, abs=1e-5)
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0, abs=1e-10)
    assert effective_rank(np.eye(3)) == pytest.approx(3.0, abs=1e-10)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    # singular values (3, 1): p = (3/4, 1/4), exp(-(3/4 ln 3/4 + 1/4 ln 1/4))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(expected, rel=1e-6)
    # a conv kernel is flattened to out x (in * kh * kw)
    assert effective_rank(torch.eye(4).reshape(4, 1, 2, 2)) == pytest.approx(4.0, abs=1e-10)
    with pytest.raises(ValueError, match="matrix"):
        effective_rank(torch.ones(5))


def test_matrix_names():
    t = TaskVector({"w": torch.ones(2, 2), "b": torch.ones(2), "row": torch.ones(1, 3), "col": torch.ones(2, 1),
                    "conv": torch.ones(3, 2, 2, 2), "tok": torch.ones(1, 5, 4)})
    assert matrix_names(t) == ["w", "conv"]  # vectors, single rows / columns and (1, N, D) embeddings left out


# principal angles between updates --------------------------------------------------------------------------------


def test_update_angles_same_and_orthogonal_row_spaces():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 8, generator=g)
    same1 = TaskVector({"w": torch.randn(5, 2, generator=g) @ a})
    same2 = TaskVector({"w": torch.randn(5, 2, generator=g) @ a})
    e = torch.eye(8)
    ortho = TaskVector({"w": torch.randn(5, 2, generator=g) @ e[2:4]})
    other = TaskVector({"w": torch.randn(5, 2, generator=g) @ e[4:6]})
    zero = TaskVector({"w": torch.zeros(5, 8)})
    first = TaskVector({"w": torch.randn(5, 2, generator=g) @ e[:2]})
    m = update_angles([same1, same2, zero], "w", energy=1.0)
    assert m[0, 1] == pytest.approx(0.0, abs=1e-4) and m[1, 0] == pytest.approx(0.0, abs=1e-4)
    assert m[0, 0] == pytest.approx(0.0, abs=1e-4)
    assert np.isnan(m[2]).all() and np.isnan(m[:, 2]).all()
    m = update_angles([first, ortho, other], "w", energy=1.0)
    np.testing.assert_allclose(m[~np.eye(3, dtype=bool)], 90.0, atol=1e-4)


def test_update_angles_at_45_degrees_and_energy_truncation():
    e = torch.eye(4)
    x = TaskVector({"w": torch.outer(torch.tensor([1.0, 2.0, 3.0]), e[0])})
    y = TaskVector({"w": torch.outer(torch.tensor([2.0, -1.0, 1.0]), e[0] + e[1])})
    assert update_angles([x, y], "w")[0, 1] == pytest.approx(45.0, abs=1e-4)
    # z: a strong direction e0 and a weak one e2; energy 0.9 keeps only e0 -> 0 degrees to x, full -> mean(0, 90)
    z = TaskVector({"w": 10 * torch.outer(torch.tensor([1.0, 0.0, 0.0]), e[0])
                    + torch.outer(torch.tensor([0.0, 1.0, 0.0]), e[2])})
    assert update_angles([x, z], "w", energy=0.9)[0, 1] == pytest.approx(0.0, abs=1e-4)
    # x has one direction: one principal angle, 0 (x's row space lies in z's)
    assert update_angles([x, z], "w", energy=1.0)[0, 1] == pytest.approx(0.0, abs=1e-4)
    w = TaskVector({"w": torch.outer(torch.tensor([1.0, 0.0, 0.0]), e[0])
                    + torch.outer(torch.tensor([0.0, 1.0, 0.0]), e[2])})
    v = TaskVector({"w": torch.outer(torch.tensor([1.0, 0.0, 0.0]), e[0])
                    + torch.outer(torch.tensor([0.0, 1.0, 0.0]), e[3])})
    assert update_angles([w, v], "w", energy=1.0)[0, 1] == pytest.approx(45.0, abs=1e-4)  # angles (0, 90)


# geometry report -------------------------------------------------------------------------------------------------


def test_geometry_report_on_perturbed_tiny_vit():
    model = _tiny_vit()
    g = torch.Generator().manual_seed(2)
    params = dict(model.named_parameters())
    d1 = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    d3 = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    deltas = [d1, {n: -0.5 * d for n, d in d1.items()}, d3]  # step 2 undoes half of step 1
    snaps = [effective_state(model)]
    for delta in deltas:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(delta[n])
        snaps.append(effective_state(model))

    report = geometry_report(snaps, density=0.2, energy=0.9)
    keys = {"names", "matrices", "density", "energy", "step_norms", "cumulative_norms", "step_total_norm",
            "cumulative_total_norm", "step_cosine", "cumulative_cosine", "step_sign_conflict", "sign_conflict_rate",
            "effective_rank", "angles", "mean_step_cosine", "mean_sign_conflict", "mean_angle",
            "mean_effective_rank"}
    assert keys <= set(report)
    names, mats = report["names"], report["matrices"]
    assert names == list(params) and "blocks.0.attn.q.weight" in mats and "patch_embed.weight" in mats
    assert "blocks.0.attn.q.bias" not in mats and "cls_token" not in mats
    t = 3
    for key in ("step_cosine", "cumulative_cosine", "step_sign_conflict"):
        assert np.asarray(report[key], dtype=float).shape == (t, t)
    assert np.asarray(report["step_norms"]).shape == (t, len(names))
    assert np.asarray(report["cumulative_norms"]).shape == (t, len(names))
    assert np.asarray(report["effective_rank"]).shape == (t, len(mats))
    assert set(report["angles"]) == set(mats)
    assert all(np.asarray(a, dtype=float).shape == (t, t) for a in report["angles"].values())

    cos = np.asarray(report["step_cosine"])
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-5)
    assert cos[0, 1] == pytest.approx(-1.0, abs=1e-4)
    assert abs(cos[0, 2]) < 0.1  # independent random directions in ~10k dimensions
    ccos = np.asarray(report["cumulative_cosine"])
    assert ccos[0, 1] == pytest.approx(1.0, abs=1e-4)  # theta_2 - theta_0 = 0.5 * d1
    expected = [math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values())) for delta in deltas]
    np.testing.assert_allclose(report["step_total_norm"], expected, rtol=1e-4)
    assert report["cumulative_total_norm"][1] == pytest.approx(0.5 * expected[0], rel=1e-4)
    i = names.index("head.weight")
    assert report["step_norms"][0][i] == pytest.approx(float(d1["head.weight"].norm()), rel=1e-4)
    # opposite steps: every entry kept in both disagrees; independent ones: about half
    sign = np.asarray(report["step_sign_conflict"], dtype=float)
    assert sign[0, 1] == 1.0 and np.all(np.diag(sign) == 0.0)
    assert 0.3 < sign[0, 2] < 0.7
    assert report["mean_sign_conflict"] == pytest.approx((sign[0, 1] + sign[0, 2] + sign[1, 2]) / 3)
    steps, _ = task_vectors(snaps)
    assert report["sign_conflict_rate"] == pytest.approx(sign_conflict_rate(steps, density=0.2))
    j = mats.index("blocks.1.fc1.weight")
    assert report["effective_rank"][2][j] == pytest.approx(effective_rank(steps[2]["blocks.1.fc1.weight"]))
    assert report["effective_rank"][0][j] == pytest.approx(report["effective_rank"][1][j], rel=1e-4)
    angles = np.asarray(report["angles"]["blocks.0.attn.q.weight"], dtype=float)
    assert angles[0, 1] == pytest.approx(0.0, abs=0.5)  # same update up to scale: same subspace
    assert angles[0, 2] > 20.0
    assert report["mean_step_cosine"] == pytest.approx((cos[0, 1] + cos[0, 2] + cos[1, 2]) / 3, abs=1e-6)
    json.dumps(report, allow_nan=False)  # every value finite here, so strict JSON works


def test_geometry_report_with_a_zero_step_is_json_ready():
    snaps = _snapshots(n=3)
    snaps.insert(1, {k: v.clone() for k, v in snaps[0].items()})  # experience 1 changed nothing
    report = geometry_report(snaps, density=None)
    assert report["step_norms"][0] == [0.0, 0.0]
    assert report["step_total_norm"][0] == 0.0
    assert report["step_cosine"][0] == [0.0, 0.0, 0.0]
    assert report["step_sign_conflict"][0][1] is None  # nan -> None in the lists
    assert report["angles"]["a"][0] == [None, None, None]
    assert report["effective_rank"][0] == [0.0]
    text = json.dumps({k: v for k, v in report.items() if isinstance(v, (list, dict))}, allow_nan=False)
    assert "NaN" not in text


# effective state with LoRA ---------------------------------------------------------------------------------------


def _with_lora(rank: int = 2, alpha: float = 4.0, names=("t0",)) -> tuple[TinyViT, dict[str, torch.Tensor]]:
    model = _tiny_vit()
    before = effective_state(model)
    targets = resolve_targets(model, ["q", "fc1"])
    g = torch.Generator().manual_seed(7)
    for name in names:
        add_adapter(model, name, LoRAConfig(rank=rank, alpha=alpha), targets)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return model, before


def test_effective_state_of_a_plain_model():
    model = _tiny_vit()
    state = effective_state(model)
    assert list(state) == list(model.state_dict())
    for n, p in model.state_dict().items():
        assert torch.equal(state[n], p) and state[n].dtype == torch.float32
    state["head.weight"].add_(1.0)  # a copy: the model is untouched
    assert not torch.equal(state["head.weight"], model.head.weight.detach())
    half = _tiny_vit().to(torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in effective_state(half).values())
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    assert list(effective_state(bn)) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                         "1.running_var"]  # float buffers kept, num_batches_tracked not


def test_effective_state_folds_lora_into_base_names():
    model, before = _with_lora()
    layer = model.blocks[0].attn.q
    a, b = layer.lora_A["t0"].weight.detach(), layer.lora_B["t0"].weight.detach()
    assert layer.scaling["t0"] == pytest.approx(2.0)
    state = effective_state(model)
    assert set(state) == set(before)
    assert not [k for k in state if "lora_" in k or "base_layer" in k]
    expected = before["blocks.0.attn.q.weight"] + 2.0 * b @ a
    assert not torch.allclose(expected, before["blocks.0.attn.q.weight"])
    torch.testing.assert_close(state["blocks.0.attn.q.weight"], expected)
    torch.testing.assert_close(state["blocks.0.attn.q.bias"], before["blocks.0.attn.q.bias"])
    torch.testing.assert_close(state["blocks.0.attn.k.weight"], before["blocks.0.attn.k.weight"])
    # the effective weights compute what the LoRA model computes
    plain = TinyViT(TinyViTConfig(dim=16, depth=3, heads=2))
    plain.load_state_dict(state)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)
    # task vectors of LoRA training compare with full fine-tuning over the same names
    steps, _ = task_vectors([before, state])
    torch.testing.assert_close(steps[0]["blocks.2.fc1.weight"], 2.0 * model.blocks[2].fc1.lora_B["t0"].weight
                               @ model.blocks[2].fc1.lora_A["t0"].weight, rtol=1e-4, atol=1e-5)
    assert steps[0].norms()["blocks.0.attn.k.weight"] == 0.0


def test_effective_state_active_merged_and_disabled_adapters():
    model, before = _with_lora(names=("t0", "t1"))
    layer = model.blocks[1].attn.q
    d = {n: layer.scaling[n] * layer.lora_B[n].weight.detach() @ layer.lora_A[n].weight.detach()
         for n in ("t0", "t1")}
    base = before["blocks.1.attn.q.weight"]
    activate(model, ["t0", "t1"])
    torch.testing.assert_close(effective_state(model)["blocks.1.attn.q.weight"], base + d["t0"] + d["t1"])
    activate(model, ["t1"])
    torch.testing.assert_close(effective_state(model)["blocks.1.attn.q.weight"], base + d["t1"])
    layer.enable_adapters(False)
    torch.testing.assert_close(effective_state(model)["blocks.1.attn.q.weight"], base)
    layer.enable_adapters(True)
    activate(model, ["t0"])
    layer.merge(adapter_names=["t0"])  # delta now in the base weight: not added twice
    assert layer.merged
    torch.testing.assert_close(effective_state(model)["blocks.1.attn.q.weight"], base + d["t0"],
                               rtol=1e-5, atol=1e-6)
