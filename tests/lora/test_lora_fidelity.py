"""Issue 13: InfLoRA and GPM as their authors run them (energy on the squared spectrum, the schedule taken from
the stream and indexed by the task just trained, memory from the trained model's inputs, GPM's constraint after
every optimizer step). Each test fails on a plausible wrong implementation named in its docstring."""

import pytest
import torch
import torch.nn.functional as F
from test_inflora_gpm import MLP, D, projector, task_data

from avalanche_merge.lora import make_learner
from avalanche_merge.lora.inflora import InfLoRAConfig, energy_matrix
from avalanche_merge.lora.subspace import DualGPM, collect_covariances, directions_needed, project_rows


def spectrum_cov(values, seed=0):
    q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T, q


def test_squared_energy_counts_on_squared_eigenvalues():
    """Wrong: the code's criterion computed on the eigenvalues (the issue's 4-6x more frozen directions)."""
    values = [4.0, 2.0, 1.2, 1.0] + [0.25] * 12  # eigenvalues sum 11.2; squares sum 23.19
    cov, q = spectrum_cov(values)
    squared, plain = DualGPM(D), DualGPM(D)
    squared.update(energy_matrix(cov, "squared"), 0.9)
    plain.update(energy_matrix(cov, "eigenvalues"), 0.9)
    # squares: 16, 4, 1.44, 1, 1/16 x 12 -> 16 + 4 = 20 < 0.9 * 23.19 = 20.871 <= 21.44: 3 directions
    # eigenvalues: 4 + 2 + 1.2 + 1 = 8.2, + 0.25 x 7 = 9.95 < 10.08 <= 10.2: 4 + 8 = 12 directions
    assert squared.rank == 3 and plain.rank == 12
    assert torch.allclose(projector(squared.basis()), projector(q[:, :3]), atol=1e-8)
    s = torch.tensor(values, dtype=torch.float64)
    assert directions_needed(s ** 2, 0.9 * float((s ** 2).sum()), float((s ** 2).sum())) == 3


def test_energy_matrix_is_the_square_of_the_symmetrised_covariance():
    cov, _ = spectrum_cov([3.0, 1.0] + [0.5] * 14, seed=2)
    bent = cov + 1e-3 * torch.triu(torch.ones(D, D, dtype=torch.float64), 1)  # asymmetric rounding
    sym = (bent + bent.T) / 2
    assert torch.allclose(energy_matrix(bent, "squared"), sym @ sym)
    assert torch.allclose(energy_matrix(bent, "eigenvalues"), sym)
    with pytest.raises(ValueError, match="energy must be one of"):
        energy_matrix(cov, "cubed")


def run_inflora(tasks, **options):
    torch.manual_seed(0)
    learner = make_learner("inflora", MLP(), rank=4, target_modules=("fc1", "fc2"), **options)
    return learner


def test_schedule_uses_the_index_of_the_task_just_trained(monkeypatch):
    """Wrong: ``task + 1`` (or the number of tasks so far) in ``lamb + (lame - lamb) t / T``."""
    seen = []
    original = DualGPM.update

    def spy(self, cov, threshold):
        seen.append(threshold)
        return original(self, cov, threshold)

    monkeypatch.setattr(DualGPM, "update", spy)
    learner = run_inflora(3, threshold=0.9, threshold_end=1.0)
    learner.set_stream_length(4)
    for t in range(3):
        x, _ = task_data(t % 2, seed=t)
        learner.begin_task([x])
        learner.end_task([x])
    per_task = seen[::2]  # two target layers per task
    assert per_task == pytest.approx([0.9, 0.925, 0.95], abs=1e-12)


def test_total_tasks_from_the_stream_and_errors():
    """Wrong: ``total_tasks`` defaulting to 10 (a 5-task run would end its schedule at 0.97)."""
    learner = run_inflora(1, threshold=0.95, threshold_end=1.0)
    assert learner.total_tasks is None
    with pytest.raises(ValueError, match="needs total_tasks"):
        learner.threshold(0)
    learner.set_stream_length(5)
    assert learner.threshold(4) == pytest.approx(0.99)
    fixed = run_inflora(1, total_tasks=3)
    with pytest.raises(ValueError, match="total_tasks=3 is smaller than the stream's 5 experiences"):
        fixed.set_stream_length(5)
    fixed.set_stream_length(2)  # a longer schedule than the stream is allowed
    assert fixed.total_tasks == 3
    x, _ = task_data(0)
    for _ in range(3):
        fixed.begin_task([x])
        fixed.end_task([x])
    with pytest.raises(ValueError, match="task 3 is beyond total_tasks=3"):
        fixed.begin_task([x])
    with pytest.raises(ValueError, match="energy must be one of"):
        InfLoRAConfig(energy="cubed")
    with pytest.raises(ValueError, match=r"a_scale must be in \(0.0, inf\]"):
        InfLoRAConfig(a_scale=0.0)


def test_defaults_are_the_authors_config():
    cfg = InfLoRAConfig()
    assert (cfg.rank, cfg.target_modules, cfg.lr, cfg.threshold, cfg.threshold_end, cfg.energy) == (
        10, ("k", "v"), 5e-4, 0.95, 1.0, "squared")
    assert cfg.a_scale == pytest.approx(3 ** -0.5)


def test_memory_is_built_from_the_trained_models_inputs():
    """Wrong: the memory built from covariances collected before training (stale inputs of later layers)."""
    learner = run_inflora(1, total_tasks=2, threshold=0.97)
    x, y = task_data(0)
    params = learner.begin_task([x])
    before = collect_covariances(learner.model, ["fc2"], [x])["fc2"]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(learner.model(x), y).backward()
        opt.step()
    after = collect_covariances(learner.model, ["fc2"], [x])["fc2"]
    assert (after - before).norm() > 1e-3 * before.norm()  # fc1's adapter moved fc2's inputs
    learner.end_task([x])
    expected = DualGPM(D)
    expected.update(energy_matrix(after, "squared"), 0.95)
    assert torch.allclose(projector(learner.memory["fc2"].basis()), projector(expected.basis()), atol=1e-8)


@pytest.mark.parametrize("method", ["gpm_lora", "gpm"])
def test_gpm_constraint_holds_after_every_adam_step(method):
    """Wrong: re-projecting only before the next step (the model between steps leaks into old subspaces)."""
    torch.manual_seed(0)
    model = MLP()
    learner = make_learner(method, model, rank=4, target_modules=("fc1",), threshold=0.99)
    x0, y0 = task_data(0)
    opt = torch.optim.Adam(learner.begin_task([x0]), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x0), y0).backward()
        learner.after_backward()
        opt.step()
        learner.after_step()
    learner.end_task([x0])
    basis = learner.bases["fc1"].float()
    x1, y1 = task_data(1)
    params = learner.begin_task([x1])
    start = model.fc1.weight.detach().clone() if method == "gpm" else None
    opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.1)
    worst = 0.0
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        learner.after_backward()
        opt.step()
        learner.after_step()
        constrained = (model.fc1.weight - start if method == "gpm"
                       else model.fc1.lora_A["task1"].weight).detach()
        assert constrained.norm() > 0
        worst = max(worst, float((constrained @ basis).norm() / constrained.norm()))
    assert worst < 1e-5
    # and the unconstrained part keeps training: the projection is not a zeroing
    assert float(project_rows(constrained, basis).norm()) > 0.5 * float(constrained.norm())


def per_task_vit():
    from avalanche_merge.models.vit import TinyViT, TinyViTConfig
    from avalanche_merge.protocol import PerTaskHead, replace_module

    torch.manual_seed(0)
    model = TinyViT(TinyViTConfig(dim=16, depth=1, heads=2, num_classes=4))
    replace_module(model, "head", PerTaskHead(16, 4, initial=model.head))
    return model


def test_learner_with_a_per_task_head_trains_only_the_current_head_and_round_trips(tmp_path):
    """Wrong: the learner re-enabling every head (old tasks' heads and the replaced one move again), or a save
    that cannot hold the per-task head's task list."""
    model = per_task_vit()
    learner = make_learner("inflora", model, total_tasks=2, rank=2)
    g = torch.Generator().manual_seed(1)
    for task, classes in enumerate(([0, 1], [2, 3])):
        model.head.add_task(classes)
        x = torch.randn(16, 1, 28, 28, generator=g) + task
        y = torch.tensor(classes * 8)
        params = learner.begin_task([x])
        trainable = {id(p) for p in model.head.heads[-1].parameters()}
        head_params = {id(p) for p in model.head.parameters()}
        assert {id(p) for p in params} & head_params == trainable
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x)[:, classes], y - classes[0]).backward()
            opt.step()
        learner.end_task([x])
    learner.save(tmp_path / "inflora.safetensors")
    fresh_model = per_task_vit()
    fresh = make_learner("inflora", fresh_model, total_tasks=2, rank=2)
    fresh.load(tmp_path / "inflora.safetensors")
    probe = torch.randn(5, 1, 28, 28, generator=g)
    model.eval(), fresh_model.eval()
    with torch.no_grad():
        assert torch.equal(model(probe), fresh_model(probe))
    assert fresh_model.head.task_classes == [[0, 1], [2, 3]] and fresh.total_tasks == 2
