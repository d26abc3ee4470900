"""Does lm-eval's bootstrap Pool hang a process that handles SIGTERM in Python? The reproduction behind
oneshot.cli._forked_child_defaults.

lm-eval bootstraps some stderrs (perplexity's) in a forked multiprocessing Pool and ends it with
Pool.terminate, one SIGTERM per worker. A forked worker inherits the parent's Python handler; when the signal
lands just before the worker blocks on the task queue's lock, CPython runs the handler only if that wait is
interrupted, which it never is: the worker waits on, and the parent joins it forever (a leaderboard zero-shot
run, 2026-12-08, waited 11 minutes until the worker was killed by hand).

Each arm runs ROUNDS bootstraps (a Pool each) in a fresh process and reports how many finished before LIMIT
seconds passed with no progress:

    python benchmarks/pool_terminate.py --rounds 300
    arm "python handler": a handler that unwinds, as oneshot's CLI had until then
    arm "oneshot": oneshot.cli's handler, whose forked children get the default SIGINT and SIGTERM
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _unwind(signum, _frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def child(arm: str, rounds: int, iters: int) -> None:
    """One arm, in its own process: a line per finished round."""
    sys.path.insert(0, str(ROOT))
    import lm_eval.api.metrics as metrics

    from oneshot.cli import _interrupted  # both arms: the same process as a run's (torch loaded)

    handler = _interrupted if arm == "oneshot" else _unwind
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    rng = random.Random(0)
    lls = [-3 * rng.random() for _ in range(387)]  # the size of wiki_offline_lastword
    sys.stderr = open(os.devnull, "w")  # lm-eval's bars and the workers' tracebacks
    for i in range(rounds):
        metrics.bootstrap_stderr(metrics.perplexity, lls, iters=iters)
        print(i + 1, flush=True)


def run_arm(arm: str, rounds: int, iters: int, limit: float) -> tuple[int, bool, float]:
    """(rounds finished, hung, seconds)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", arm, "--rounds", str(rounds),
                             "--iters", str(iters)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    progress = {"done": 0, "at": time.monotonic()}

    def read():
        for line in proc.stdout:
            if line.strip().isdigit():  # lm-eval prints its own lines here too
                progress.update(done=int(line), at=time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - progress["at"] < limit:
        time.sleep(0.2)
    hung = proc.poll() is None
    if hung:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    return progress["done"], hung, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--iters", type=int, default=2000, help="bootstrap resamples a round (1000 a Pool task)")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds without a finished round = hung")
    parser.add_argument("--arms", default="python handler,oneshot")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rounds, args.iters)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.iters} resamples an arm")
    print("| arm | rounds finished | hung | seconds |\n|---|---:|---|---:|")
    for arm in args.arms.split(","):
        done, hung, seconds = run_arm(arm, args.rounds, args.iters, args.limit)
        print(f"| {arm} | {done} of {args.rounds} | {'yes' if hung else 'no'} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
