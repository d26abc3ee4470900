"""Run configs (YAML): their keys from the table, a mapping read into a RunSpec, and a RunSpec written as
one (the record's `settings`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .table import Entry, entry, get, parts, root, table, with_values
from .values import check_enabled, split_list



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
    check_enabled(values, base, command="")
    return with_values(base, values)


def shape(e: Entry, value, where: str, relative_to: Path | None):
    """A config value in the shape its setting holds: lists split, texts joined, paths resolved."""
    if e.type is tuple:
        value = split_list(value, e, where)
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
