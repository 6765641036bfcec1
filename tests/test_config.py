"""Strict typed construction of dataclass configs (``config.from_dict``) and ``check_range``."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest

from avalanche_merge.config import ConfigError, check_range, from_dict, to_dict


@dataclass
class Inner:
    a: int = 1
    b: float = 0.5

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError(f"a must be >= 0, got {self.a}")


@dataclass
class Outer:
    n: int = 1
    lr: float = 0.1
    flag: bool = False
    name: str = "x"
    xs: list[int] = field(default_factory=list)
    ts: tuple[float, ...] = ()
    maybe: int | None = None
    mode: Literal["fast", "slow"] = "fast"
    inner: Inner = field(default_factory=Inner)
    inners: list[Inner] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n > 100:
            raise ValueError(f"n must be <= 100, got {self.n}")


@dataclass
class WithOptional:
    value: typing.Optional[int] = None  # noqa: UP007, UP045 - the typing.Optional spelling on purpose


def test_defaults_and_full_round_trip():
    assert from_dict(Outer, {}) == Outer()
    assert from_dict(Outer, None) == Outer()
    data = {"n": 3, "lr": 0.25, "flag": True, "name": "run", "xs": [1, 2], "ts": [0.5, 1], "maybe": 7,
            "mode": "slow", "inner": {"a": 2, "b": 1.5}, "inners": [{"a": 4}], "extra": {"k": [1]}}
    cfg = from_dict(Outer, data)
    assert cfg == Outer(n=3, lr=0.25, flag=True, name="run", xs=[1, 2], ts=(0.5, 1.0), maybe=7, mode="slow",
                        inner=Inner(a=2, b=1.5), inners=[Inner(a=4)], extra={"k": [1]})
    assert isinstance(cfg.ts, tuple) and isinstance(cfg.ts[1], float)
    assert isinstance(cfg.inner, Inner)
    assert to_dict(cfg) == {**data, "ts": (0.5, 1.0), "inner": {"a": 2, "b": 1.5}, "inners": [{"a": 4, "b": 0.5}]}


def test_unknown_key_names_key_and_lists_valid_options():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"n": 2, "learning_rate": 0.1})
    msg = str(err.value)
    assert msg.startswith("learning_rate: unknown option for Outer; valid options: ")
    valid = ["extra", "flag", "inner", "inners", "lr", "maybe", "mode", "n", "name", "ts", "xs"]
    assert msg.endswith(str(valid))


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        from_dict(Outer, {"nope": 1})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"n": "3"}, "n: expected an int, got str '3'"),
        ({"n": True}, "n: expected an int, got bool True"),
        ({"n": 3.0}, "n: expected an int, got float 3.0"),
        ({"lr": "0.1"}, "lr: expected a number, got str '0.1'"),
        ({"lr": False}, "lr: expected a number, got bool False"),
        ({"flag": 1}, "flag: expected a bool, got int 1"),
        ({"name": 5}, "name: expected a str, got int 5"),
        ({"xs": 5}, "xs: expected a list, got int 5"),
        ({"xs": [1, "two", 3]}, "xs[1]: expected an int, got str 'two'"),
        ({"ts": [0.5, "x"]}, "ts[1]: expected a number, got str 'x'"),
        ({"maybe": "x"}, "maybe: expected int | None, got 'x'"),
        ({"mode": "medium"}, "mode: must be one of ['fast', 'slow'], got 'medium'"),
        ({"extra": [1]}, "extra: expected a mapping, got list"),
        ({"inner": 3}, "inner: expected a mapping for Inner, got int"),
    ],
)
def test_wrong_types_are_rejected_with_path_and_type(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert str(err.value) == message


def test_int_accepted_for_float_and_converted():
    cfg = from_dict(Outer, {"lr": 2})
    assert cfg.lr == 2.0 and type(cfg.lr) is float
    assert type(from_dict(Inner, {"b": 1}).b) is float


def test_optional_accepts_none_and_value():
    assert from_dict(Outer, {"maybe": None}).maybe is None
    assert from_dict(Outer, {"maybe": 4}).maybe == 4
    assert from_dict(WithOptional, {"value": None}).value is None
    assert from_dict(WithOptional, {"value": 4}).value == 4


def test_optional_spelling_names_inner_type_in_message():
    with pytest.raises(ConfigError, match=r"value: expected .*int"):
        from_dict(WithOptional, {"value": "x"})


def test_nested_dataclass_paths():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"a": "x"}})
    assert str(err.value) == "inner.a: expected an int, got str 'x'"
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"c": 1}})
    assert str(err.value) == "inner.c: unknown option for Inner; valid options: ['a', 'b']"
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inners": [{"a": 1}, {"b": "y"}]})
    assert str(err.value) == "inners[1].b: expected a number, got str 'y'"


def test_where_prefix():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"a": 1.5}}, where="methods[2]")
    assert str(err.value) == "methods[2].inner.a: expected an int, got float 1.5"


def test_non_mapping_data_rejected():
    with pytest.raises(ConfigError, match=r"^Outer: expected a mapping, got list$"):
        from_dict(Outer, [1, 2])


def test_post_init_value_error_wrapped_with_message_kept():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"n": 101})
    assert str(err.value) == "Outer: n must be <= 100, got 101"
    assert isinstance(err.value.__cause__, ValueError)
    assert str(err.value.__cause__) == "n must be <= 100, got 101"


def test_nested_post_init_error_names_nested_path():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"a": -1}})
    assert str(err.value) == "inner: a must be >= 0, got -1"


def test_existing_dataclass_instance_passes_through():
    inner = Inner(a=9)
    assert from_dict(Outer, {"inner": inner}).inner is inner


# ----------------------------------------------------------------------------------------------- check_range


def test_check_range_closed_bounds_include_endpoints():
    check_range("x", 0.0, 0.0, 1.0)
    check_range("x", 1.0, 0.0, 1.0)
    check_range("x", 0.5, 0.0, 1.0)


def test_check_range_closed_bounds_reject_outside():
    with pytest.raises(ValueError, match=re.escape("x must be in [0.0, 1.0], got -0.1")):
        check_range("x", -0.1, 0.0, 1.0)
    with pytest.raises(ValueError, match=re.escape("x must be in [0.0, 1.0], got 1.5")):
        check_range("x", 1.5, 0.0, 1.0)


def test_check_range_open_bounds_exclude_endpoints():
    check_range("p", 0.5, 0.0, 1.0, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=re.escape("p must be in (0.0, 1.0], got 0.0")):
        check_range("p", 0.0, 0.0, 1.0, low_open=True)
    check_range("p", 1.0, 0.0, 1.0, low_open=True)
    with pytest.raises(ValueError, match=re.escape("p must be in [0.0, 1.0), got 1.0")):
        check_range("p", 1.0, 0.0, 1.0, high_open=True)
    check_range("p", 0.0, 0.0, 1.0, high_open=True)
    with pytest.raises(ValueError, match=re.escape("p must be in (0.0, 1.0), got 1.0")):
        check_range("p", 1.0, 0.0, 1.0, low_open=True, high_open=True)


def test_check_range_one_sided():
    check_range("lam", 1e9, low=0.0)
    with pytest.raises(ValueError, match=re.escape("lam must be in [0, inf], got -1")):
        check_range("lam", -1, low=0)
    check_range("t", -1e9, high=3)
    with pytest.raises(ValueError, match=re.escape("t must be in [-inf, 3], got 5")):
        check_range("t", 5, high=3)
    with pytest.raises(ValueError, match=re.escape("t must be in [-inf, 3), got 3")):
        check_range("t", 3, high=3, high_open=True)
    check_range("free", -1e30)
