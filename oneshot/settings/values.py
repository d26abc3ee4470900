"""The declared types and ranges, checked before any work, and the shaping of list values.
"""
from __future__ import annotations

import math

from ..errors import UsageError
from .spelling import spelled
from .table import Entry, entry, get, parts, table



def describe(e: Entry) -> str:
    """The accepted values, in words: "a positive whole number", "in (0, 1)", "one of hf, gguf"."""
    s = e.setting
    if s.choices:
        return "one of " + ", ".join(map(str, s.choices))
    if e.type is bool:
        return "true or false"
    if e.type in (int, float):
        return _range_words(e) + "".join(f" or {w}" for w in s.words)
    if e.type is tuple:
        return "a list" + (" of whole numbers" if e.item is int else " of names")
    if e.type is dict:
        return "a mapping of names to values"
    return "a directory path" if s.path else "a source name" if s.source else "given as text"


def _range_words(e: Entry) -> str:
    s = e.setting
    low = (s.minimum, "[") if s.minimum is not None else (s.above, "(") if s.above is not None else None
    high = (s.maximum, "]") if s.maximum is not None else (s.below, ")") if s.below is not None else None
    if e.type is int:
        if low and low[0] == 1 and low[1] == "[" and not high:
            return "a positive whole number"
        if low and high:
            last = high[0] if high[1] == "]" else high[0] - 1
            return f"a whole number from {low[0]:g} to {last:.0f}"
        return f"a whole number of at least {low[0]:g}" if low else "a whole number"
    if low and high:
        return f"a number in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    if low:
        return "a positive number" if low == (0, "(") else f"a number of at least {low[0]:g}"
    return "a number"


def check_value(e: Entry, value) -> None:
    """UsageError in one line, naming the field as the caller spells it, when `value` is not of its type
    or outside its declared range."""
    if value is None:
        if e.nullable:
            return
        raise UsageError(f"{spelled(e.path)} must be {describe(e)}, not empty")
    s = e.setting
    bad = None
    if e.type is bool:
        if not isinstance(value, bool):
            bad = f"the text {value!r} (write true or false without quotes)" if isinstance(value, str) else repr(value)
    elif e.type in (int, float):
        if isinstance(value, str) and value in s.words:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float) if e.type is float else int) or \
                (isinstance(value, float) and not math.isfinite(value)):
            bad = repr(value)
        elif (s.minimum is not None and value < s.minimum) or (s.above is not None and value <= s.above) or \
                (s.maximum is not None and value > s.maximum) or \
                (s.below is not None and value >= s.below):
            bad = repr(value)
    elif e.type is tuple:
        if not isinstance(value, (tuple, list)):
            bad = repr(value)
        elif e.item is int and any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            bad = repr(value)
        elif e.item is str and any(not isinstance(v, str) or not v.strip() for v in value):
            bad = repr(value)
    elif e.type is dict:
        if not isinstance(value, dict):
            bad = repr(value)
    else:
        if not isinstance(value, str) or not value.strip():
            bad = repr(value)
        elif s.choices is not None and value not in s.choices:
            raise UsageError(f"unknown {spelled(e.path)} {value!r}; choose {', '.join(map(str, s.choices))}")
    if bad is not None:
        raise UsageError(f"{spelled(e.path)} must be {describe(e)} (got {bad})")


def check_values(spec) -> None:
    """Every declared setting's type and range (no file, model or device is looked at)."""
    for name, info in parts().items():
        value = getattr(spec, name)
        if value is None and info["optional"]:
            continue
        if not isinstance(value, info["factory"]):
            raise UsageError(f"{name} must be a {info['factory'].__name__}, not {type(value).__name__}")
    for e in table():
        if e.part is not None and getattr(spec, e.part) is None:
            continue
        check_value(e, get(spec, e.path))


def split_list(value, e: Entry, where: str) -> tuple:
    """A list setting from "a,b" or a list; 'none' (or nothing) is the empty list for sources."""
    if isinstance(value, str):
        if e.setting.source and value.strip().lower() in ("", "none"):
            return ()
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, (list, tuple)):
        items = [item.strip() if isinstance(item, str) else item for item in value]
    else:
        raise UsageError(f"{where} must be {describe(e)}, not {value!r}")
    if e.item is int:
        converted = []
        for item in items:
            if isinstance(item, str) and item.isdigit():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, int):
                raise UsageError(f"{where} takes whole numbers, e.g. 50,100 (got {value!r})")
            converted.append(item)
        items = converted
    for item in items:
        if e.item is str and (not isinstance(item, str) or not item):
            raise UsageError(f"{where}: {item!r} is not a name")
    return tuple(dict.fromkeys(items)) if e.setting.source else tuple(items)


def check_enabled(values: dict, base, command: str) -> None:
    """A setting of an optional part given without the setting that creates the part: one line."""
    for name, info in parts().items():
        if not info["optional"] or getattr(base, name) is not None:
            continue
        given = [p for p in values if p.startswith(name + ".")]
        starters = [e for e in table() if e.part == name and e.setting.enables]
        if given and not any(e.path in values for e in starters):
            first = entry(given[0])
            show = (lambda e: e.flag(command)) if command else (lambda e: e.path)
            raise UsageError(f"{show(first) or first.path} applies to {name}; add "
                             f"{' or '.join(show(e) or e.path for e in starters)} N")
