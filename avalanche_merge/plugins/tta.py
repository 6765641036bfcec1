"""Test-time adaptation plugins: TENT (:class:`TentPlugin`) and TTACIL's MEMO step (:class:`MemoLayerNormPlugin`).

Both act during evaluation only and leave training untouched; they wire Avalanche's evaluation callbacks to the
cores of :mod:`avalanche_merge.tta`.

- :class:`TentPlugin` (Wang et al., ICLR 2021; DequanWang/tent). At the start of every evaluated experience the
  normalisation state is saved (:class:`~avalanche_merge.tta.norms.NormSnapshot`) and a fresh optimizer is built
  over the normalisation affine parameters only; inside the experience BatchNorms use batch statistics and every
  other parameter is frozen. For each batch the strategy's own forward runs with gradients enabled and its output
  is the prediction; the plugin then takes one step on the batch-mean entropy of that output (the reference's
  ``forward_and_adapt`` returns the outputs of the forward it adapts on, so the prediction of a batch is made
  *before* the update that batch causes). With ``episodic`` the state and the optimizer are reset before every
  batch. At the end of the experience the saved state is written back, so nothing learnt while testing leaks
  into the next experience's test or into training (the reference resets per corruption; see the docs page).
- :class:`MemoLayerNormPlugin` (TTACIL, Marouf et al., arXiv 2310.11482). Before each batch's forward it restores
  the saved LayerNorms, takes one SGD step on the MEMO marginal entropy of ``n_views`` AugMix views, and lets the
  strategy predict the clean batch with the adapted LayerNorms (the reference predicts *after* its update);
  after the forward it restores the LayerNorms again.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from ..tta.augmix import augmix_views
from ..tta.config import TentConfig, TTACILConfig
from ..tta.entropy import adapt_step, entropy_loss, marginal_entropy
from ..tta.norms import NormSnapshot, adaptation_mode, norm_modules, norm_parameters


def _optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _config(cls: type, config: Any, options: dict[str, Any]) -> Any:
    """``config``, or ``cls(**options)`` with unknown option names refused, listing the valid ones."""
    if config is not None and options:
        raise ValueError(f"give either config= or options ({sorted(options)}), not both")
    if config is not None:
        if not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return config
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; valid options: {valid}")
    return cls(**options)


class TentPlugin(SupervisedPlugin):
    """TENT during evaluation (see the module doc).

    Args:
        config: :class:`~avalanche_merge.tta.config.TentConfig`; or give its options as keywords
            (``TentPlugin(lr=1e-3, episodic=True)``), not both.

    Raises:
        ValueError: an unknown option (the message lists the valid ones), or both ``config`` and options.
    """

    def __init__(self, *, config: TentConfig | None = None, **options: Any) -> None:
        super().__init__()
        self.config = _config(TentConfig, config, options)
        self.params: list[torch.nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._snapshot: NormSnapshot | None = None
        self._optimizer_state: dict | None = None
        self._stack: ExitStack | None = None
        self._grad_mode: bool | None = None
        self.batches_adapted = 0

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        cfg = self.config
        model = strategy.model
        self.params = [p for _, p in norm_parameters(model)]
        self._snapshot = NormSnapshot(model)
        self.optimizer = _optimizer(self.params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        self._optimizer_state = self.optimizer.state_dict()
        self._stack = ExitStack()
        self._stack.enter_context(adaptation_mode(model, self.params))

    def before_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.config.episodic:
            self._reset()
        for _ in range(self.config.steps - 1):  # all but the last step: their outputs are not predictions
            with torch.enable_grad():
                outputs = strategy.forward()
                adapt_step(entropy_loss(outputs), self.params, self.optimizer)
        self._grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)  # the strategy's forward builds the graph the last step differentiates

    def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        try:
            outputs = strategy.mb_output
            if outputs.requires_grad:
                adapt_step(entropy_loss(outputs), self.params, self.optimizer)
            strategy.mb_output = outputs.detach()
            self.batches_adapted += 1
        finally:
            torch.set_grad_enabled(bool(self._grad_mode))

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._reset()
        if self._stack is not None:
            self._stack.close()
        self._stack = self._snapshot = None
        self.optimizer = None

    def _reset(self) -> None:
        self._snapshot.restore()
        self.optimizer.load_state_dict(self._optimizer_state)
        self.optimizer.state.clear()

    def method_info(self) -> dict:
        return {"adapted_parameters": int(sum(p.numel() for p in self.params)),
                "batches_adapted": self.batches_adapted}


class MemoLayerNormPlugin(SupervisedPlugin):
    """TTACIL's test-time step: restore LayerNorms, one SGD step on MEMO's marginal entropy, predict, restore.

    Active once ``snapshot()`` has saved the LayerNorms to restore (TTACIL saves them after its first experience).
    The strategy must expose ``adapt_logits(x) -> logits`` (the logits the prediction uses, restricted to the
    classes seen so far) and its un-normalised inputs in ``mb_x``.

    Args:
        config: :class:`~avalanche_merge.tta.config.TTACILConfig` (``n_views``, SGD settings, ``per_instance``,
            ``carry_momentum``, ``augmix``).
        seed: seed of the AugMix generator.
    """

    def __init__(self, *, config: TTACILConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config or TTACILConfig()
        self.generator = torch.Generator().manual_seed(seed)
        self.params: list[torch.nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._snapshot: NormSnapshot | None = None
        self._optimizer_state: dict | None = None
        self.batches_adapted = 0

    def snapshot(self, model: torch.nn.Module) -> None:
        """Save ``model``'s LayerNorms (the state restored around every test batch) and build the SGD."""
        cfg = self.config
        self.params = [p for n, m in norm_modules(model) for p in m.parameters(recurse=False)]
        if not self.params:
            norm_parameters(model)  # raises the explanatory error
        self._snapshot = NormSnapshot(model)
        self.optimizer = _optimizer(self.params, "sgd", cfg.lr, cfg.momentum, cfg.weight_decay)
        self._optimizer_state = self.optimizer.state_dict()

    def before_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self._snapshot is None:
            return
        self._restore()
        cfg = self.config
        x = strategy.mb_x
        views = augmix_views(x.detach(), cfg.n_views, generator=self.generator, config=cfg.augmix)
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(adaptation_mode(strategy.model, self.params))
            logits = strategy.adapt_logits(views.flatten(0, 1))
            loss = marginal_entropy(logits.view(x.shape[0], cfg.n_views, -1), per_instance=cfg.per_instance)
            adapt_step(loss, self.params, self.optimizer)
        self.batches_adapted += 1

    def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self._snapshot is not None:
            self._restore()

    def after_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._snapshot is not None:
            self._restore(optimizer=True)

    def _restore(self, optimizer: bool | None = None) -> None:
        self._snapshot.restore()
        if optimizer or (optimizer is None and not self.config.carry_momentum):
            self.optimizer.load_state_dict(self._optimizer_state)
            self.optimizer.state.clear()

    def method_info(self) -> dict:
        return {"adapted_parameters": int(sum(p.numel() for p in self.params)),
                "batches_adapted": self.batches_adapted}
