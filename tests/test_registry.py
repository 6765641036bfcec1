"""The validated name registry behind methods, benchmarks, backbones and domains."""

from __future__ import annotations

import pytest

from avalanche_merge.registry import Registry


@pytest.fixture
def reg() -> Registry:
    return Registry("widget")


def test_add_get_names_remove(reg):
    a, b = object(), object()
    assert reg.add("zeta", a) is a
    assert reg.add("alpha_2", b) is b
    assert reg.get("zeta") is a
    assert reg.get("alpha_2") is b
    assert reg.names() == ["alpha_2", "zeta"]
    assert list(reg) == ["alpha_2", "zeta"]
    assert len(reg) == 2
    assert "zeta" in reg and "nope" not in reg and 3 not in reg
    reg.remove("zeta")
    assert reg.names() == ["alpha_2"]
    assert "zeta" not in reg
    assert len(reg) == 1
    # the name is free again
    reg.add("zeta", b)
    assert reg.get("zeta") is b


def test_duplicate_name_raises_and_keeps_first(reg):
    first = object()
    reg.add("thing", first)
    with pytest.raises(ValueError, match=r"widget 'thing' is already registered"):
        reg.add("thing", object())
    assert reg.get("thing") is first
    assert len(reg) == 1


@pytest.mark.parametrize("name", ["CamelCase", "has-dash", "1starts_digit", "_private", "", "with space", "Upper"])
def test_non_snake_case_name_raises(reg, name):
    with pytest.raises(ValueError, match=r"widget name must be lowercase snake_case") as err:
        reg.add(name, object())
    assert repr(name) in str(err.value)
    assert name not in reg
    assert len(reg) == 0


def test_unknown_get_lists_valid_names(reg):
    reg.add("beta", 1)
    reg.add("alpha", 2)
    with pytest.raises(ValueError) as err:
        reg.get("gamma")
    assert str(err.value) == "unknown widget 'gamma'; valid widgets: alpha, beta"


def test_unknown_get_on_empty_registry(reg):
    with pytest.raises(ValueError, match=r"unknown widget 'x'; valid widgets: \(none registered\)"):
        reg.get("x")


def test_remove_unknown_raises(reg):
    reg.add("alpha", 1)
    with pytest.raises(ValueError, match=r"unknown widget 'beta'; valid widgets: alpha"):
        reg.remove("beta")
    assert reg.names() == ["alpha"]


@pytest.mark.parametrize("bad", [1, None, b"bytes", ("a",)])
def test_non_str_name_raises_type_error(reg, bad):
    with pytest.raises(TypeError, match=rf"widget name must be a str, got {type(bad).__name__}"):
        reg.add(bad, object())
    with pytest.raises(TypeError, match=rf"widget name must be a str, got {type(bad).__name__}"):
        reg.get(bad)
    assert len(reg) == 0


def test_decorator_form(reg):
    @reg.register("double")
    def double(x):
        return 2 * x

    # the decorator returns the object itself
    assert double(4) == 8
    assert reg.get("double") is double
    assert reg.names() == ["double"]

    with pytest.raises(ValueError, match="already registered"):

        @reg.register("double")
        def other(x):
            return x

    with pytest.raises(ValueError, match="snake_case"):

        @reg.register("Bad")
        class Bad:
            pass


def test_kind_appears_in_messages():
    r = Registry("benchmark")
    with pytest.raises(ValueError, match=r"unknown benchmark 'x'; valid benchmarks:"):
        r.get("x")
