"""The merging API never writes a silently wrong result (part of issue 15): non-finite scalings and weights,
fp16 overflow, changed non-floating tensors and empty checkpoint files are refused with the name of the culprit."""

import pytest
import torch
from safetensors.torch import save_file

from avalanche_merge.merging import TaskVector, merge_safetensors, task_arithmetic


def state(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g).to(dtype), "b": torch.randn(4, generator=g).to(dtype)}


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), float("-inf")])
def test_apply_to_refuses_a_non_finite_scaling(scaling):
    tv = TaskVector.from_models(state(0), state(1))
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        tv.apply_to(state(0), scaling=scaling)
    with pytest.raises(TypeError, match="scaling must be a number"):
        tv.apply_to(state(0), scaling="1")


def test_task_arithmetic_refuses_non_finite_weights():
    tvs = [TaskVector.from_models(state(0), state(s)) for s in (1, 2)]
    with pytest.raises(ValueError, match=r"weights\[0\] must be a finite number, got nan"):
        task_arithmetic(tvs, weights=[float("nan"), 1.0])


def test_fp16_overflow_is_refused_with_the_parameter_named():
    pre = state(0, torch.float16)
    fine = {k: v.clone() for k, v in pre.items()}
    fine["w"][0, 0] = 60000.0  # representable in fp16 (max 65504); twice the change is not
    tv = TaskVector.from_models(pre, fine)
    ok = tv.apply_to(pre, scaling=1.0)
    assert ok["w"].dtype == torch.float16 and torch.isfinite(ok["w"]).all()
    with pytest.raises(ValueError, match=r"parameter 'w': the merged weights reach .* beyond the range of "
                                         r"torch.float16"):
        tv.apply_to(pre, scaling=2.0)


def test_merge_safetensors_refuses_nan_scaling_changed_integer_tensors_and_empty_files(tmp_path):
    pre, fine = state(0), state(1)
    pre["q"] = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)  # an int8 weight
    pre["num_batches_tracked"] = torch.tensor(10)
    fine["q"] = pre["q"].clone()
    fine["num_batches_tracked"] = torch.tensor(25)  # a counter: keeps the pretrained value
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(fine, str(tmp_path / "fine.safetensors"))
    out = merge_safetensors(tmp_path / "pre.safetensors", [tmp_path / "fine.safetensors"], tmp_path / "out.safetensors")
    from safetensors.torch import load_file

    merged = load_file(str(out))
    assert torch.equal(merged["q"], pre["q"]) and int(merged["num_batches_tracked"]) == 10
    assert torch.allclose(merged["w"], fine["w"])
    with pytest.raises(ValueError, match="scaling must be a finite number, got nan"):
        merge_safetensors(tmp_path / "pre.safetensors", [tmp_path / "fine.safetensors"], tmp_path / "x.safetensors",
                          scaling=float("nan"))
    fine["q"] = torch.tensor([[1, -2], [3, 5]], dtype=torch.int8)
    save_file(fine, str(tmp_path / "fine2.safetensors"))
    with pytest.raises(ValueError, match=r"parameter 'q' \(torch.int8\) differs between the pretrained file and"):
        merge_safetensors(tmp_path / "pre.safetensors", [tmp_path / "fine2.safetensors"], tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match="holds no tensors: nothing to merge"):
        merge_safetensors(tmp_path / "empty.safetensors", [tmp_path / "empty.safetensors"], tmp_path / "z.safetensors")


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    good, bad = tmp_path / "pre.safetensors", tmp_path / "truncated.safetensors"
    save_file({"w": torch.ones(4)}, str(good))
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: not a readable safetensors file"):
        merge_safetensors(good, [bad], tmp_path / "out.safetensors", progress=False)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing\.safetensors"):
        merge_safetensors(good, [tmp_path / "missing.safetensors"], tmp_path / "out.safetensors", progress=False)
    assert not (tmp_path / "out.safetensors").exists()
