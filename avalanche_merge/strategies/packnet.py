"""Avalanche's PackNet (Mallya & Lazebnik, CVPR 2018) as the registered baseline ``packnet``.

PackNet isolates parameters by iterative pruning: each experience trains the weights no earlier task owns, prunes
the ``prune_proportion`` of them with the smallest magnitude (freed for later tasks), fine-tunes the kept ones for
``post_prune_epochs`` and freezes them. At test time it **needs the task label**: the label selects which tasks'
weights are visible (``task_index <= t``). It therefore runs only on task-incremental benchmarks (our offline
benchmarks with ``task_labels=true``); on class- or domain-incremental streams every experience has task label 0,
so after the first experience the whole network is frozen for "task 0" and nothing more can be learned.
``avalanche-merge bench`` runs ``split_mnist`` and ``domain_mnist`` without task labels, hence ``in_bench=False``.

What comes from Avalanche 0.6, unchanged: the masked layers (``PackNetModel.wrap`` of ``nn.Linear`` and
``nn.Conv*``: magnitude pruning, ``task_index``, gradient hook), the state machine of ``PackNetModule`` and
``PackNetPlugin`` (prune at epoch ``train_epochs - post_prune_epochs``, freeze after the experience, fresh
optimizer per experience). Two adaptations, both needed to run it here:

- **Model wrapping.** ``PackNetModel(model)`` refuses any module with parameters it cannot mask, which includes
  ``nn.LayerNorm`` and the ViT's ``cls_token``/``pos_embed``. :func:`packnet_model` wraps every ``nn.Linear`` and
  ``nn.Conv*`` with Avalanche's wrapper and gives the remaining parameters (norms, tokens, position embeddings)
  the treatment Avalanche gives biases: trained with the first experience, frozen from then on
  (:class:`FirstTaskParams`). Normalisation layers with running statistics (batch norm) are refused, as by
  Avalanche.
- **Strategy and optimizer.** Avalanche 0.6's ``PackNet`` strategy passes
  ``plugins=[plugins, PackNetPlugin(...)]``, a list nested in the list, so every extra plugin given to it is
  silently never called. The builder constructs the same
  strategy as ``SupervisedTemplate(..., plugins=[*plugins, PackNetPlugin(...)])``. Its per-experience fresh
  optimizer is rebuilt from the constructor arguments only (:class:`_PackNetPlugin`: Avalanche passes every entry
  of ``optimizer.defaults``, which torch's ``AdamW`` constructor no longer accepts).

The optimizer has no weight decay whatever ``train.weight_decay`` says: frozen weights receive zero gradients,
but decoupled (AdamW) or L2 (Adam, SGD) weight decay would still shrink them and break the isolation.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass

from avalanche.models.packnet import PackNetModel, PackNetModule, PackNetPlugin
from torch import nn

from ..config import check_range
from .registry import BuildContext, make_optimizer, register_method

_MASKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)


class FirstTaskParams(PackNetModule):
    """Parameters PackNet cannot mask (norms, tokens, position embeddings): trained with the first experience,
    frozen (``requires_grad=False``) when it is committed, like Avalanche's biases.

    The parameters stay registered in their own modules; this module only keeps references (a plain list, not
    registered) and follows PackNet's state machine so that its transitions are checked with the others.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params_ = list(params)

    def _prune(self, prune_proportion: float) -> None:
        pass

    def _freeze_pruned(self) -> None:
        for p in self.params_:
            p.requires_grad_(False)

    def _activate_task(self, task_id: int) -> None:
        pass


def _wrap(module: nn.Module, shared: list[nn.Parameter]) -> None:
    """Replace maskable children in place by Avalanche's wrappers; collect the other parameters in ``shared``."""
    if hasattr(module, "running_mean") or hasattr(module, "running_var"):
        raise ValueError(f"PackNet does not support normalisation layers with running statistics "
                         f"({type(module).__name__}): their statistics would drift across tasks")
    if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
        raise ValueError("PackNet does not support weight norm")
    shared.extend(p for p in module.parameters(recurse=False) if p.is_floating_point())
    for name, child in module.named_children():
        if isinstance(child, PackNetModule):
            continue
        if isinstance(child, _MASKABLE):
            setattr(module, name, PackNetModel.wrap(child))
        else:
            _wrap(child, shared)


class WrappedPackNetModel(PackNetModel):
    """Avalanche's ``PackNetModel`` over any model of ``nn.Linear``/``nn.Conv*`` layers plus other parameters, the
    latter handled by :class:`FirstTaskParams` (``PackNetModel(model)`` itself refuses them)."""

    def __init__(self, wrappee: nn.Module) -> None:
        super(PackNetModel, self).__init__()  # PackNetModule + MultiTaskModule, skipping PackNetModel.wrap
        shared: list[nn.Parameter] = []
        _wrap(wrappee, shared)
        self.wrappee = wrappee
        self.first_task_params = FirstTaskParams(shared)


class _PackNetPlugin(PackNetPlugin):
    """Avalanche's ``PackNetPlugin`` whose per-experience fresh optimizer also works with torch >= 2.9.

    Avalanche 0.6 rebuilds the optimizer as ``cls(params, **optimizer.defaults)``; torch's ``AdamW`` keeps a
    ``decoupled_weight_decay`` entry in its defaults that its constructor does not accept. Only the defaults the
    constructor accepts are passed; otherwise identical.
    """

    def before_training_exp(self, strategy, *args, **kwargs):
        cls = type(strategy.optimizer)
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {k: v for k, v in strategy.optimizer.defaults.items() if k in accepted}
        strategy.optimizer = cls(strategy.model.parameters(), **defaults)


def packnet_model(model: nn.Module) -> PackNetModule:
    """``model`` made PackNet-compatible: modified in place (maskable layers replaced by Avalanche's wrappers) and
    wrapped in a :class:`WrappedPackNetModel`; a ``PackNetModule`` is returned unchanged.

    The result is an Avalanche ``PackNetModel`` (a ``MultiTaskModule``): ``forward(x, task_labels)``, all labels of
    a mini-batch equal.
    """
    if isinstance(model, PackNetModule):
        return model
    return WrappedPackNetModel(model)


@dataclass
class PackNetConfig:
    """PackNet (Mallya & Lazebnik, CVPR 2018) through Avalanche's ``PackNetPlugin``.

    Args:
        prune_proportion: share of the weights still free at an experience's start that are pruned (left to
            later tasks) after its initial training, in [0, 1]; 0.5 is Avalanche's default and the paper's
            setting when adding tasks one at a time.
        post_prune_epochs: epochs of fine-tuning of the kept weights after pruning, >= 1; must be smaller than
            ``train.epochs`` (the remaining ``train.epochs - post_prune_epochs`` epochs train before pruning).
    """

    prune_proportion: float = 0.5
    post_prune_epochs: int = 1

    def __post_init__(self) -> None:
        check_range("prune_proportion", self.prune_proportion, 0.0, 1.0)
        if isinstance(self.post_prune_epochs, bool) or not isinstance(self.post_prune_epochs, int) \
                or self.post_prune_epochs < 1:
            raise ValueError(f"post_prune_epochs must be an int >= 1, got {self.post_prune_epochs!r}")


@register_method("packnet", config_cls=PackNetConfig, needs_task_labels=True, protocols=("shared",),
                 in_bench=False,
                 description="PackNet iterative pruning (Mallya & Lazebnik 2018, Avalanche); task-incremental only: "
                             "needs task labels at test time")
def build_packnet(ctx: BuildContext, cfg: PackNetConfig):
    from avalanche.training.templates import SupervisedTemplate

    if cfg.post_prune_epochs >= ctx.train.epochs:
        raise ValueError(f"packnet: post_prune_epochs ({cfg.post_prune_epochs}) must be smaller than train.epochs "
                         f"({ctx.train.epochs}): PackNet trains, prunes, then fine-tunes within each experience")
    if ctx.train.weight_decay:
        warnings.warn(f"packnet: weight_decay={ctx.train.weight_decay} ignored (it would change frozen weights)",
                      stacklevel=2)
    model = packnet_model(ctx.model)
    optimizer = make_optimizer(model.parameters(), dataclasses.replace(ctx.train, weight_decay=0.0))
    plugin = _PackNetPlugin(post_prune_epochs=cfg.post_prune_epochs, prune_proportion=float(cfg.prune_proportion))
    return SupervisedTemplate(model=model, optimizer=optimizer, **ctx.strategy_kwargs([plugin]))
