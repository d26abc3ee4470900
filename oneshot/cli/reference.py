"""docs/cli.md, generated from the parsers (which the settings table builds) and the sweep's keys:

    python -m oneshot.cli.reference > docs/cli.md

tests/test_settings.py fails when the committed file differs from what this prints."""
from __future__ import annotations

from ..settings import describe, entry, table


def _cell(text) -> str:
    return " ".join(str(text).replace("%%", "%").split()).replace("|", "\\|")


def markdown() -> str:
    from ..spec import RunSpec  # noqa: F401  (registers the settings table)
    from ..sweep.config import PER_RUN, config_keys, grid_keys
    from . import build_parser

    parser = build_parser()
    lines = ["# The command line", "",
             "Generated from the settings table (`oneshot/spec.py`) by",
             "`python -m oneshot.cli.reference > docs/cli.md`; a test fails when this file is stale. Each setting has",
             "one flag per command, one YAML key in a run config (`oneshot prune --config RUN.yaml`; a key with a dot",
             "is a nested mapping, `calibration: {nsamples: 32}`) and the same key in a sweep config, and messages",
             "spell it the way the caller gave it.", ""]
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {action.dest: action.help for action in subparsers._choices_actions}
    for name, sub in subparsers.choices.items():
        lines += [f"## oneshot {name}", "", _cell(sub.description or helps.get(name, "")), "",
                  "| flag | YAML key | value | what it does |", "|---|---|---|---|"]
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            path = action.dest[len("setting:"):] if action.dest.startswith("setting:") else None
            key = f"`{path}`" if path and entry(path).setting.yaml else ""
            value = "" if action.nargs == 0 else _cell(action.metavar or action.dest.upper())
            lines.append(f"| `{', '.join(action.option_strings)}` | {key} | {value} | {_cell(action.help or '')} |")
        lines.append("")
    lines += ["## Run configs and sweep configs", "",
              "A run config takes every YAML key above (`calibration.seed` is also accepted for `seed`). A sweep",
              "config takes the same keys, except those a single run writes "
              f"({', '.join(f'`{k}`' for k in PER_RUN)}), with these differences:", "",
              "| sweep key | meaning |", "|---|---|"]
    for plural, path in grid_keys().items():
        lines.append(f"| `{plural}` | a list of `{path}` values: a grid axis |")
    lines += ["| `options` | `{NAME: value or [values]}`: each goes to the methods and allocations that declare it; "
              "a list is a grid axis |",
              "| any other key | one value shared by every run, or a list of values: a grid axis of its own "
              "(a setting whose value is itself a list takes a list as its value) |",
              "| `results` | the results file (default `<config name>.jsonl`), relative to the config's directory |",
              "| `paper` | paper numbers for `oneshot report`: `table`, `source`, `eval`, `notes`, `ppl` |", "",
              "Every sweep run states `calibration.nsamples` (128) and `calibration.seqlen` (2048) when the config "
              "does not.", "",
              f"Top-level sweep keys, in order: {', '.join(f'`{k}`' for k in config_keys())}.", ""]
    unflagged = [e for e in table() if not e.setting.commands and e.setting.yaml]
    if unflagged:
        lines += ["## Settings without a flag", "", "| YAML key | value | what it does |", "|---|---|---|"]
        lines += [f"| `{e.path}` | {describe(e)} | {_cell(e.setting.help)} |" for e in unflagged]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
