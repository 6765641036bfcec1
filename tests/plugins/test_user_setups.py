"""Every family's plugin with a user's own model and benchmark, inside Avalanche's Naive, Replay, EWC, LwF and AGEM,
with ``IncrementalClassifier`` heads and a two-group optimizer (issue 16). Combinations that cannot work must fail
before training with a message saying why."""

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import AGEM, EWC, LwF, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from user_setup import TARGETS, digits_benchmark, user_model

from avalanche_merge.plugins import LoRAPlugin, MergePlugin, RoutedPlugin, SparsePlugin

STRATEGIES = {
    "naive": (Naive, {}),
    "replay": (Replay, {"mem_size": 20}),
    "ewc": (EWC, {"ewc_lambda": 1.0}),
    "lwf": (LwF, {"alpha": 1.0, "temperature": 2.0}),
    "agem": (AGEM, {"patterns_per_exp": 10, "sample_size": 10}),
}
FAMILIES = ("merge", "lora", "sparse", "routed")
#: routed methods refuse strategies that mix old samples in or regularise towards earlier weights/outputs
REFUSED = {("routed", "replay"): "samples mixed in", ("routed", "agem"): "samples mixed in",
           ("routed", "ewc"): "no-ops", ("routed", "lwf"): "no-ops"}


@pytest.fixture(scope="module")
def bench():
    return digits_benchmark()


def family_plugin(family: str, kind: str):
    if family == "merge":
        return MergePlugin(merger="continual_ta")
    if family == "lora":
        return LoRAPlugin(method="olora", options={"target_modules": TARGETS[kind], "rank": 2})
    if family == "sparse":
        return SparsePlugin(method="masked", options={"density": 0.2, "max_samples": 32})
    return RoutedPlugin(method="color", options={"target_modules": TARGETS[kind], "rank": 2, "n_components": 1})


class Counter(SupervisedPlugin):
    """Counts training iterations (to tell a refusal before training from a crash during it)."""

    def __init__(self):
        super().__init__()
        self.iterations = 0

    def after_training_iteration(self, strategy, **kwargs):
        self.iterations += 1


def make_strategy(strategy: str, model, plugins, optimizer=None):
    cls, extra = STRATEGIES[strategy]
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return cls(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=16,
               train_epochs=1, eval_mb_size=100, plugins=plugins, evaluator=EvaluationPlugin(), **extra)


def run(bench, family, strategy, kind="mlp", incremental=True, n=3):
    model = user_model(kind, incremental)
    counter = Counter()
    plugin = family_plugin(family, kind)
    strat = make_strategy(strategy, model, [plugin, counter])
    for exp in bench.train_stream[:n]:
        strat.train(exp)
    return strat, plugin, counter


def accuracy(strat, stream) -> float:
    model = strat.model.eval()
    correct = total = 0
    with torch.no_grad():
        for exp in stream:
            x, y = torch.stack([s[0] for s in exp.dataset]), torch.tensor([s[1] for s in exp.dataset])
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def check(bench, family, strategy, kind="mlp", incremental=True):
    if (family, strategy) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[(family, strategy)]) as info:
            run(bench, family, strategy, kind, incremental)
        assert "Naive" in str(info.value)  # says what to use instead
        return
    strat, _, counter = run(bench, family, strategy, kind, incremental)
    assert counter.iterations > 0
    acc = accuracy(strat, bench.test_stream[:3])
    assert 0.0 <= acc <= 1.0
    assert all(torch.isfinite(p).all() for p in strat.model.parameters())


# a representative fast subset: every family in Naive (IncrementalClassifier, both models), every strategy with
# the merge and routed families
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_every_family_in_naive_with_a_growing_head(bench, family, kind):
    check(bench, family, "naive", kind)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "naive"])
@pytest.mark.parametrize("family", ["merge", "routed"])
def test_every_strategy(bench, family, strategy):
    check(bench, family, strategy)


@pytest.mark.slow
@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", FAMILIES)
def test_full_matrix(bench, family, strategy, kind, incremental):
    check(bench, family, strategy, kind, incremental)


def test_routed_refuses_before_any_training_step(bench):
    with pytest.raises(ValueError, match="ReplayPlugin"):
        _, _, counter = run(bench, "routed", "replay")
    model = user_model()
    counter = Counter()
    strat = make_strategy("ewc", model, [family_plugin("routed", "mlp"), counter])
    with pytest.raises(ValueError, match="EWCPlugin"):
        strat.train(bench.train_stream[0])
    assert counter.iterations == 0


def test_merge_auto_head_mode_with_incremental_classifier_keeps_each_class_row(bench):
    """IncrementalClassifier starts with 2 outputs = the first experience's classes: 'auto' must still pick
    class_rows (it used to pick merge and crash at experience 1 with a shape mismatch)."""
    strat, plugin, _ = run(bench, "merge", "naive", n=3)
    assert plugin._mode == "class_rows"
    head = strat.model.classifier.classifier
    assert head.out_features == 6
    for c, (w, b) in plugin.class_rows.rows.items():
        assert torch.equal(head.weight[c], w) and torch.equal(head.bias[c], b)
    assert sorted(plugin.class_rows.rows) == list(range(6))


def test_merge_head_mode_merge_on_a_growing_head_fails_early_naming_it(bench):
    model = user_model("mlp", incremental=True)
    counter = Counter()
    strat = make_strategy("naive", model, [MergePlugin(merger="opcm", head_mode="merge"), counter])
    with pytest.raises(ValueError, match="'classifier'.*class_rows"):
        strat.train(bench.train_stream[0])
    assert counter.iterations == 0


def test_routed_plugin_wraps_the_users_model_and_reads_features_off_its_head(bench):
    strat, plugin, _ = run(bench, "routed", "naive", n=2)
    router = plugin.router
    assert strat.model is router and router.backbone.__class__.__name__ == "SimpleMLP"
    assert router.feature_dim == 32 and router.num_classes == 10
    x = torch.stack([bench.test_stream[0].dataset[i][0] for i in range(4)])
    # features are the head's input: the MLP's hidden layer without any adapter
    router.eval()
    assert torch.allclose(router.embed(x), router.backbone.features(x))
    assert router.num_tasks == 2


@pytest.mark.parametrize("family", ["lora", "sparse", "routed"])
def test_two_group_optimizer_keeps_rates_and_state(bench, family):
    """A lower backbone rate and a higher head rate survive; momentum of parameters trained in every experience
    (the head) is not wiped between experiences; new parameters join a group."""
    model = user_model("mlp", incremental=False)
    head = list(model.classifier.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.SGD([{"params": backbone, "lr": 0.01}, {"params": head, "lr": 0.1}], momentum=0.9)
    options = {"train_head": True} if family in ("lora", "sparse") else {}
    if family == "lora":
        plugin = LoRAPlugin(method="olora", options={"target_modules": TARGETS["mlp"], "rank": 2, **options})
    elif family == "sparse":
        plugin = SparsePlugin(method="masked", options={"density": 0.2, "max_samples": 32, **options})
    else:
        plugin = RoutedPlugin(method="color", options={"target_modules": TARGETS["mlp"], "rank": 2,
                                                       "n_components": 1})

    class Spy(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.first = []

        def before_training_iteration(self, strategy, **kw):
            if strategy.clock.train_exp_iterations == 0:
                opt = strategy.optimizer
                self.first.append(([g["lr"] for g in opt.param_groups],
                                   {id(p): opt.state[p].get("momentum_buffer") for p in head if p in opt.state}))

    spy = Spy()
    strat = make_strategy("naive", model, [plugin, spy], optimizer=optimizer)
    for exp in bench.train_stream[:2]:
        strat.train(exp)
    for lrs, _ in spy.first:
        assert lrs[:2] == [0.01, 0.1]
    trained = {id(p) for g in strat.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in strat.model.parameters() if p.requires_grad}
    if family in ("lora", "sparse"):  # the head trains in both experiences: its momentum carries over
        _, state = spy.first[1]
        assert state and all(v is not None and v.abs().sum() > 0 for v in state.values())
    if family == "lora":  # the new adapter joined the backbone's group (its layer's group)
        adapters = [p for n, p in strat.model.named_parameters() if "lora_" in n and p.requires_grad]
        assert adapters and all(any(p is q for q in strat.optimizer.param_groups[0]["params"]) for p in adapters)


def test_lr_option_with_two_groups_is_refused_clearly(bench):
    model = user_model("mlp")
    optimizer = torch.optim.SGD([{"params": model.features.parameters(), "lr": 0.01},
                                 {"params": model.classifier.parameters(), "lr": 0.1}])
    plugin = LoRAPlugin(method="olora", options={"target_modules": TARGETS["mlp"], "lr": 0.5})
    strat = make_strategy("naive", model, [plugin], optimizer=optimizer)
    with pytest.raises(ValueError, match="2 parameter groups"):
        strat.train(bench.train_stream[0])
