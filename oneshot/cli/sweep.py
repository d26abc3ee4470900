"""`oneshot sweep CONFIG.yaml` and `oneshot report RESULTS|CONFIG.yaml`: the command-line faces of
oneshot.sweep."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UsageError


def add_sweep_parser(commands) -> None:
    p = commands.add_parser(
        "sweep", help="run a grid of prune runs from a YAML config (resumable)",
        description="Run every model x method x pattern x sparsity of CONFIG in this process (or on Ray or Slurm "
                    "workers: --executor), appending one JSON line per finished run; rerunning skips runs already "
                    "recorded.")
    p.add_argument("config", metavar="CONFIG.yaml", help="sweep config (its keys: docs/cli.md)")
    p.add_argument("--results", default=None,
                   help="results JSONL (default: the config's `results`, relative to the config's directory)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are already recorded; run nothing")
    p.add_argument("--verbose", action="store_true", help="show each run's own log and progress")
    p.add_argument("--reload", action="store_true",
                   help="load the model afresh for every run instead of keeping a copy in memory "
                        "(halves host memory for very large models; slower)")
    where = p.add_argument_group("where the runs happen (the driver alone writes the results file)")
    where.add_argument("--executor", default="local", metavar="local|ray|slurm",
                       help="local: one run after another in this process (default); ray: each run a Ray task; "
                            "slurm: the runs as one Slurm array job (through submitit)")
    where.add_argument("--max-retries", type=int, default=1, metavar="N",
                       help="retry a failed run, or one whose worker died, up to N times (default 1); "
                            "bad input is never retried")
    where.add_argument("--cpus-per-run", type=float, default=None, metavar="N",
                       help="ray/slurm: CPUs each run reserves (default 1)")
    where.add_argument("--gpus-per-run", type=float, default=None, metavar="N",
                       help="ray/slurm: GPUs each run reserves (default 0; Ray takes fractions)")
    where.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="ray: join this cluster (e.g. auto, or ray://host:10001); without it a local Ray "
                            "instance is started for the sweep")
    where.add_argument("--partition", default=None, help="slurm: the partition to submit to")
    where.add_argument("--time", default=None, metavar="LIMIT",
                       help="slurm: each run's time limit (minutes, H:MM:SS or D-HH:MM; default 60 minutes)")
    where.add_argument("--array-parallelism", type=int, default=None, metavar="N",
                       help="slurm: at most N runs of the array at once")
    where.add_argument("--slurm-folder", default=None, metavar="DIR",
                       help="slurm: where submitit keeps job logs (default: slurm/ beside the results file)")
    p.set_defaults(handler=sweep_command)


def sweep_command(args) -> int:
    from ..sweep import load_config, run_sweep
    from ..sweep.executors import ExecutorOptions, check

    given = vars(args)  # a Namespace built by hand (an embedding program) may leave these out
    executor = ExecutorOptions(name=given.get("executor") or "local", ray_address=given.get("ray_address"),
                               cpus_per_run=given.get("cpus_per_run"), gpus_per_run=given.get("gpus_per_run"),
                               partition=given.get("partition"), time=given.get("time"),
                               array_parallelism=given.get("array_parallelism"), folder=given.get("slurm_folder"),
                               max_retries=given.get("max_retries", 1))
    check(executor)  # before the config is even read
    config = load_config(args.config)
    return run_sweep(config, args.results, dry_run=args.dry_run, verbose=args.verbose, reload=args.reload,
                     executor=executor)


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
