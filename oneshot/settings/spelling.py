"""How messages name a setting for the caller: a command's flag, a config key or a sweep key. The
active spelling is a context variable that `run()` sets, so any subsystem can name a field the caller's way.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

from .table import entry



@dataclass(frozen=True)
class Spelling:
    """How the caller spells a setting: a command's flags, a run config's keys, or a sweep config's keys."""

    style: str = "key"  # flag | key | sweep
    command: str = "prune"
    where: str = ""  # a config file, for messages that name it
    from_config: frozenset = frozenset()  # with flags: the settings a run config gave (named by their keys)

    def __call__(self, path: str) -> str:
        try:
            e = entry(path)
        except KeyError:
            return path
        if self.style == "flag" and path not in self.from_config:
            flag = e.flag(self.command)
            if flag is not None:
                return flag
        if self.style == "sweep" and e.setting.sweep:
            return e.setting.sweep
        return path

    def active(self):
        return _Active(self)


class _Active:
    def __init__(self, spelling: Spelling):
        self.spelling, self.token = spelling, None

    def __enter__(self):
        self.token = _SPELLING.set(self.spelling)
        return self.spelling

    def __exit__(self, *exc):
        _SPELLING.reset(self.token)


FLAGS = Spelling("flag", "prune")
KEYS = Spelling("key")
_SPELLING: contextvars.ContextVar[Spelling] = contextvars.ContextVar("oneshot_spelling", default=KEYS)


def spelled(path: str) -> str:
    """`path` as the caller of the current run spells it (a flag, a config key or a Python attribute)."""
    return _SPELLING.get()(path)


def spelling() -> Spelling:
    return _SPELLING.get()
