"""``RoutedPlugin``: drives a :class:`~avalanche_merge.retrieval.routed.RoutedLoRA` (CoLoR, Proteus) in Avalanche.

The strategy's model is the :class:`RoutedLoRA` itself (its ``forward`` routes, so Avalanche's evaluation just
calls ``model(x)``): either given ready (``RoutedPlugin(model=routed)``) or wrapped around the user's own model by
the plugin at the first training experience (``RoutedPlugin(method="color")``; features are the input of the
model's head unless ``feature_fn`` says otherwise). Per experience:

- ``before_training_exp``: ``model.begin_task(classes of the experience)`` adds the task's adapter, head (over the
  experience's classes, global labels) and gates; the optimizer is reset to those parameters only (at ``lr``);
- ``before_backward``: ``strategy.loss += model.penalty()`` (Proteus);
- ``after_training_exp``: up to ``max_samples`` inputs and labels of the experience (fixed seeded order,
  evaluation transforms) go to ``model.end_task``: LDA head if any, then the signature of their *pretrained*
  embeddings;
- ``before_eval_exp`` (router ``"oracle"`` only): the oracle task is the evaluated experience's index.

A routed model trains one task's adapter and head at a time, and each head predicts only its own task's classes:
a strategy that mixes earlier experiences' samples into training (Avalanche's ``Replay`` and other plugins with a
replay buffer, ``Cumulative``, ``GDumb``, AGEM's and GEM's gradient constraints) would send them to a head without
their class; regularisers of earlier weights or outputs (EWC, SI, MAS, LwF) would be silent no-ops (earlier tasks'
parameters are frozen; the current head produces no earlier-class outputs). Both are refused with a clear error
before training (``before_training``, :mod:`~avalanche_merge.plugins.compat`), and any mini-batch holding a class
outside the current experience's is refused before its forward pass (issue 14: it used to train silently on
placeholder logits).

The plugin exposes the model as ``.router`` (the :class:`~avalanche_merge.retrieval.router.Router` interface).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader, Subset

from ..retrieval.routed import CoLoRConfig, ProteusConfig, RoutedLoRA, RoutedLoRAConfig
from .compat import mixing_components, regularising_components
from .optim import restrict_optimizer
from .protocol import experience_classes


def experience_batches(strategy: Any, max_samples: int, seed: int = 0) -> tuple[list, list]:
    """Up to ``max_samples`` (inputs, labels) of the current experience, as mini-batches on the strategy's device."""
    dataset = strategy.experience.dataset
    dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
    n = len(dataset)
    if n > max_samples:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
        dataset = Subset(dataset, order.tolist())
    loader = DataLoader(dataset, batch_size=max(1, getattr(strategy, "train_mb_size", 64)), shuffle=False)
    xs, ys = [], []
    for batch in loader:
        xs.append(batch[0].to(strategy.device))
        ys.append(torch.as_tensor(batch[1]).to(strategy.device))
    return xs, ys


ROUTED_CONFIGS = {"color": CoLoRConfig, "proteus": ProteusConfig}


def routed_config(method: str, options: dict | None = None) -> RoutedLoRAConfig:
    """The validated config of routed method ``method`` (``"color"`` or ``"proteus"``) with ``options``.

    Raises:
        ValueError: unknown method or option (the message lists the valid ones), or an invalid value.
    """
    if method not in ROUTED_CONFIGS:
        raise ValueError(f"unknown routed method {method!r}; valid: {sorted(ROUTED_CONFIGS)}")
    cls = ROUTED_CONFIGS[method]
    valid = sorted(f.name for f in fields(cls))
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for routed method {method!r}; valid: {valid}")
    return cls(**(options or {}))


def benchmark_classes(experience: Any) -> int | None:
    """The number of classes of the benchmark ``experience`` comes from (None when it cannot be told)."""
    for owner in (experience, getattr(experience, "origin_stream", None)):
        bench = getattr(owner, "benchmark", None)
        n = getattr(bench, "n_classes", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


class RoutedPlugin(SupervisedPlugin):
    """Trains one task module per experience of a :class:`RoutedLoRA` and fits its signature afterwards.

    Give it either a ready :class:`RoutedLoRA` (``model=``, which must then be the strategy's model), or nothing
    and let it wrap the strategy's model at the first training experience (``strategy.model`` becomes the
    :class:`RoutedLoRA`, also reachable as :attr:`router`; the user's model is its ``backbone``).

    Args:
        model: a ready :class:`RoutedLoRA`, or None to wrap the strategy's model.
        method: ``"color"`` or ``"proteus"`` (when wrapping).
        options: the method's config fields (:class:`~avalanche_merge.retrieval.routed.CoLoRConfig` /
            :class:`~avalanche_merge.retrieval.routed.ProteusConfig`), validated now.
        feature_fn, feature_dim: how features are read (see :class:`RoutedLoRA`; default: the input of the
            model's head, its size read off the head or inferred from the first inputs).
        num_classes: width of the routed output; default: the benchmark's number of classes, else the head's
            outputs.
        reset_optimizer_state: clear the optimizer state every experience (default: each task's parameters are
            new anyway; earlier tasks' state is dropped as they leave the optimizer).

    Raises:
        TypeError: ``model`` is not a RoutedLoRA.
        ValueError: unknown method or option, or options given together with a ready model.
    """

    def __init__(self, *, model: RoutedLoRA | None = None, method: str = "color", options: dict | None = None,
                 feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, feature_dim: int | None = None,
                 num_classes: int | None = None, reset_optimizer_state: bool = False) -> None:
        super().__init__()
        if model is not None:
            if not isinstance(model, RoutedLoRA):
                raise TypeError(f"model must be a RoutedLoRA (or None to wrap the strategy's model), got "
                                f"{type(model).__name__}")
            if options or feature_fn is not None or feature_dim is not None or num_classes is not None:
                raise ValueError("options, feature_fn, feature_dim and num_classes configure the wrapping of the "
                                 "strategy's model; a ready RoutedLoRA already has them")
            self.config = model.config
        else:
            self.config = routed_config(method, options)
        self.router: RoutedLoRA | None = model
        self.method = method
        self._wrap = dict(feature_fn=feature_fn, feature_dim=feature_dim, num_classes=num_classes)
        self.reset_optimizer_state = reset_optimizer_state
        self._classes: list[int] = []

    def _check(self, strategy: Any) -> RoutedLoRA:
        if strategy.model is not self.router:
            raise RuntimeError("RoutedPlugin: the strategy's model must be the plugin's RoutedLoRA (a plugin wraps "
                               "one model; use one plugin per strategy)")
        return self.router

    def _bind(self, strategy: Any) -> RoutedLoRA:
        """Wrap the strategy's model (first experience, when no ready RoutedLoRA was given)."""
        if self.router is None:
            opts = dict(self._wrap)
            if opts["num_classes"] is None:
                opts["num_classes"] = benchmark_classes(strategy.experience)
            self.router = RoutedLoRA(strategy.model, config=self.config, **opts)
            strategy.model = self.router
        model = self._check(strategy)
        if model.feature_dim is None:
            xs, _ = experience_batches(strategy, 2)
            model.infer_feature_dim(xs[0])
        return model

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.router is not None:
            self._check(strategy)
        mixing = mixing_components(strategy)
        if mixing:
            raise ValueError(f"retrieval-routed methods (CoLoR, Proteus) cannot train with earlier experiences' "
                             f"samples mixed in ({', '.join(mixing)}): each task's head predicts only its own "
                             f"classes, so an earlier sample has no output to train; use Naive or the registered "
                             f"'color' / 'proteus' strategies")
        regularising = regularising_components(strategy)
        if regularising:
            raise ValueError(f"retrieval-routed methods (CoLoR, Proteus) do not combine with "
                             f"{', '.join(regularising)}: "
                             f"every task trains a new adapter and head while earlier ones are frozen, so a penalty "
                             f"on earlier weights (EWC, SI, MAS) constrains nothing, and distillation (LwF) targets "
                             f"output columns the current task's head does not produce; they would run as silent "
                             f"no-ops. Routing already isolates tasks: use Naive")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = self._bind(strategy)
        self._classes = experience_classes(strategy.experience)
        params = model.begin_task(self._classes)
        restrict_optimizer(strategy, params, model.config.lr, reset_state=self.reset_optimizer_state)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if not strategy.is_training:
            return
        present = torch.as_tensor(strategy.mb_y).unique().tolist()
        foreign = sorted(set(present) - set(self._classes))
        if foreign:
            raise ValueError(f"a training mini-batch of a retrieval-routed method holds classes {foreign[:4]} that are "
                             f"not in the current experience ({self._classes[:8]}): samples of earlier experiences "
                             f"(replay) cannot train a routed model, whose heads predict only their own task's classes")

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        penalty = self.router.penalty()
        if penalty is not None:
            strategy.loss = strategy.loss + penalty

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model = self._check(strategy)
        xs, ys = experience_batches(strategy, model.config.max_samples)
        model.end_task(xs, ys)

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.router is not None and self.router.config.router == "oracle":
            self.router.oracle_task = int(strategy.experience.current_experience)
