"""Head protocols in the registry, the planner and the CLI: declared defaults, overrides and plan-time errors."""

import pytest
from conftest import tiny_experiment

from avalanche_merge.config import ConfigError
from avalanche_merge.protocol import PROTOCOLS
from avalanche_merge.runner import load_experiment, plan_experiment
from avalanche_merge.strategies import METHODS, list_methods

PAPER = {"naive": "shared", "ewc": "shared", "lwf": "shared", "replay": "shared", "joint": "shared",
         "slda": "prototype", "ncm": "prototype", "ranpac": "prototype", "color": "routed", "proteus": "routed",
         "opcm": "frozen", "magmax": "frozen", "lora": "masked", "olora": "masked", "sdlora": "masked",
         "inflora": "per_task", "gpm_lora": "per_task", "gpm": "per_task", "cllora": "per_task",
         "l2p": "masked", "dualprompt": "masked", "coda_prompt": "masked"}
DOMAIN = {"name": "domain_mnist", "options": {"domains": ["rotate_90", "flip_lr"], "train_per_domain": 50,
                                               "test_per_domain": 20}}


def plan(methods, benchmark=None, model=None):
    overrides = {"model": model} if model else {}
    return plan_experiment(load_experiment(tiny_experiment(methods, benchmark=benchmark, **overrides)))


def test_every_registered_method_declares_a_valid_protocol():
    for name in list_methods():
        spec = METHODS.get(name)
        assert spec.protocol in PROTOCOLS, name
        assert spec.protocol in spec.protocols or spec.protocols == (), name
    for name, protocol in PAPER.items():
        assert METHODS.get(name).protocol == protocol, name
    assert METHODS.get("cllora").prototypes and not METHODS.get("inflora").prototypes


def test_plans_carry_the_papers_protocol_and_overrides_get_their_own_label():
    runs = plan(["inflora", {"name": "inflora", "protocol": "shared"}, "sdlora", "naive"])
    assert [(r.label, r.protocol) for r in runs] == [("inflora", "per_task"), ("inflora-shared", "shared"),
                                                     ("sdlora", "masked"), ("naive", "shared")]
    # the protocol enters the hash only when it is not shared: runs stored before protocols keep their identity
    assert "protocol" not in runs[1].describe() and runs[0].describe()["protocol"] == "per_task"
    assert runs[1].config_hash != plan([{"name": "inflora", "label": "inflora-shared"}])[0].config_hash


def test_declared_per_task_becomes_masked_when_experiences_share_classes():
    (run,) = plan(["inflora"], benchmark=DOMAIN)
    assert run.protocol == "masked"
    with pytest.raises(ConfigError, match="protocol 'per_task' needs disjoint classes per experience"):
        plan([{"name": "inflora", "protocol": "per_task"}], benchmark=DOMAIN)
    task_labels = {**DOMAIN, "options": {**DOMAIN["options"], "task_labels": True}}
    with pytest.raises(ConfigError, match="needs disjoint classes"):
        plan([{"name": "naive", "protocol": "per_task"}], benchmark=task_labels)


@pytest.mark.parametrize(("entry", "match"), [
    ({"name": "naive", "protocol": "banana"}, r"unknown head protocol 'banana'; valid protocols"),
    ({"name": "ncm", "protocol": "masked"}, r"method 'ncm' cannot run under protocol 'masked'; it supports "
                                            r"\['prototype'\]"),
    ({"name": "joint", "protocol": "per_task"}, r"method 'joint' cannot run under protocol 'per_task'"),
    ({"name": "opcm", "protocol": "per_task"}, r"method 'opcm' cannot run under protocol 'per_task'"),
    ({"name": "sparse_grad", "protocol": "per_task"}, r"method 'sparse_grad' cannot run under protocol 'per_task'"),
    ({"name": "naive", "protocol": "masked", "prototypes": True}, r"prototypes: needs protocol 'per_task'"),
    ({"name": "inflora", "options": {"total_tasks": 1}}, r"total_tasks=1 is smaller than the 2 experiences"),
    ({"name": "cllora", "protocol": "masked", "options": {"inference": "paths"}},
     r"cllora's per-task inference paths \(inference='paths'\) need the 'per_task' head protocol, got 'masked'"),
])
def test_bad_protocols_fail_at_plan_time(entry, match):
    with pytest.raises(ConfigError, match=match):
        plan([entry])


def test_frozen_keeps_the_pretrained_head_and_refuses_a_reset_one():
    (run,) = plan(["opcm"])
    assert run.protocol == "frozen" and run.model_options.head == "pretrained"
    (run,) = plan(["naive"])
    assert run.model_options.head == "auto"
    model = {"name": "tiny_vit", "options": {"dim": 16, "depth": 1, "heads": 2, "pretrain_epochs": 5,
                                             "head": "reset"}}
    with pytest.raises(ConfigError, match="protocol 'frozen' keeps the pretrained head, but model.options.head is "
                                          "'reset'"):
        plan(["opcm"], model=model)
    unpretrained = {"name": "tiny_vit", "options": {"dim": 16, "depth": 1, "heads": 2, "pretrained": False}}
    with pytest.raises(ConfigError, match="model.options.pretrained is false"):
        plan([{"name": "naive", "protocol": "frozen"}], model=unpretrained)


def test_list_shows_each_methods_protocol(capsys):
    from avalanche_merge.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "protocol: per_task" in out and "protocol: per_task+prototypes" in out and "protocol: frozen" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("inflora "))
    assert "protocol: per_task" in line
