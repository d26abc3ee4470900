"""`oneshot sweep CONFIG.yaml` and `oneshot report RESULTS|CONFIG.yaml`: the command-line faces of
oneshot.sweep."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UsageError


def add_sweep_parser(commands) -> None:
    p = commands.add_parser(
        "sweep", help="run a grid of prune runs from a YAML config (resumable)",
        description="Run every model x method x pattern x sparsity of CONFIG in this process, appending one JSON "
                    "line per finished run; rerunning skips runs already recorded.")
    p.add_argument("config", metavar="CONFIG.yaml", help="sweep config (see experiments/README.md)")
    p.add_argument("--results", default=None,
                   help="results JSONL (default: the config's `results`, relative to the config's directory)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are already recorded; run nothing")
    p.add_argument("--verbose", action="store_true", help="show each run's own log and progress")
    p.add_argument("--reload", action="store_true",
                   help="load the model afresh for every run instead of keeping a copy in memory "
                        "(halves host memory for very large models; slower)")
    p.set_defaults(handler=sweep_command)


def sweep_command(args) -> int:
    from ..sweep import load_config, run_sweep

    config = load_config(args.config)
    return run_sweep(config, args.results,
                     dry_run=args.dry_run, verbose=args.verbose, reload=args.reload)


def add_report_parser(commands) -> None:
    p = commands.add_parser(
        "report", help="markdown/CSV tables and a plot from sweep results",
        description="Tables (rows model/method/pattern, columns sparsity) and a ppl-vs-sparsity plot from a "
                    "sweep's results; with paper numbers, paper | ours | difference.")
    p.add_argument("results", metavar="RESULTS",
                   help="results JSONL, or a sweep CONFIG.yaml (its results file and its paper block)")
    p.add_argument("--paper", metavar="CONFIG.yaml", default=None,
                   help="compare with the paper numbers in this sweep config's `paper` block")
    p.add_argument("--out", metavar="DIR", default=None, help="directory for the report files (default: next to RESULTS)")
    p.set_defaults(handler=report_command)


def report_command(args) -> int:
    from ..sweep import load_config, make_report

    target = Path(args.results).expanduser()
    paper = None
    if target.suffix.lower() in (".yaml", ".yml"):
        config = load_config(target)
        target, paper = config.results, config.paper
    if args.paper:
        config = load_config(args.paper)
        if config.paper is None:
            raise UsageError(f"--paper {args.paper}: that config has no `paper` block")
        paper = config.paper
    written = make_report(target, args.out, paper)
    for kind, path in written.items():
        print(path if kind == "no_png" else f"wrote {path}", file=sys.stderr)
    return 0
