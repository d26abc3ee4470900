"""The `oneshot` console script and `python -m oneshot`: signals are handled from the first line.

Until the CLI takes over (it turns SIGINT and SIGTERM into a clean unwind), an interrupt while the
program is still importing exits at once with one line and status 130 (Ctrl-C) or 143 (SIGTERM):
nothing has been written yet, and no traceback is printed. Once the CLI has returned, signals are
ignored while the interpreter shuts down.
"""
import signal
import sys


def _while_starting(signum, _frame):
    print("oneshot: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(143 if signum == signal.SIGTERM else 130)


def main() -> int:
    signal.signal(signal.SIGINT, _while_starting)
    signal.signal(signal.SIGTERM, _while_starting)
    from .cli import main as cli_main

    code = cli_main()
    # The work is done and its files are whole: a signal that lands while the interpreter shuts down
    # (after the last line of ours) changes nothing, so it is ignored rather than reported.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code
