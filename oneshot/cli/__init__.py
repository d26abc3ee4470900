"""The command line: `oneshot prune | eval | recover | sweep | report`. Thin: flags (and `--config RUN.yaml`)
become a RunSpec, and `api.run` does the work; this layer prints the table and turns a failure into one
line on stderr with an exit status (2: bad input, 1: the run could not finish, 130: interrupted).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .. import __version__
from ..errors import RunError, Terminated, UsageError
from .runs import add_run_parsers
from .sweep import add_report_parser, add_sweep_parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oneshot", description="One-shot pruning of LLMs: SparseGPT, Wanda, magnitude and more.")
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_run_parsers(commands)
    add_sweep_parser(commands)
    add_report_parser(commands)
    return parser


class _Stderr(logging.Handler):
    """The run's log lines, bare, on whatever sys.stderr is at the time (tests swap it)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("oneshot")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _interrupted(signum, _frame):
    """The first SIGINT or SIGTERM unwinds the run (temporary files are removed on the way out);
    further ones are ignored so that the clean-up itself is not cut short."""
    if os.getpid() != _cli_pid:  # a forked child that ran before _forked_child_defaults: end as the default does
        _forked_child_defaults()
        os.kill(os.getpid(), signum)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _forked_child_defaults():
    """A child forked by a library (lm-eval's bootstrap Pool) ends at SIGINT and SIGTERM as the kernel ends it.
    With our handler, Pool.terminate's SIGTERM can land just before a worker blocks on the task queue's lock:
    CPython runs the handler only when that wait is interrupted, so the worker waits on and the run hangs
    (benchmarks/pool_terminate.py)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is _interrupted:
            signal.signal(signum, signal.SIG_DFL)


_cli_pid = os.getpid()
os.register_at_fork(after_in_child=_forked_child_defaults)


def main(argv: list[str] | None = None) -> int:
    """`oneshot COMMAND ...`: a bad argument or a failed run is one line on stderr and an exit status."""
    argv = sys.argv[1:] if argv is None else argv
    global _cli_pid
    _cli_pid = os.getpid()
    handlers = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            handlers[signum] = signal.signal(signum, _interrupted)
    except ValueError:  # not the main thread (an embedding program): leave its signals alone
        pass
    try:
        return _main(argv)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("give a command: oneshot prune ... or oneshot eval ... (see `oneshot --help`)")
        _log_to_stderr()
        return args.handler(args)
    except UsageError as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"oneshot: {what}; temporary files were removed and nothing partial was written", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `oneshot ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
