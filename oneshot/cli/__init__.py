"""The command line: `oneshot prune | eval | sweep | report`. Thin: flags (and `--config RUN.yaml`)
become a RunSpec, and `api.run` does the work; this layer prints the table and maps failures to one
line on stderr with an exit status (2: bad input, 1: the run could not finish, 130: interrupted).
"""
from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import RunError, UsageError
from .prune import add_eval_parser, add_prune_parser
from .sweep import add_report_parser, add_sweep_parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oneshot", description="One-shot pruning of LLMs: SparseGPT, Wanda, magnitude.")
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_prune_parser(commands)
    add_sweep_parser(commands)
    add_report_parser(commands)
    add_eval_parser(commands)
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


def main(argv: list[str] | None = None) -> int:
    """`oneshot COMMAND ...`: a bad argument or a failed run is one line on stderr and an exit status."""
    argv = sys.argv[1:] if argv is None else argv
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
    except KeyboardInterrupt:
        print("oneshot: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `oneshot ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
