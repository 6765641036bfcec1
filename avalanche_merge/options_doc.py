"""The option reference of a config dataclass: name, type, default and help, read from the class itself.

``avalanche-merge describe METHOD`` prints it, and the documentation site's config reference is generated from it
(``docs/gen_reference.py``), so the reference can never disagree with the code. Help texts come from the
``Args:`` (or ``Attributes:``) section of the class docstring (Google style), where each option states its range.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

_SECTION = re.compile(r"^\s*(Args|Attributes|Arguments|Parameters):\s*$")
_ITEM = re.compile(r"^(\s*)([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)*)(?:\s*\([^)]*\))?:\s?(.*)$")


def docstring_items(obj: Any) -> dict[str, str]:
    """``{name: help}`` from the ``Args:``/``Attributes:`` sections of ``obj``'s own docstring (a class's, not
    inherited; continuation lines joined; ``a, b: text`` gives both names the text)."""
    raw = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    doc = inspect.cleandoc(raw or "")
    items: dict[str, str] = {}
    in_section, indent, current = False, None, None
    for line in doc.splitlines():
        if _SECTION.match(line):
            in_section, indent, current = True, None, None
            continue
        if not in_section:
            continue
        if not line.strip():
            current = None
            continue
        m = _ITEM.match(line)
        lead = len(line) - len(line.lstrip())
        if lead == 0 and not m:
            in_section = False  # prose after the section
            continue
        if m and (indent is None or lead == indent):
            indent = lead
            current = [n.strip() for n in m.group(2).split(",")]
            for name in current:
                items[name] = m.group(3).strip()
        elif current is not None and lead > (indent or 0):
            for name in current:
                items[name] += " " + line.strip()
        elif lead == 0:
            in_section = False
    return items


def _type_text(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}()"
    return repr(value)


def option_reference(cls: type) -> list[dict[str, str]]:
    """One ``{"name", "type", "default", "help"}`` row per init field of the dataclass ``cls``.

    Raises:
        TypeError: ``cls`` is not a dataclass.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to its text
        hints = {}
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring overrides its bases'
        if dataclasses.is_dataclass(klass):
            helps.update({k: v for k, v in docstring_items(klass).items() if v})
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        rows.append({"name": f.name, "type": _type_text(hints.get(f.name, f.type)), "default": _default_text(f),
                     "help": helps.get(f.name, "")})
    return rows


def format_options(cls: type, *, indent: str = "  ") -> str:
    """Plain-text table of :func:`option_reference` for the terminal."""
    rows = option_reference(cls)
    if not rows:
        return f"{indent}(no options)"
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{indent}{r['name']:<{width}}  {r['type']} = {r['default']}")
        if r["help"]:
            lines.append(f"{indent}{'':<{width}}    {r['help']}")
    return "\n".join(lines)


def markdown_options(cls: type) -> str:
    """Markdown table of :func:`option_reference` (the documentation site's config reference)."""
    rows = option_reference(cls)
    if not rows:
        return "No options."
    out = ["| option | type | default | description |", "|---|---|---|---|"]
    for r in rows:
        cells = [f"`{r['name']}`", f"`{r['type']}`", f"`{r['default']}`", r["help"] or ""]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


__all__ = ["docstring_items", "format_options", "markdown_options", "option_reference"]
