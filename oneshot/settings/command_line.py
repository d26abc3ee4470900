"""The command line from the table: one argument per setting a command takes, the given flags applied to
a RunSpec, and the command line that runs a RunSpec (recorded with every result).
"""
from __future__ import annotations

from ..errors import UsageError
from .table import Entry, entries, get, with_values
from .values import check_enabled, describe, split_list


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
        if e.is_switch and e.nullable:  # unset means "decide for me": --flag and --no-flag both say
            kwargs["action"] = argparse.BooleanOptionalAction
        elif e.is_switch:
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
            values[e.path] = split_list(raw, e, flag)
        elif e.type in (int, float) and e.setting.words:
            values[e.path] = raw if raw in e.setting.words else _number(raw, e, flag)
        else:
            values[e.path] = raw
    check_enabled(values, base, command)
    return with_values(base, values)


def _number(text: str, e: Entry, flag: str):
    try:
        return e.type(text)
    except ValueError:
        raise UsageError(f"{flag} must be {describe(e)}, not {text!r}") from None






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
        if e.is_switch and e.nullable:
            argv.append(flag if value else "--no-" + flag[2:])
        elif e.is_switch:
            if bool(value) != e.setting.negate:
                argv.append(flag)
        elif e.type is dict:
            for name, option in value.items():
                argv += [flag, f"{name}={option}"]
        else:
            argv += [flag, _format(e, value)]
    return argv
