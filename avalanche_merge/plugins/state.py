"""Save and resume a strategy's continual state: :func:`save_state` / :func:`load_state` (safetensors + JSON).

Avalanche's ``save_checkpoint`` pickles the whole strategy with ``dill``; with torch 2.14 it fails for every
strategy (``PicklingError: Can't pickle sentinel``), and a pickle cannot be opened safely anyway. These functions
write a folder with ``tensors.safetensors`` (every tensor) and ``state.json`` (everything else, tensors referred
to by key), no pickle:

- the model's ``state_dict`` (after the plugins have rebuilt their structure: adapters, memories, routed tasks);
- the optimizer: every group's hyper-parameters and members and every parameter's state, by parameter *name*;
- the strategy clock (experience and iteration counters) and the torch, numpy and ``random`` generator states,
  so a resumed run continues bit for bit;
- each plugin of this package (``state_dict`` / ``load_state_dict``): merger state and pretrained weights,
  adapters and projection bases, masks and ownership, memories and their background statistics, routed tasks.

Usage: train experiences ``0..k``, ``save_state(strategy, folder)``; later build the same strategy (same model
architecture and initial weights, optimizer, plugins, options), call ``load_state(strategy, folder,
experiences=stream[:k + 1])`` and train from experience ``k + 1``. ``experiences`` lets growing heads
(``IncrementalClassifier``, ``MultiHeadClassifier``) grow back before their weights load.

Other plugins hold state these functions cannot save (Avalanche's replay buffers, EWC importances, LwF's previous
model): ``save_state`` refuses a strategy with plugins outside :data:`STATELESS_PLUGINS` unless ``strict=False``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..merging.task_vector import TaskVector

#: plugins with nothing to save (``Clock``: saved as the clock; ``PeriodicEval``: configuration only)
STATELESS_PLUGINS = ("EvaluationPlugin", "SupervisedPlugin", "HeadProtocolPlugin", "EarlyStoppingPlugin",
                     "PeriodicEval", "Clock")
CLOCK_FIELDS = ("train_iterations", "train_exp_counter", "train_exp_epochs", "train_exp_iterations",
                "train_epoch_iterations", "total_iterations")


class TreeWriter:
    """Encodes nested plain data (tensors, TaskVectors, generators, dataclasses, dicts, lists, numbers) as JSON and
    tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor(self, t: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t.detach().cpu().contiguous().clone()
        return key

    def encode(self, value: Any, where: str = "state") -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self.tensor(value)}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": self.tensor(torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if isinstance(value, torch.Generator):
            return {"__generator__": self.tensor(value.get_state())}
        if isinstance(value, TaskVector):
            return {"__taskvector__": self.encode(dict(value.items()), where)}
        if isinstance(value, (list, tuple)):
            kind = "__list__" if isinstance(value, list) else "__tuple__"
            return {kind: [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            return {"__dict__": [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if dataclasses.is_dataclass(value) and type(value).__module__.startswith("avalanche_merge."):
            cls = type(value)
            return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": self.encode({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)}
        raise TypeError(f"save_state cannot save {where} of type {type(value).__name__}")


def decode(value: Any, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> Any:
    """The inverse of :meth:`TreeWriter.encode` (tensors moved to ``device``)."""
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]].to(device)
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__generator__" in value:
        gen = torch.Generator()
        gen.set_state(tensors[value["__generator__"]])
        return gen
    if "__taskvector__" in value:
        return TaskVector(decode(value["__taskvector__"], tensors, device))
    if "__list__" in value:
        return [decode(v, tensors, device) for v in value["__list__"]]
    if "__tuple__" in value:
        return tuple(decode(v, tensors, device) for v in value["__tuple__"])
    if "__dict__" in value:
        return {decode(k, tensors, device): decode(v, tensors, device) for k, v in value["__dict__"]}
    if "__dataclass__" in value:  # only this package's dataclasses are rebuilt (never an arbitrary import)
        module, _, name = value["__dataclass__"].partition(":")
        if not module.startswith("avalanche_merge."):
            raise ValueError(f"refusing to rebuild {value['__dataclass__']!r}: not an avalanche_merge dataclass")
        cls = getattr(importlib.import_module(module), name)
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{value['__dataclass__']!r} is not a dataclass")
        obj = object.__new__(cls)
        for k, v in decode(value["fields"], tensors, device).items():
            object.__setattr__(obj, k, v)
        return obj
    raise ValueError(f"unreadable state entry with keys {sorted(value)[:3]}")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _ours(plugin: Any) -> bool:
    return callable(getattr(plugin, "state_dict", None)) and callable(getattr(plugin, "load_state_dict", None)) \
        and type(plugin).__module__.startswith("avalanche_merge.")


def _optimizer_state(strategy: Any) -> dict:
    optimizer = strategy.optimizer
    name_of = {id(p): n for n, p in strategy.model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in name_of]
        if missing:
            raise ValueError("the optimizer holds parameters that are not the model's; save_state saves the "
                             "optimizer of strategy.model only")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [name_of[id(p)] for p in group["params"]]})
    state = {name_of[id(p)]: dict(s) for p, s in optimizer.state.items() if id(p) in name_of and s}
    return {"groups": groups, "state": state}


def _load_optimizer_state(strategy: Any, saved: dict) -> None:
    optimizer = strategy.optimizer
    params = dict(strategy.model.named_parameters())
    unknown = [n for g in saved["groups"] for n in g["params"] if n not in params]
    if unknown:
        raise ValueError(f"the saved optimizer holds parameter {unknown[0]!r}, which the model does not have: "
                         f"build the same model and plugins before load_state")
    if len(saved["groups"]) < len(optimizer.param_groups):
        raise ValueError(f"the saved optimizer has {len(saved['groups'])} parameter groups, this one "
                         f"{len(optimizer.param_groups)}: build the same optimizer before load_state")
    for i, group in enumerate(saved["groups"]):
        members = [params[n] for n in group["params"]]
        settings = {k: v for k, v in group.items() if k != "params"}
        if i < len(optimizer.param_groups):
            optimizer.param_groups[i].update(settings)
            optimizer.param_groups[i]["params"] = members
        else:
            optimizer.param_groups.append({**settings, "params": members})
    optimizer.state.clear()
    for name, s in saved["state"].items():
        ref = params[name]
        optimizer.state[ref] = {k: v.to(ref.device) if isinstance(v, torch.Tensor) and k != "step" else v
                                for k, v in s.items()}
    strategy.optimized_param_id = {n: params[n] for g in saved["groups"] for n in g["params"]}


def save_state(strategy: Any, path: str | Path, *, strict: bool = True) -> Path:
    """Write ``strategy``'s continual state to the folder ``path`` (created; files replaced).

    Call it between experiences (after ``strategy.train(experience)``), not inside a training loop.

    Args:
        strategy: an Avalanche ``SupervisedTemplate`` whose plugins are this package's or stateless.
        path: a folder.
        strict: refuse plugins whose state cannot be saved (replay buffers, EWC importances, ...).

    Returns:
        The folder.

    Raises:
        ValueError: a plugin whose state cannot be saved (with ``strict``), or an optimizer over other tensors.
        TypeError: a plugin state holds something that cannot be written without pickle.
    """
    from safetensors.torch import save_file

    unsaved = [type(p).__name__ for p in strategy.plugins
               if not _ours(p) and type(p).__name__ not in STATELESS_PLUGINS]
    if strict and unsaved:
        raise ValueError(f"save_state saves this package's plugins only; {unsaved} hold state it cannot save "
                         f"(replay buffers, importances, previous models): a resumed run would differ. Pass "
                         f"strict=False to save without them")
    writer = TreeWriter()
    plugins = {f"{i}:{type(p).__name__}": writer.encode(p.state_dict(), type(p).__name__)
               for i, p in enumerate(strategy.plugins) if _ours(p)}
    tree = {
        "format": "avalanche_merge.state/1",
        "plugins": plugins,
        "model": writer.encode(dict(strategy.model.state_dict()), "model"),
        "optimizer": writer.encode(_optimizer_state(strategy), "optimizer"),
        "clock": {k: int(getattr(strategy.clock, k)) for k in CLOCK_FIELDS if hasattr(strategy.clock, k)},
        "rng": writer.encode(_rng_state(), "rng"),
        "unsaved_plugins": unsaved,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(writer.tensors, str(folder / "tensors.safetensors"))
    (folder / "state.json").write_text(json.dumps(tree))
    return folder


def load_state(strategy: Any, path: str | Path, *, experiences: Any = None) -> Any:
    """Restore into ``strategy`` (built like the saved one, not trained yet) what :func:`save_state` wrote.

    Args:
        strategy: the strategy to resume (same model architecture, optimizer and plugins as the saved one).
        path: the folder :func:`save_state` wrote.
        experiences: the training experiences already trained; growing heads are adapted to them first.

    Returns:
        ``strategy``.

    Raises:
        ValueError: the folder does not match the strategy (plugins, parameters, shapes).
    """
    from avalanche.models.utils import avalanche_model_adaptation

    from ..safe_load import open_safetensors

    folder = Path(path)
    tree = json.loads((folder / "state.json").read_text())
    if tree.get("format") != "avalanche_merge.state/1":
        raise ValueError(f"{folder} was not written by save_state")
    with open_safetensors(folder / "tensors.safetensors") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    device = strategy.device
    ours = {f"{i}:{type(p).__name__}": p for i, p in enumerate(strategy.plugins) if _ours(p)}
    if sorted(ours) != sorted(tree["plugins"]):
        raise ValueError(f"the saved strategy had plugins {sorted(tree['plugins'])}, this one {sorted(ours)}")
    strategy.model.to(device)
    for exp in experiences or []:
        avalanche_model_adaptation(strategy.model, exp)
    for key, plugin in ours.items():
        plugin.load_state_dict(decode(tree["plugins"][key], tensors, device), strategy)
    model_state = decode(tree["model"], tensors, device)
    current = strategy.model.state_dict()
    wrong = [k for k, v in model_state.items() if k in current and tuple(current[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"model parameter {wrong[0]!r} has shape {tuple(current[wrong[0]].shape)} here but "
                         f"{tuple(model_state[wrong[0]].shape)} in the saved state (a growing head: pass the trained "
                         f"experiences as experiences=)")
    strategy.model.load_state_dict(model_state)
    _load_optimizer_state(strategy, decode(tree["optimizer"], tensors))
    for k, v in tree["clock"].items():
        setattr(strategy.clock, k, v)
    _set_rng_state(decode(tree["rng"], tensors))
    return strategy
