"""MergePlugin inside Avalanche strategies (Naive, Replay, EWC) on the tiny offline benchmark."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import EWC, Naive, Replay
from torch import nn

from avalanche_merge.benchmarks import build_benchmark
from avalanche_merge.merging import ContinualAverage, ContinualTaskArithmetic, TaskVector
from avalanche_merge.plugins import MergePlugin
from avalanche_merge.strategies import ContinualMerging


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


class Probe(SupervisedPlugin):
    """Records the model's weights at the hooks (placed before or after the merge plugin)."""

    def __init__(self):
        super().__init__()
        self.before, self.after = [], []

    def before_training_exp(self, strategy, **kw):
        self.before.append({k: v.clone() for k, v in strategy.model.state_dict().items()})

    def after_training_exp(self, strategy, **kw):
        self.after.append({k: v.clone() for k, v in strategy.model.state_dict().items()})


@pytest.fixture(scope="module")
def bench():
    return build_benchmark("split_digits", seed=0, n_experiences=2, max_train_per_class=20)


def _run(bench, merge, strategy_cls=Naive, seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    finetuned, started = Probe(), Probe()  # before / after the merge plugin in hook order
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = strategy_cls(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=16,
                            train_epochs=2, eval_mb_size=64, plugins=[finetuned, merge, started], **kw)
    params = [id(p) for p in model.parameters()]
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    assert [id(p) for p in model.parameters()] == params  # merged in place: the optimizer stays valid
    assert [id(p) for g in strategy.optimizer.param_groups for p in g["params"]] == params
    return model, pre, finetuned, started


def _body(sd):
    return {k: v for k, v in sd.items() if k.startswith("body.")}


def test_first_merge_at_scaling_one_is_the_finetuned_model(bench):
    model, pre, ft, started = _run(bench, MergePlugin(merger=ContinualAverage()))
    # after experience 1 the merge of one task vector is that fine-tuned model (started[1] = before exp 2 is
    # the pretrained start, so compare what the probe after the plugin saw at exp 1)
    for k in _body(pre):  # pre + (ft - pre) in fp32: equal up to one rounding
        torch.testing.assert_close(started.after[0][k], ft.after[0][k], rtol=0, atol=1e-6)
    assert not torch.equal(started.after[0]["body.1.weight"], pre["body.1.weight"])


def test_task_arithmetic_merge_and_pretrained_start(bench):
    model, pre, ft, started = _run(bench, MergePlugin(merger=ContinualTaskArithmetic(scaling=0.5)))
    # each experience starts from the pretrained weights
    for k in _body(pre):
        assert torch.equal(started.before[1][k], pre[k])
    taus = [TaskVector.from_state_dicts(_body(pre), _body(f)) for f in ft.after]
    expected = (taus[0] + taus[1]) * 0.5
    final = model.state_dict()
    for k in _body(pre):
        torch.testing.assert_close(final[k], pre[k] + expected[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(final["body.1.weight"], ft.after[1]["body.1.weight"])


@pytest.mark.parametrize("start", ["previous", "merged"])
def test_start_points(bench, start):
    model, pre, ft, started = _run(bench, MergePlugin(merger=ContinualTaskArithmetic(scaling=0.5), start=start))
    reference = ft.after[0] if start == "previous" else started.after[0]  # fine-tuned vs merged exp-1 weights
    for k in _body(pre):
        assert torch.equal(started.before[1][k], reference[k])
    assert not torch.equal(ft.after[0]["body.1.weight"], started.after[0]["body.1.weight"])


def test_class_rows_keep_each_class_from_its_experience(bench):
    model, pre, ft, started = _run(bench, MergePlugin(merger="continual_average"))
    first = bench.scenario.train_stream[0].classes_in_this_experience
    second = bench.scenario.train_stream[1].classes_in_this_experience
    head = model.head
    for c in first:  # trained further (pushed down) in experience 2, restored from experience 1
        assert torch.equal(head.weight[c], ft.after[0]["head.weight"][c])
        assert not torch.equal(ft.after[1]["head.weight"][c], ft.after[0]["head.weight"][c])
    for c in second:
        assert torch.equal(head.weight[c], ft.after[1]["head.weight"][c])


def test_head_mode_merge_includes_the_head(bench):
    model, pre, ft, _ = _run(bench, MergePlugin(merger="continual_average", head_mode="merge"))
    mean_head = (ft.after[0]["head.weight"] + ft.after[1]["head.weight"]) / 2
    torch.testing.assert_close(model.head.weight.detach(), mean_head, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy_cls,kw", [(Replay, {"mem_size": 20}), (EWC, {"ewc_lambda": 10.0})])
def test_plugin_inside_replay_and_ewc(bench, strategy_cls, kw):
    model, pre, ft, started = _run(bench, MergePlugin(merger="opcm"), strategy_cls=strategy_cls, **kw)
    taus = [TaskVector.from_state_dicts(_body(pre), _body(f)) for f in ft.after]
    # OPCM's merge keeps the mean task-vector norm
    merged = TaskVector.from_state_dicts(_body(pre), _body(model.state_dict()))
    assert merged.norm() == pytest.approx((taus[0].norm() + taus[1].norm()) / 2, rel=1e-4)


def test_deterministic_under_a_seed(bench):
    a = _run(bench, MergePlugin(merger="opcm"), seed=3)[0].state_dict()
    b = _run(bench, MergePlugin(merger="opcm"), seed=3)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_continual_merging_strategy_matches_plugin(bench):
    torch.manual_seed(0)
    model = Tiny()
    strategy = ContinualMerging(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                merger="continual_task_arithmetic", merger_options={"scaling": 0.5},
                                train_mb_size=16, train_epochs=2, eval_mb_size=64)
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    reference = _run(bench, MergePlugin(merger=ContinualTaskArithmetic(scaling=0.5)))[0].state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)


@pytest.mark.parametrize("kwargs,match", [
    ({"start": "middle"}, "start must be one of"),
    ({"head_mode": "rows"}, "head_mode must be one of"),
    ({"merger": "nope"}, "unknown merger 'nope'; valid mergers: .*opcm"),
    ({"merger": ContinualAverage(), "merger_options": {"scaling": 1}}, "merger_options only applies"),
    ({"merger": "opcm", "merger_options": {"alpha": 2.0}}, "alpha must be in"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergePlugin(**kwargs)


def test_unknown_head_module(bench):
    with pytest.raises(ValueError, match="head 'classifier' is not a module"):
        _run(bench, MergePlugin(merger="opcm", head="classifier"))


class Growing(nn.Module):
    """Avalanche's growing head: the output layer gains rows when new classes arrive."""

    def __init__(self):
        super().__init__()
        from avalanche.models import IncrementalClassifier

        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU())
        self.classifier = IncrementalClassifier(16, initial_out_features=2)

    def forward(self, x):
        return self.classifier(self.body(x))


def test_class_rows_with_a_growing_incremental_classifier(bench):
    torch.manual_seed(0)
    model = Growing()
    ft = Probe()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, eval_mb_size=64,
                     plugins=[ft, MergePlugin(merger="continual_average")])
    for exp in bench.scenario.train_stream:
        strategy.train(exp)
    weight = model.classifier.classifier.weight
    first = bench.scenario.train_stream[0].classes_in_this_experience
    assert weight.shape[0] > max(first)  # the head grew
    for c in first:  # each class keeps the row fitted in its own experience
        assert torch.equal(weight[c], ft.after[0]["classifier.classifier.weight"][c])
