"""The declared table of run settings. Each field of a run is declared once, in spec.py, with a
`setting(...)`: its default, help text, CLI flag (per command where they differ), range or choices, and
the subsystem that checks it further. Everything that names or reads a setting derives from that:

- the CLI's arguments (`add_arguments`) and their values in a RunSpec (`apply_arguments`),
- a run config's YAML keys (`from_mapping`) and a sweep's shared and grid keys (sweep/config.py),
- the command line a record keeps (`to_argv`) and the run's settings in it (`to_mapping`),
- how messages spell a field for the caller (`Spelling`, `spelled`): a flag, a YAML key or a sweep key,
- the declared types and ranges, checked before any work (`check_values`),
- docs/cli.md (cli/reference.py).

A leaf package: it imports nothing of oneshot's but the errors.
"""
from .command_line import add_arguments, apply_arguments, to_argv
from .configs import (check_keys, flatten, from_mapping, resolve_path, resolve_source, shape, to_mapping,
                      yaml_keys)
from .spelling import FLAGS, KEYS, Spelling, spelled, spelling
from .table import (ALL, COMMANDS, Entry, Setting, entries, entry, get, part, parts, register, root, setting, table,
                    with_values)
from .values import check_enabled, check_value, check_values, describe, split_list

__all__ = ["add_arguments", "apply_arguments", "to_argv", "check_keys", "flatten", "from_mapping", "resolve_path",
           "resolve_source", "shape", "to_mapping", "yaml_keys", "FLAGS", "KEYS", "Spelling", "spelled", "spelling",
           "ALL", "COMMANDS", "Entry", "Setting", "entries", "entry", "get", "part", "parts", "register", "root",
           "setting", "table", "with_values", "check_enabled", "check_value", "check_values", "describe",
           "split_list"]
