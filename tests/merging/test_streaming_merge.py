"""Streaming merges of safetensors checkpoints: identical to the in-memory merge, dtypes kept, errors."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from avalanche_merge.merging import OFFLINE_MERGES, TaskVector, merge_safetensors

SHAPES = {"a.weight": (12, 8), "a.bias": (12,), "b.weight": (6, 10), "c.scale": (10,), "d.weight": (4, 5)}
BF16 = ("c.scale", "d.weight")


def _state_dict(seed, base=None):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in SHAPES.items():
        noise = torch.randn(s, generator=g)
        sd[k] = noise if base is None else base[k].float() + 0.1 * noise
    for k in BF16:
        sd[k] = sd[k].to(torch.bfloat16)
    sd["n"] = torch.tensor(7 if base is None else 100 + seed, dtype=torch.int64)
    return sd


@pytest.fixture
def checkpoints(tmp_path):
    pre = _state_dict(0)
    fines = [_state_dict(s, base=pre) for s in (1, 2, 3)]
    pre_path = tmp_path / "pre.safetensors"
    save_file(pre, str(pre_path), metadata={"format": "pt", "origin": "test"})
    paths = []
    for i, sd in enumerate(fines):
        paths.append(tmp_path / f"fine{i}.safetensors")
        save_file(sd, str(paths[-1]))
    # reload so the in-memory reference sees exactly what was written
    return load_file(str(pre_path)), [load_file(str(p)) for p in paths], pre_path, paths


CASES = [
    ("task_arithmetic", {}),
    ("average", {}),
    ("ties", {"density": 0.4, "trim_scope": "tensor"}),
    ("dare", {"density": 0.5, "seed": 3}),
    ("dare", {"density": 0.5, "seed": 3, "combine": "ties"}),
    ("breadcrumbs", {"top_drop": 0.1, "bottom_drop": 0.5}),
    ("magmax", {}),
    ("tsv", {}),
    ("iso_c", {}),
    ("iso_cts", {"common_fraction": 0.8}),
]


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_streaming_equals_in_memory(checkpoints, tmp_path, name, options):
    pre_sd, fine_sds, pre_path, paths = checkpoints
    out = merge_safetensors(pre_path, paths, tmp_path / "out.safetensors", merge=name, options=dict(options),
                            scaling=0.5, progress=False)
    assert out == tmp_path / "out.safetensors"
    streamed = load_file(str(out))
    fn = OFFLINE_MERGES.get(name)
    ref = fn([TaskVector.from_state_dicts(pre_sd, f) for f in fine_sds], **options).apply_to(pre_sd, scaling=0.5)
    assert set(streamed) == set(ref) == set(pre_sd)
    for k, v in ref.items():
        assert streamed[k].dtype == pre_sd[k].dtype == v.dtype, k
        assert streamed[k].shape == pre_sd[k].shape, k
        assert torch.equal(streamed[k], v), k
    assert torch.equal(streamed["n"], pre_sd["n"])  # integer buffers come from the pretrained checkpoint
    assert not torch.equal(streamed["a.weight"], pre_sd["a.weight"])
    assert streamed["d.weight"].dtype == torch.bfloat16
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}


def test_streaming_accepts_a_merge_function_and_string_paths(checkpoints, tmp_path):
    pre_sd, fine_sds, pre_path, paths = checkpoints
    fn = OFFLINE_MERGES.get("task_arithmetic")
    out = merge_safetensors(str(pre_path), [str(p) for p in paths], str(tmp_path / "o.safetensors"), merge=fn,
                            progress=False)
    streamed = load_file(str(out))
    ref = fn([TaskVector.from_state_dicts(pre_sd, f) for f in fine_sds]).apply_to(pre_sd)
    for k in ref:
        assert torch.equal(streamed[k], ref[k]), k


def test_streaming_dare_depends_on_the_seed(checkpoints, tmp_path):
    _, _, pre_path, paths = checkpoints
    a = load_file(str(merge_safetensors(pre_path, paths, tmp_path / "a.safetensors", merge="dare",
                                        options={"density": 0.5, "seed": 3}, progress=False)))
    b = load_file(str(merge_safetensors(pre_path, paths, tmp_path / "b.safetensors", merge="dare",
                                        options={"density": 0.5, "seed": 4}, progress=False)))
    assert not torch.equal(a["a.weight"], b["a.weight"])


def test_missing_checkpoint_is_named(checkpoints, tmp_path):
    _, _, pre_path, paths = checkpoints
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        merge_safetensors(pre_path, [paths[0], missing], tmp_path / "o.safetensors", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        merge_safetensors(missing, paths, tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_mismatched_keys_are_named(checkpoints, tmp_path):
    pre_sd, fine_sds, pre_path, paths = checkpoints
    extra = dict(fine_sds[0])
    extra["z.extra"] = torch.ones(2)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="'z.extra'"):
        merge_safetensors(pre_path, [paths[0], tmp_path / "extra.safetensors"], tmp_path / "o.safetensors",
                          progress=False)
    fewer = {k: v for k, v in fine_sds[1].items() if k != "b.weight"}
    save_file(fewer, str(tmp_path / "fewer.safetensors"))
    with pytest.raises(ValueError, match="'b.weight'"):
        merge_safetensors(pre_path, [tmp_path / "fewer.safetensors"], tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_mismatched_shape_or_dtype_is_named(checkpoints, tmp_path):
    _, fine_sds, pre_path, _ = checkpoints
    reshaped = dict(fine_sds[0])
    reshaped["a.weight"] = torch.zeros(8, 12)
    save_file(reshaped, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(ValueError, match="'a.weight'"):
        merge_safetensors(pre_path, [tmp_path / "reshaped.safetensors"], tmp_path / "o.safetensors", progress=False)
    retyped = dict(fine_sds[0])
    retyped["a.bias"] = retyped["a.bias"].half()
    save_file(retyped, str(tmp_path / "retyped.safetensors"))
    with pytest.raises(ValueError, match="'a.bias'"):
        merge_safetensors(pre_path, [tmp_path / "retyped.safetensors"], tmp_path / "o.safetensors", progress=False)


def test_model_wide_trimming_is_refused(checkpoints, tmp_path):
    _, _, pre_path, paths = checkpoints
    with pytest.raises(ValueError, match="trim_scope"):
        merge_safetensors(pre_path, paths, tmp_path / "o.safetensors", merge="ties",
                          options={"trim_scope": "model"}, progress=False)


def test_empty_finetuned_list_is_refused(checkpoints, tmp_path):
    _, _, pre_path, _ = checkpoints
    with pytest.raises(ValueError, match="at least one"):
        merge_safetensors(pre_path, [], tmp_path / "o.safetensors", progress=False)


def test_unknown_merge_name_is_refused(checkpoints, tmp_path):
    _, _, pre_path, paths = checkpoints
    with pytest.raises(ValueError, match="'nope'"):
        merge_safetensors(pre_path, paths, tmp_path / "o.safetensors", merge="nope", progress=False)
