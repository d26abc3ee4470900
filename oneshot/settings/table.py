"""The declarations: `setting(...)` and `part(...)` on a dataclass's fields, and the table read from them
(one Entry per setting, in declaration order) once spec.py registers RunSpec.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field


COMMANDS = ("prune", "eval", "recover")
ALL = COMMANDS


@dataclass(frozen=True)
class Setting:
    help: str
    flag: str | None = None  # the prune command's flag (or the first command's); None: YAML and Python only
    commands: tuple = ("prune",)  # the commands that take it as a flag
    flags: dict = field(default_factory=dict)  # command -> its own spelling, where it differs
    metavar: str | None = None
    choices: tuple | None = None
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    maximum: float | None = None  # inclusive
    below: float | None = None  # exclusive upper bound
    words: tuple = ()  # words a number may be given as instead ("auto")
    shown_default: str | None = None  # what the default means, where the value alone does not say
    owner: str = "run"  # the subsystem that checks it beyond its type and range (and its --help group)
    keyed: bool = True  # part of what decides a run's result (a sweep's run key)
    path: bool = False  # a path: a config resolves it relative to the config's directory
    source: bool = False  # data source names: file:/tokens: paths resolved like paths
    sweep: str | None = None  # a sweep config's plural grid key ("methods"), if it has one
    always: bool = False  # written in a recorded command line even at its default
    baseline: bool = True  # a sweep's dense baseline shares it (False: the baseline keeps the default)
    negate: bool = False  # a switch whose flag sets False (--quiet for progress)
    yaml: bool = True  # a run config may give it
    aliases: tuple = ()  # other YAML keys accepted for it ("calibration.seed")
    enables: bool = False  # giving it creates its optional part (recover.steps creates the recovery)
    joins: bool = False  # text holding a comma-separated list: a config's list is joined, not a grid axis


def setting(default, help: str, **declared):
    """A dataclass field carrying its Setting (a mutable default becomes a factory)."""
    meta = {"setting": Setting(help, **declared)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def part(factory, help: str, optional: bool = False):
    """A dataclass field holding a group of settings (calibration, evaluation, recovery); an optional
    part is None until one of its `enables` settings is given."""
    meta = {"part": factory, "help": help, "optional": optional}
    return field(default=None, metadata=meta) if optional else field(default_factory=factory, metadata=meta)


@dataclass(frozen=True)
class Entry:
    """One row of the table: where the field lives (`path`, "recover.steps"), its Python type and default."""

    path: str
    setting: Setting
    type: type  # int, float, bool, str, tuple, dict
    item: type | None  # the element type of a tuple
    nullable: bool
    default: object
    part: str | None  # "recover" for recover.steps

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def flag(self, command: str) -> str | None:
        if command not in self.setting.commands:
            return None
        return self.setting.flags.get(command, self.setting.flag)

    @property
    def is_switch(self) -> bool:
        return self.type is bool


def _parse_type(hint) -> tuple[type, type | None, bool]:
    """(type, element type, whether None is allowed) from a field's annotation."""
    import types

    nullable, main = False, hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        nullable = type(None) in args
        main = next(a for a in args if a is not type(None))
    origin = typing.get_origin(main) or main
    if origin is tuple:
        inner = [a for a in typing.get_args(main) if a is not Ellipsis]
        return tuple, (inner[0] if inner else str), nullable
    return origin, None, nullable


_ROOT: list = []  # the run's dataclass (spec.RunSpec), registered by spec.py when it is defined
_TABLE: list = []


def register(root: type) -> type:
    """Make `root` (RunSpec) the run whose settings the table holds."""
    _ROOT[:] = [root]
    _TABLE[:] = _walk(root)
    return root


def root() -> type:
    if not _ROOT:
        raise RuntimeError("oneshot.spec registers the run's settings; import it first")
    return _ROOT[0]


def table() -> list[Entry]:
    """Every declared setting of the run and its parts, in declaration order."""
    root()
    return _TABLE


def _walk(root: type, prefix: str = "", part_name: str | None = None) -> list[Entry]:
    hints = typing.get_type_hints(root)
    entries = []
    for f in dataclasses.fields(root):
        if "part" in f.metadata:
            entries += _walk(f.metadata["part"], f"{prefix}{f.name}.", f.name)
        elif "setting" in f.metadata:
            kind, item, nullable = _parse_type(hints[f.name])
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            entries.append(Entry(prefix + f.name, f.metadata["setting"], kind, item, nullable, default, part_name))
    return entries


def entries(command: str | None = None) -> list[Entry]:
    """The table, or the settings one command takes as flags."""
    return [e for e in table() if command is None or command in e.setting.commands]


def entry(path: str) -> Entry:
    for e in table():
        if e.path == path:
            return e
    raise KeyError(path)


def parts() -> dict[str, dict]:
    """Part name -> {"factory", "optional", "help"} for RunSpec's groups of settings."""
    return {f.name: {"factory": f.metadata["part"], "optional": f.metadata["optional"], "help": f.metadata["help"]}
            for f in dataclasses.fields(root()) if "part" in f.metadata}


# ---- values on an object -----------------------------------------------------------------------------

def get(spec, path: str):
    """The value at `path`, or None when its optional part is absent."""
    value = spec
    for name in path.split("."):
        if value is None:
            return None
        value = getattr(value, name)
    return value


def with_values(spec, values: dict):
    """`spec` with `values` ({path: value}) set; optional parts are created as needed."""
    by_part: dict[str | None, dict] = {}
    for path, value in values.items():
        head, _, tail = path.partition(".")
        if tail:
            by_part.setdefault(head, {})[tail] = value
        else:
            by_part.setdefault(None, {})[head] = value
    changes = dict(by_part.pop(None, {}))
    declared = parts()
    for name, fields in by_part.items():
        current = getattr(spec, name)
        if current is None:
            current = declared[name]["factory"]()
        changes[name] = dataclasses.replace(current, **fields)
    return dataclasses.replace(spec, **changes)
