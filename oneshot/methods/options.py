"""Declared options: each method (and each allocation) lists its tunable settings next to its maths.

An `Option` is a name, a type, a default and an allowed range. `check_options` turns what a user gave
(strings from the command line, numbers or booleans from YAML or Python) into typed values, or raises
OptionError with one line naming the allowed options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError


class OptionError(UsageError):
    """An unknown option or a value out of its range; the message names what is allowed."""


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # int, float, bool or str
    default: object
    help: str = ""
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    choices: tuple | None = None
    above: float | None = None  # exclusive lower bound, for "> 0"

    def describe(self) -> str:
        bounds = []
        if self.choices:
            bounds.append("|".join(map(str, self.choices)))
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        return f"{self.name} ({self.type.__name__}{', ' + ', '.join(bounds) if bounds else ''}; default {self.default})"

    def convert(self, value, owner: str):
        """The typed value, or OptionError naming the option and what it accepts."""
        bad = OptionError(f"{owner} option {self.name}={value} is not valid; expected {self.describe()}")
        if self.type is bool:
            if isinstance(value, bool):
                typed = value
            elif isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                typed = value.strip().lower() in ("true", "1", "yes", "on")
            else:
                raise bad
        elif self.type is int:
            if isinstance(value, bool):
                raise bad
            if isinstance(value, int):
                typed = value
            elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                typed = int(value)
            else:
                raise bad
        elif self.type is float:
            if isinstance(value, bool):
                raise bad
            try:
                typed = float(value)
            except (TypeError, ValueError):
                raise bad from None
            if not math.isfinite(typed):
                raise bad
        else:
            if not isinstance(value, str) or not value.strip():
                raise bad
            typed = value.strip()
        if self.choices is not None and typed not in self.choices:
            raise bad
        if self.above is not None and not typed > self.above:
            raise bad
        if self.minimum is not None and typed < self.minimum:
            raise bad
        if self.maximum is not None and typed > self.maximum:
            raise bad
        return typed


def check_options(owner: str, declared: tuple[Option, ...], given: dict | None) -> dict:
    """Given options checked against the declared ones; returns only what was given, typed."""
    by_name = {option.name: option for option in declared}
    typed = {}
    for name, value in (given or {}).items():
        if name not in by_name:
            allowed = ", ".join(o.describe() for o in declared) if declared else "none"
            raise OptionError(f"{owner} has no option {name!r}; its options: {allowed}")
        typed[name] = by_name[name].convert(value, owner)
    return typed


def defaults(declared: tuple[Option, ...]) -> dict:
    return {option.name: option.default for option in declared}
