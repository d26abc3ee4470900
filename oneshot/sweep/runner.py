"""Running a sweep: every grid point through `api.run`, in this process or on workers (executors.py),
resumable.

- The whole config is checked before any run: a bad key or value is one line (UsageError).
- Rerunning the same config skips every run whose `run_key` is already in the results file.
- Each model is loaded once and every run gets a fresh copy of it (`--reload` loads it per run).
- A run that fails records nothing, prints one line, and the sweep goes on; the sweep then returns 1.
  Ctrl-C stops the sweep (130) with every finished run kept.
- Workers (Ray tasks, Slurm jobs) return records; only this driver appends them, one whole line each.
  A failed run, or one whose worker died, is reported and retried up to `max_retries` times (bad
  input is not retried: it would fail the same way).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from ..api import run
from ..errors import Terminated, UsageError
from ..plan import make_plan
from .config import SWEEP_NAMES, SweepConfig, check_runs, label, run_key
from .executors import ExecutorOptions, make_executor
from .executors import check as check_executor
from .store import append_record, read_results
from .work import Models, run_spec


def preflight(config: SweepConfig) -> list[str]:
    """Problems found in seconds (models, data sources, device, every run's settings), one line each."""
    problems = []
    with SWEEP_NAMES.active():
        for spec in config.runs():
            try:
                make_plan(spec)
            except UsageError as exc:
                if str(exc) not in problems:
                    problems.append(str(exc))
    return problems


def _summary(record: dict) -> str:
    parts = [f"ppl {source} {value:.4g}" for source, value in (record.get("ppl") or {}).items()]
    mean_acc = (record.get("zeroshot") or {}).get("mean_acc") if isinstance(record.get("zeroshot"), dict) else None
    if isinstance(mean_acc, (int, float)):
        parts.append(f"zero-shot mean {mean_acc:.4f}")
    return ", ".join(parts) or "no metrics"


def run_one(spec, models: Models):
    """(record dict or None, one-line failure, whether a retry could succeed), through this module's `run`."""
    return run_spec(spec, models, run)


def run_sweep(config: SweepConfig, results: Path | None = None, dry_run: bool = False, verbose: bool = False,
              reload: bool = False, out=None, executor: ExecutorOptions | None = None) -> int:
    out = out or sys.stdout
    from ..paths import results_file

    executor = executor or ExecutorOptions()
    check_executor(executor)

    results = results_file(str(results) if results is not None else str(config.results),
                           "--results" if results is not None else f"config {config.path.name}: results")
    check_runs(config)
    runs = config.runs()
    records, bad = read_results(results)
    done = {r.get("run_key") for r in records}
    todo = [spec for spec in runs if run_key(spec) not in done]
    say = lambda message="", end="\n": print(message, end=end, file=out, flush=True)  # noqa: E731

    if bad:
        say(f"note: {results} has {bad} unreadable line(s) (an interrupted write?); they are ignored")
    for skipped in config.skipped():
        say(f"note: left out {skipped}")
    problems = preflight(config)
    if dry_run:
        say(f"{config.path}: {len(runs)} runs, {len(runs) - len(todo)} already recorded in {results}, "
            f"{len(todo)} to run")
        for i, spec in enumerate(runs, 1):
            status = "done" if run_key(spec) in done else "todo"
            say(f"  [{i:>{len(str(len(runs)))}}/{len(runs)}] {status}  {run_key(spec)}  {label(spec)}")
        for problem in problems:
            say(f"note: not runnable here: {problem}")
        return 0
    if problems:
        more = f" (and {len(problems) - 1} more; see --dry-run)" if len(problems) > 1 else ""
        raise UsageError(f"{config.path.name} cannot run here: {problems[0]}{more}")
    if not todo:
        say(f"{config.path}: all {len(runs)} runs are already recorded in {results}")
        _report(results, config, say)
        return 0
    say(f"{config.path}: {len(runs)} runs, {len(runs) - len(todo)} already recorded, {len(todo)} to run; "
        f"results: {results}")

    failed, finished, began = [], 0, time.perf_counter()
    width = len(str(len(todo)))
    logger = logging.getLogger("oneshot")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)  # one line per run; --verbose shows each run's own log
    attempts = {run_key(spec): 0 for spec in todo}
    number = {run_key(spec): i for i, spec in enumerate(todo, 1)}
    workers = None
    try:
        workers = make_executor(executor, keep_models=not reload, verbose=verbose, results=results, run_one=run_one)
        if workers.parallel:
            say(f"running on {executor.name}; each line appears as its run finishes")
        pending = todo
        while pending:
            retry = []
            opened = set()

            def started(spec):  # the local loop: the run's line opens before it runs
                opened.add(run_key(spec))
                say(f"[{number[run_key(spec)]:>{width}}/{len(todo)}] {label(spec)} ... ",
                    end="" if not verbose else "\n")

            for outcome in workers.run(pending, started):
                spec, key = outcome.spec, run_key(outcome.spec)
                if key not in opened:
                    say(f"[{number[key]:>{width}}/{len(todo)}] {label(spec)} ... ", end="")
                attempts[key] += 1
                if outcome.record is None:
                    again = outcome.retryable and attempts[key] <= executor.max_retries
                    note = f"; retrying ({attempts[key]}/{executor.max_retries})" if again else ""
                    say(f"FAILED after {outcome.seconds:.0f} s: {outcome.problem}{note}")
                    (retry if again else failed).append(spec)
                    continue
                record = dict(outcome.record, run_key=key)
                append_record(results, record)
                finished += 1
                say(f"{_summary(record)} ({outcome.seconds:.0f} s)")
            pending = retry
    except KeyboardInterrupt as exc:
        say("")
        say(f"interrupted: {finished} run(s) recorded this time in {results}; run the same command to resume")
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        logger.setLevel(level)
        if workers is not None:
            workers.close()
    total = time.perf_counter() - began
    say(f"finished {finished} run(s) in {total / 60:.1f} min, {len(failed)} failed")
    _report(results, config, say)
    if failed:
        say("failed (not recorded; rerun to retry): " + "; ".join(label(spec) for spec in failed))
        return 1
    return 0


def _report(results: Path, config: SweepConfig, say) -> None:
    """Print the sweep's table and write its report files next to the results."""
    from .report import make_report

    if results.exists():
        say("")
        written = make_report(results, paper=config.paper)
        say("report: " + ", ".join(str(path) for kind, path in written.items() if kind != "no_png"))
