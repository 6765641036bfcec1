"""SparCL (Wang et al., NeurIPS 2022): exact values and messages that the mutation run of ``sparse/sparcl.py`` found
unpinned (config validation and its boundaries, ``check_epochs``, DGM with a missing gradient, the fresh learner)."""

import re

import pytest
import torch
from torch import nn

from avalanche_merge.sparse import make_sparse_learner
from avalanche_merge.sparse.sparcl import SparCLConfig, gradient_mask

NO_DDR = {"removal_fraction": 0.0}


def _raises(message, **options):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        SparCLConfig(**options)


# -- SparCLConfig: each bad value with its exact message, each boundary accepted ----------------------------------
def test_ownership_is_refused_with_the_reason():
    _raises(
        "ownership must be False: SparCL trains one sparse network shared by every task (the owned-mask variant "
        "is the 'sparcl_update' learner)",
        ownership=True,
    )


def test_regrow_fraction_range_and_its_sum_with_density():
    _raises("regrow_fraction must be in [0.0, 0.25), got -0.01", regrow_fraction=-0.01)
    _raises("regrow_fraction must be in [0.0, 0.25), got 0.25", regrow_fraction=0.25)
    assert SparCLConfig(regrow_fraction=0.0).regrow_fraction == 0.0
    cfg = SparCLConfig(density=0.75, regrow_fraction=0.25)  # the sum is exactly 1: allowed
    assert cfg.density + cfg.regrow_fraction == 1.0
    _raises("density + regrow_fraction must be <= 1, got 0.6 + 0.5", density=0.6, regrow_fraction=0.5)


@pytest.mark.parametrize("name", ["mask_update_every", "mask_fixed_from", "gradient_every"])
def test_integer_options_name_the_bad_value(name):
    _raises(f"{name} must be an int >= 1, got 0", **{name: 0})
    _raises(f"{name} must be an int >= 1, got True", **{name: True})
    _raises(f"{name} must be an int >= 1, got 2.5", **{name: 2.5})
    assert getattr(SparCLConfig(**{name: 1}), name) == 1


def test_importance_lambda_and_gradient_sparsity_ranges():
    _raises("importance_lambda must be in [0.0, inf], got -0.5", importance_lambda=-0.5)
    assert SparCLConfig(importance_lambda=0.0).importance_lambda == 0.0
    _raises("gradient_sparsity must be in [0.0, 1.0), got -0.1", gradient_sparsity=-0.1)
    _raises("gradient_sparsity must be in [0.0, 1.0), got 1.0", gradient_sparsity=1.0)
    assert SparCLConfig(gradient_sparsity=0.0).gradient_sparsity == 0.0


def test_long_removal_stages_wait_for_check_epochs():
    # construction knows no epochs yet: a 100-epoch stage is refused only by check_epochs
    cfg = SparCLConfig(removal_fraction=0.3, removal_every=100, removal_until=100, mask_update_every=5)
    cfg.check_epochs(101)
    with pytest.raises(ValueError, match=r"^removal_every=100 needs at least 101 epochs per experience"):
        cfg.check_epochs(100)


# -- check_epochs -----------------------------------------------------------------------------------------------
def test_check_epochs_messages_and_boundary():
    cfg = SparCLConfig(mask_update_every=5, **NO_DDR)
    for bad in (0, True, 6.0):
        with pytest.raises(ValueError, match="^" + re.escape(f"epochs must be an int >= 1, got {bad!r}") + "$"):
            cfg.check_epochs(bad)
    with pytest.raises(ValueError) as err:
        cfg.check_epochs(5)
    assert str(err.value) == (
        "mask_update_every=5 never adjusts the mask within a task of 5 epochs (only the task-start regrowth would "
        "run); SparCL needs at least 6 epochs per experience, or a smaller mask_update_every"
    )
    cfg.check_epochs(6)
    one = SparCLConfig(mask_update_every=1, **NO_DDR)
    with pytest.raises(ValueError, match=r"^mask_update_every=1 never adjusts the mask within a task of 1 epochs "):
        one.check_epochs(1)  # epochs=1 is a valid int: the schedule, not the type, is refused
    one.check_epochs(2)


# -- DGM with a tensor that has no gradient --------------------------------------------------------------------
def test_gradient_mask_skips_a_tensor_without_gradient():
    masks = {"a": torch.tensor([[True, True, False], [True, False, True]]), "b": torch.tensor([True, True])}
    grads = {"a": torch.tensor([[0.3, -0.9, 5.0], [0.0, -0.2, 0.6]]), "b": None}
    per = gradient_mask(grads, masks, {"a": 2, "b": 1})
    assert torch.equal(per["a"], torch.tensor([[False, True, False], [False, False, True]]))
    assert torch.equal(per["b"], torch.tensor([False, False]))  # no gradient: nothing to keep
    glob = gradient_mask({"a": grads["a"]}, masks, 3)  # "b" missing altogether
    assert torch.equal(glob["a"], torch.tensor([[True, True, False], [False, False, True]]))
    assert torch.equal(glob["b"], torch.tensor([False, False]))


# -- the learner before its first task, and its guard's device --------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_fresh_learner_state():
    learner = make_sparse_learner("sparcl", _mlp(), **NO_DDR)
    assert (learner.epoch, learner.iteration) == (0, 0)
    assert learner.grad_masks == {} and learner.updates == [] and learner.refreshes == []
    assert learner.gradient_fraction() == 0.0  # no mask yet: no active weight


def test_guard_masks_follow_the_parameters_device():
    learner = make_sparse_learner("sparcl", _mlp(), **NO_DDR)
    learner.begin_task()
    # as if the model moved to another device after the task began (module.to keeps the Parameter objects; on
    # CPU-only hosts the "meta" device stands in for a GPU, and a CPU Parameter cannot be re-pointed to it in place)
    learner.params = {n: nn.Parameter(p.detach().to("meta")) for n, p in learner.params.items()}
    learner._sync_guard()
    for n, p in learner.params.items():
        assert learner.guard.masks[n].device == p.device == torch.device("meta")
        assert learner.masks[n].device == torch.device("cpu")
