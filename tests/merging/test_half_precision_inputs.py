"""bf16/fp16 inputs: merges and projections accumulate in fp32 (or better) and match float64 references."""

import pytest
import torch

from avalanche_merge.lora.subspace import DualGPM, project_rows
from avalanche_merge.merging import OPCM, TaskVector, average, magmax, opcm_project, task_arithmetic, ties


def _bf16_models(n_tasks: int = 8, seed: int = 0):
    """A bf16 'pretrained' state dict (values near 1, where bf16's step is 2**-7) and ``n_tasks`` fine-tuned ones
    whose changes are a few bf16 steps, with non-axis-aligned structure."""
    g = torch.Generator().manual_seed(seed)
    pre = {"w": (1.0 + 0.5 * torch.randn(48, 40, generator=g)).to(torch.bfloat16),
           "b": (1.0 + 0.5 * torch.randn(48, generator=g)).to(torch.bfloat16)}
    fine = []
    for _ in range(n_tasks):
        rot = torch.linalg.qr(torch.randn(40, 40, generator=g)).Q
        delta_w = 0.03 * torch.randn(48, 40, generator=g) @ rot
        fine.append({"w": (pre["w"].double() + delta_w).to(torch.bfloat16),
                     "b": (pre["b"].double() + 0.03 * torch.randn(48, generator=g)).to(torch.bfloat16)})
    return pre, fine


def _reference_diffs(pre, fine):
    return [{k: f[k].double() - pre[k].double() for k in pre} for f in fine]


def test_task_arithmetic_and_average_of_bf16_models_match_float64():
    pre, fine = _bf16_models()
    tvs = [TaskVector.from_models(pre, f) for f in fine]
    ref = _reference_diffs(pre, fine)
    summed, mean = task_arithmetic(tvs), average(tvs)
    for k in pre:
        want = sum(r[k] for r in ref)
        assert summed[k].dtype == torch.float32 and mean[k].dtype == torch.float32
        # fp32 accumulation: error ~1e-7 relative; a bf16 accumulator is off by ~1e-2 relative
        assert torch.allclose(summed[k].double(), want, rtol=0, atol=1e-6 * float(want.abs().max()))
        assert torch.allclose(mean[k].double(), want / len(ref), rtol=0, atol=1e-6 * float(want.abs().max()))
        bf16_sum = sum(f[k] - pre[k] for f in fine)  # what a bf16 accumulation would give
        assert (bf16_sum.double() - want).abs().max() > 100 * (summed[k].double() - want).abs().max()


def test_merged_bf16_model_is_the_rounded_fp32_merge():
    pre, fine = _bf16_models()
    merged = task_arithmetic([TaskVector.from_models(pre, f) for f in fine]).apply_to(pre, scaling=0.3)
    ref = _reference_diffs(pre, fine)
    for k in pre:
        want = (pre[k].double() + 0.3 * sum(r[k] for r in ref)).to(torch.bfloat16)
        assert merged[k].dtype == torch.bfloat16
        assert (merged[k].double() - want.double()).abs().max() <= 2 ** -7 * 4  # at most one bf16 step apart
        assert (merged[k] == want).float().mean() > 0.99


def test_magmax_and_ties_of_bf16_models_equal_their_fp32_twins():
    pre, fine = _bf16_models()
    bf16_tvs = [TaskVector.from_models(pre, f) for f in fine]
    fp32_tvs = [TaskVector.from_models({k: v.float() for k, v in pre.items()}, {k: v.float() for k, v in f.items()})
                for f in fine]
    for merge in (magmax, lambda t: ties(t, density=0.2)):
        got, want = merge(bf16_tvs), merge(fp32_tvs)
        for k in pre:
            assert got[k].dtype == torch.float32
            assert torch.equal(got[k], want[k])


def test_opcm_projection_of_bf16_weights_runs_in_fp32():
    g = torch.Generator().manual_seed(1)
    merged = torch.randn(32, 24, generator=g) @ torch.diag(torch.linspace(3, 0.1, 24))
    task = torch.randn(32, 24, generator=g)
    out = opcm_project(merged.to(torch.bfloat16), task.to(torch.bfloat16), 0.5)  # no half-precision SVD exists
    want = opcm_project(merged.to(torch.bfloat16).float(), task.to(torch.bfloat16).float(), 0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want.to(torch.bfloat16))


def test_opcm_merger_on_bf16_models_matches_its_fp32_twin():
    pre, fine = _bf16_models(n_tasks=3)
    half, full = OPCM(alpha=0.5), OPCM(alpha=0.5)
    for f in fine:
        half.update(TaskVector.from_models(pre, f))
        full.update(TaskVector.from_models({k: v.float() for k, v in pre.items()},
                                           {k: v.float() for k, v in f.items()}))
    for k in pre:
        assert half.merged[k].dtype == torch.float32
        assert torch.allclose(half.merged[k], full.merged[k], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_subspace_projections_of_half_gradients_are_computed_in_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=torch.float64)).Q
    grad = torch.randn(16, 40, generator=g).to(dtype)
    out = project_rows(grad, basis)
    assert out.dtype == dtype
    assert torch.equal(out, project_rows(grad.float(), basis).to(dtype))
    memory = DualGPM(40)
    memory.stored = basis
    x = torch.randn(40, 5, generator=g).to(dtype)
    assert torch.equal(memory.project_out(x), memory.project_out(x.float()).to(dtype))
