"""The option reference read from config dataclasses (``describe``, ``list --verbose``, the docs' reference)."""

from dataclasses import dataclass, field

import pytest

from avalanche_merge.options_doc import format_options, markdown_options, option_reference


@dataclass
class _Base:
    """Base.

    Args:
        rate: the rate, > 0.
        first, second: two options that share a text, continued
            on the next line.
    """

    rate: float = 0.1
    first: int = 1
    second: int = 2


@dataclass
class _Child(_Base):
    """Child.

    Args:
        rate: the child's rate, in (0, 1].
        names: a list.

    Some prose after the section: not an option.
    """

    names: list[str] = field(default_factory=lambda: ["a"])
    _private: int = 0


def test_rows_have_type_default_and_help_from_own_and_inherited_docstrings():
    rows = {r["name"]: r for r in option_reference(_Child)}
    assert list(rows) == ["rate", "first", "second", "names"]
    assert rows["rate"]["help"] == "the child's rate, in (0, 1]."  # the subclass overrides its base
    assert rows["second"]["help"] == "two options that share a text, continued on the next line."
    assert rows["names"]["default"] == "['a']" and rows["names"]["type"] == "list[str]"
    assert rows["rate"]["type"] == "float" and rows["rate"]["default"] == "0.1"


def test_text_and_markdown_forms():
    text = format_options(_Child)
    assert "rate" in text and "float = 0.1" in text and "Some prose" not in text
    md = markdown_options(_Child)
    assert md.splitlines()[0] == "| option | type | default | description |"
    assert "| `names` | `list[str]` | `['a']` | a list. |" in md


def test_not_a_dataclass_is_refused():
    with pytest.raises(TypeError, match="dataclass"):
        option_reference(int)


def test_every_registered_method_documents_every_option():
    from avalanche_merge.strategies import METHODS
    from avalanche_merge.strategies.registry import TrainConfig

    undocumented = {}
    for name in METHODS.names():
        rows = option_reference(METHODS.get(name).config_cls)
        missing = [r["name"] for r in rows if not r["help"]]
        if missing:
            undocumented[name] = missing
    assert not undocumented, f"options without help text: {undocumented}"
    assert all(r["help"] for r in option_reference(TrainConfig))
