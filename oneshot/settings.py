"""The declared table of run settings. Each field of a run is declared once, in spec.py, with a
`setting(...)`: its default, help text, CLI flag (per command where they differ), range or choices, and
the subsystem that checks it further. Everything that names or reads a setting derives from that:

- the CLI's arguments (`add_arguments`) and their values in a RunSpec (`apply_arguments`),
- a run config's YAML keys (`from_mapping`) and a sweep's shared and grid keys (sweep/config.py),
- the command line a record keeps (`to_argv`) and the run's settings in it (`to_mapping`),
- how messages spell a field for the caller (`Spelling`, `spelled`): a flag, a YAML key or a sweep key,
- the declared types and ranges, checked before any work (`check_values`),
- docs/cli.md (cli/reference.py).

A leaf: it imports nothing of oneshot's but the errors.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

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


# ---- spelling ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spelling:
    """How the caller spells a setting: a command's flags, a run config's keys, or a sweep config's keys."""

    style: str = "key"  # flag | key | sweep
    command: str = "prune"
    where: str = ""  # a config file, for messages that name it

    def __call__(self, path: str) -> str:
        try:
            e = entry(path)
        except KeyError:
            return path
        if self.style == "flag":
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


# ---- checking the declared types and ranges ----------------------------------------------------------

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


# ---- the command line ----------------------------------------------------------------------------------

def _dest(e: Entry) -> str:
    return "setting:" + e.path


def add_arguments(parser, command: str) -> None:
    """One argument per setting that `command` takes, grouped by owner; values land in `setting:PATH`."""
    import argparse

    groups = {}
    for e in entries(command):
        owner = e.setting.owner
        if owner not in groups:
            groups[owner] = parser if owner == "run" else parser.add_argument_group(_GROUP_TITLES.get(owner, owner))
        help_text = e.setting.help + _default_note(e)
        kwargs = dict(dest=_dest(e), help=help_text.replace("%", "%%"), default=argparse.SUPPRESS)
        if e.is_switch:
            kwargs["action"] = "store_false" if e.setting.negate else "store_true"
        elif e.type is dict:
            kwargs.update(action="append", metavar=e.setting.metavar or "NAME=VALUE")
        else:
            kwargs["metavar"] = e.setting.metavar or _metavar(e)
            if e.type in (int, float) and not e.setting.words:
                kwargs["type"] = e.type
        groups[owner].add_argument(e.flag(command), **kwargs)


_GROUP_TITLES = {
    "pruning": "what to prune", "calibration": "calibration", "evaluate": "evaluation", "engine": "engine",
    "models": "model and device", "outputs": "outputs", "quantize": "quantisation and export",
    "recover": "recovery (fine-tuning with the zeros locked)", "checkpoint": "long runs",
}


def _metavar(e: Entry) -> str:
    if e.setting.choices:
        return "|".join(map(str, e.setting.choices))
    return {int: "N", float: "X", tuple: "A,B"}.get(e.type, e.name.upper())


def _default_note(e: Entry) -> str:
    shown = e.setting.shown_default
    if shown is None:
        if e.is_switch or e.default is None or e.default in ((), {}):
            return ""
        shown = _format(e, e.default)
    return f" (default: {shown})"


def _format(e: Entry, value) -> str:
    if e.type is tuple:
        return ",".join(map(str, value)) or "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def apply_arguments(given: dict, base, command: str):
    """`base` with every flag that was given on `command`'s line (argparse's namespace as a dict)."""
    values = {}
    for e in entries(command):
        if _dest(e) not in given:
            continue
        raw = given[_dest(e)]
        flag = e.flag(command)
        if e.type is dict:
            options = dict(get(base, e.path) or {})
            seen = set()
            for item in raw:
                name, sep, value = item.partition("=")
                name = name.strip()
                if not sep or not name:
                    raise UsageError(f"{flag} {item!r} is not NAME=VALUE (for example {flag} percdamp=0.1)")
                if name in seen:
                    raise UsageError(f"{flag} {name} is given twice; give each option once")
                seen.add(name)
                options[name] = value.strip()
            values[e.path] = options
        elif e.type is tuple:
            values[e.path] = _split(raw, e, flag)
        elif e.type in (int, float) and e.setting.words:
            values[e.path] = raw if raw in e.setting.words else _number(raw, e, flag)
        else:
            values[e.path] = raw
    _check_enabled(values, base, command)
    return with_values(base, values)


def _number(text: str, e: Entry, flag: str):
    try:
        return e.type(text)
    except ValueError:
        raise UsageError(f"{flag} must be {describe(e)}, not {text!r}") from None


def _split(value, e: Entry, where: str) -> tuple:
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


def _check_enabled(values: dict, base, command: str) -> None:
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


# ---- run configs (YAML) --------------------------------------------------------------------------------

def yaml_keys(prefix: str = "") -> list[str]:
    """The keys a run config takes at one level (top level, or inside `calibration.` and so on)."""
    keys = []
    for e in table():
        if not e.setting.yaml:
            continue
        for path in (e.path, *e.setting.aliases):
            if path.startswith(prefix):
                head = path[len(prefix):].split(".")[0]
                if head not in keys:
                    keys.append(head)
    return keys


def check_keys(mapping, allowed, prefix: str, where: str) -> None:
    if not isinstance(mapping, dict):
        raise UsageError(f"{where}: {prefix.rstrip('.') or 'the top level'} must be a mapping with keys "
                         f"{', '.join(allowed)}")
    for key in mapping:
        if key not in allowed:
            raise UsageError(f"{where}: unknown key {prefix + str(key)!r}; allowed keys"
                             f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(allowed)}")


def flatten(data: dict, where: str, exclude: tuple = ()) -> dict:
    """A config mapping as {path: value}, every key checked against the table (aliases resolved)."""
    check_keys(data, [k for k in yaml_keys() if k not in exclude], "", where)
    by_path = {}
    for e in table():
        for path in (e.path, *e.setting.aliases):
            by_path[path] = e
    flat = {}
    for key, value in data.items():
        if key in parts() or any(p.startswith(key + ".") for p in by_path if "." in p and p.split(".")[0] == key
                                 and key not in by_path):
            if value is None:
                continue
            check_keys(value, yaml_keys(key + "."), key + ".", where)
            for inner, inner_value in value.items():
                flat[f"{key}.{inner}"] = inner_value
        else:
            flat[key] = value
    resolved = {}
    for path, value in flat.items():
        e = by_path[path]
        if e.path in resolved and path != e.path:
            raise UsageError(f"{where}: {path} and {e.path} are the same setting; give it once")
        resolved[e.path] = value
    return resolved


def from_mapping(data: dict, where: str, base=None, relative_to: Path | None = None, exclude: tuple = ()):
    """A RunSpec from a run config's mapping (`oneshot prune --config RUN.yaml`) over `base` (default: the
    defaults): keys checked here, values by check_values and the plan; paths are relative to `relative_to`."""
    base = base if base is not None else root()()
    values = {}
    for path, value in flatten(data, where, exclude).items():
        if value is None:
            continue
        values[path] = shape(entry(path), value, f"{where}: {path}", relative_to)
    _check_enabled(values, base, command="")
    return with_values(base, values)


def shape(e: Entry, value, where: str, relative_to: Path | None):
    """A config value in the shape its setting holds: lists split, texts joined, paths resolved."""
    if e.type is tuple:
        value = _split(value, e, where)
        if e.setting.source:
            value = tuple(resolve_source(v, relative_to) for v in value)
    elif e.type is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{where} must map names to values")
        value = dict(value)
    elif e.setting.joins and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(v.strip() for v in value)
    if e.type is str and isinstance(value, str):
        if e.setting.path:
            value = resolve_path(value, relative_to)
        elif e.setting.source:
            value = resolve_source(value, relative_to)
    return value


def resolve_source(source: str, relative_to: Path | None) -> str:
    """file:/tokens: paths in a config are relative to the config's directory."""
    source = source.strip()
    for prefix in ("file:", "tokens:"):
        if source.startswith(prefix) and relative_to is not None:
            return prefix + resolve_path(source[len(prefix):], relative_to)
    return source


def resolve_path(path: str, relative_to: Path | None) -> str:
    target = Path(path).expanduser()
    if relative_to is not None and not target.is_absolute():
        target = relative_to / target
    return str(target)


def to_mapping(spec, only_changed: bool = False, keyed_only: bool = False) -> dict:
    """The spec as a run config's mapping (what `--config` reads back): parts nested, tuples as lists;
    `keyed_only`: only the settings that decide the result (not where it is written, nor the device)."""
    out: dict = {}
    for e in table():
        if not e.setting.yaml or (e.part is not None and getattr(spec, e.part) is None):
            continue
        if keyed_only and not e.setting.keyed:
            continue
        value = get(spec, e.path)
        if only_changed and value == e.default:
            continue
        value = list(value) if isinstance(value, tuple) else value
        if e.part is None:
            out[e.path] = value
        else:
            out.setdefault(e.part, {})[e.name] = value
    return out


def to_argv(spec) -> list[str]:
    """The `oneshot` command line that runs `spec` (recorded with every result)."""
    command = spec.kind
    argv = ["oneshot", command]
    for e in entries(command):
        if e.part is not None and getattr(spec, e.part) is None:
            continue
        value = get(spec, e.path)
        if value is None or (value == e.default and not e.setting.always):
            continue
        flag = e.flag(command)
        if e.is_switch:
            if bool(value) != e.setting.negate:
                argv.append(flag)
        elif e.type is dict:
            for name, option in value.items():
                argv += [flag, f"{name}={option}"]
        else:
            argv += [flag, _format(e, value)]
    return argv
