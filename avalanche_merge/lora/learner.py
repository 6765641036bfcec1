"""``ContinualLoRA``: the base of every continual LoRA learner, and plain sequential LoRA.

A learner owns a model with peft LoRA adapters and is driven by four calls, whoever runs the training loop
(the Avalanche plugin in :mod:`avalanche_merge.plugins.lora`, or your own loop):

1. ``params = learner.begin_task(inputs)`` before training task t: adds the task's adapter (or keeps the shared
   one), freezes earlier adapters, runs the method's data-dependent setup on ``inputs`` (an iterable of model
   inputs of the new task) and returns the parameters to optimise;
2. ``loss = loss + learner.penalty()`` each step (``None`` when the method has no penalty);
3. ``learner.after_backward()`` after ``loss.backward()`` (gradient projections), and ``learner.after_step()``
   after ``optimizer.step()`` (constraints that an adaptive optimizer can break, e.g. GPM's);
4. ``learner.end_task(inputs)`` after the task (bases, normalisation, ...).

``learner.set_stream_length(n)`` before the first task tells schedules that depend on the number of tasks
(InfLoRA's thresholds) how long the stream is; the Avalanche plugin calls it with the stream's length.

No Avalanche import here. Subclasses override the ``_setup_task`` / ``penalty`` / ``after_backward`` /
``_finish_task`` hooks and, for saved state beyond the adapters, ``extra_state`` / ``load_extra_state``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..merging.heads import find_head
from .adapters import (
    activate,
    adapter_state,
    add_adapter,
    load_adapter_state,
    lora_layers,
    record_foreign_adapters,
    resolve_targets,
)
from .config import LoRAConfig


def run_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dict inputs (Hugging Face encoders), else ``model(batch)``."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


class ContinualLoRA:
    """Plain sequential LoRA (Hu et al., ICLR 2022): one adapter, trained on every task in turn.

    The baseline that the projection methods improve on; subclasses with ``per_task = True`` add an adapter per
    task and freeze the earlier ones.

    Args:
        model: the model to adapt (modified in place: peft replaces its target layers).
        config: a :class:`LoRAConfig` (or the subclass's ``config_cls``).
    """

    name: ClassVar[str] = "lora"
    config_cls: ClassVar[type] = LoRAConfig
    per_task: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False  # begin_task / end_task use the task's inputs
    conv_targets: ClassVar[bool] = True  # False: the method works on inputs of nn.Linear layers only

    def __init__(self, model: nn.Module, *, config: LoRAConfig | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        config = self.config_cls() if config is None else config
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.head_name = find_head(model, config.head) if config.train_head else None
        self.foreign = record_foreign_adapters(model)  # a user's peft adapters stay as they are
        self.targets = resolve_targets(model, config.target_modules, allow_conv=self.conv_targets,
                                       exclude=[self.head_name] if self.head_name else [])
        self.adapters: list[str] = []
        self.task = -1

    # -- the four calls ------------------------------------------------------------------------------------
    def begin_task(self, inputs: Iterable | None = None) -> list[nn.Parameter]:
        """Prepare task ``self.task + 1`` and return the parameters to optimise."""
        if self.needs_inputs and inputs is None:
            raise ValueError(f"{type(self).__name__}.begin_task needs the new task's inputs")
        self.task += 1
        if self.per_task or not self.adapters:
            name = f"task{self.task}"
            add_adapter(self.model, name, self.config, self.targets)
            self.adapters.append(name)
        self._setup_task(inputs)
        self._activate()
        return self.trainable_parameters()

    def penalty(self) -> torch.Tensor | None:
        """Regulariser added to the task loss (None: none)."""
        return None

    def after_backward(self) -> None:
        """Modify gradients after ``backward()`` (default: nothing)."""

    def after_step(self) -> None:
        """Restore constraints after ``optimizer.step()`` (default: nothing)."""

    def set_stream_length(self, n_tasks: int) -> None:
        """The number of tasks of the stream, for schedules that depend on it (default: unused)."""

    def end_task(self, inputs: Iterable | None = None) -> None:
        """Finish the current task (default: nothing beyond the method's hook)."""
        if self.task < 0:
            raise RuntimeError("end_task called before begin_task")
        if self.needs_inputs and inputs is None:
            raise ValueError(f"{type(self).__name__}.end_task needs the task's inputs")
        self._finish_task(inputs)

    # -- hooks ---------------------------------------------------------------------------------------------
    def _setup_task(self, inputs: Iterable | None) -> None:
        """Method-specific setup of the new adapter (called before activation)."""

    def _finish_task(self, inputs: Iterable | None) -> None:
        """Method-specific work after a task."""

    def trainable_adapters(self) -> list[str]:
        """Adapters that get gradients in the current task (default: the newest)."""
        return self.adapters[-1:]

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the adapters' A and B that :meth:`save` must keep (bases, magnitudes, ...)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got keys {sorted(state)[:4]}")

    # -- helpers -------------------------------------------------------------------------------------------
    def _activate(self) -> None:
        activate(self.model, self.adapters, self.trainable_adapters())
        if self.head_name:
            head = self.model.get_submodule(self.head_name)
            head.requires_grad_(True)
            if hasattr(head, "freeze_finished"):  # a per-task head: only the current task's head trains
                head.freeze_finished()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters with ``requires_grad`` (the only ones an optimizer should hold)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def layers(self):
        """The peft LoRA layers by name."""
        return lora_layers(self.model)

    # -- save / load ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write every adapter, the method's extra state and the config to a safetensors file."""
        from safetensors.torch import save_file

        from ..atomic import atomic_path

        tensors = {f"{a}::{k}": v.contiguous() for a in self.adapters for k, v in adapter_state(self.model, a).items()}
        tensors |= {f"extra::{k}": v.detach().contiguous() for k, v in self.extra_state().items()}
        head_extra = {}
        if self.head_name:
            head = self.model.get_submodule(self.head_name)
            for k, v in head.state_dict().items():
                if isinstance(v, torch.Tensor):
                    tensors[f"head::{k}"] = v.detach().clone().contiguous()
                else:  # a module's extra state (e.g. a per-task head's task classes): JSON in the metadata
                    head_extra[k] = v
        meta = {"method": self.name, "adapters": json.dumps(self.adapters), "task": str(self.task),
                "config": json.dumps({k: v for k, v in vars(self.config).items()}, default=list),
                "head_extra": json.dumps(head_extra)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Restore what :meth:`save` wrote into this learner (same method and config, adapters created)."""
        from ..safe_load import open_safetensors

        with open_safetensors(path) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        if meta.get("method") != self.name:
            raise ValueError(f"{path} holds a {meta.get('method')!r} learner, not {self.name!r}")
        mine = json.loads(json.dumps(vars(self.config), default=list))
        if json.loads(meta["config"]) != mine:
            raise ValueError(f"{path} was saved with config {meta['config']}, this learner has {mine}")
        for name in json.loads(meta["adapters"]):
            if name not in self.adapters:
                add_adapter(self.model, name, self.config, self.targets)
                self.adapters.append(name)
            prefix = f"{name}::"
            load_adapter_state(self.model, name, {k[len(prefix):]: v for k, v in tensors.items()
                                                  if k.startswith(prefix)})
        if self.head_name:
            head = self.model.get_submodule(self.head_name)
            state = json.loads(meta.get("head_extra", "{}"))  # extra state first: it recreates per-task heads
            state |= {k[6:]: v for k, v in tensors.items() if k.startswith("head::")}
            head.load_state_dict(state)
        self.task = int(meta["task"])
        self.load_extra_state({k[7:]: v for k, v in tensors.items() if k.startswith("extra::")})
        self._activate()


@dataclass(kw_only=True)
class SequentialLoRAConfig(LoRAConfig):
    """Plain sequential LoRA (defaults: Hu et al., ICLR 2022: rank 8 on the query and value projections)."""

    rank: int = 8
    target_modules: tuple[str, ...] = ("q", "v")


class SequentialLoRA(ContinualLoRA):
    """Plain sequential LoRA (Hu et al., ICLR 2022): one adapter trained on every task in turn (the baseline).

    The registered ``lora`` learner; its defaults are the paper's (rank 8 on ``q`` and ``v``), where
    :class:`ContinualLoRA` keeps :class:`LoRAConfig`'s generic ones.
    """

    name = "lora"
    config_cls = SequentialLoRAConfig
