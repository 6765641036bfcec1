"""Typed construction of dataclass configs from plain dicts (JSON files, CLI overrides).

``from_dict(Config, data)`` rejects unknown keys and values of the wrong type with a message that names the
field and the expected type, before the dataclass's own ``__post_init__`` checks ranges. Supported field types:
``int``, ``float`` (ints accepted), ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``list[X]``,
``tuple[X, ...]``, ``dict`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]) and isinstance(value, dict):
            return from_dict(options[0], value, where=where)  # ``Config | None``: the nested message names the field
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a str, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[C], data: dict | None, *, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data`` with strict key and type checks.

    Raises:
        ConfigError: unknown key, wrong type, or a range check of ``cls.__post_init__`` failed; the message
            names the field path (e.g. ``methods[2].ewc_lambda``).
    """
    data = {} if data is None else data
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown option for {cls.__name__}; valid options: {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict:
    """Plain-dict (JSON-ready) form of a dataclass config."""
    return dataclasses.asdict(config)


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (the message lists them)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is finite and lies in the given interval."""
    if value != value:  # NaN fails every comparison below
        raise ValueError(f"{name} must be a number, got NaN")
    if value in (float("inf"), float("-inf")):  # an unbounded side still means a finite value
        raise ValueError(f"{name} must be finite, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low if low is not None else '-inf'}, "
                         f"{high if high is not None else 'inf'}{hi}, got {value}")


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_variables(data: Any, variables: Mapping[str, str] | None = None, *, where: str = "") -> Any:
    """``data`` with every ``${NAME}`` (or ``${NAME:-default}``) inside its strings replaced.

    A name is looked up in ``variables`` (e.g. ``--set NAME=VALUE`` on the command line) first, then in the
    environment, then the default after ``:-``. Configs keep machine-specific paths out of the file this way
    (``"dataset_root": "${AM_DATA}/cifar100"``). Only strings change; keys, numbers and booleans are kept.

    Raises:
        ConfigError: a referenced variable is set nowhere and has no default (the message names the variable and
            the config field that uses it).
    """
    import os

    variables = dict(variables or {})
    if isinstance(data, dict):
        return {k: substitute_variables(v, variables, where=f"{where}.{k}" if where else str(k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [substitute_variables(v, variables, where=f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in variables:
            return variables[name]
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where or 'config'}: ${{{name}}} is not set; export {name}=... or pass --set {name}=... "
                          f"(it names a local path or value this config needs)")

    return _VARIABLE.sub(replace, data)


def parse_assignments(items: list[str] | None, flag: str = "--set") -> dict[str, str]:
    """``["NAME=VALUE", ...]`` from the command line as a dict; a malformed item raises ``ConfigError``."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{flag}: expected NAME=VALUE with NAME made of letters, digits and '_', got {item!r}")
        out[name] = value
    return out
