"""Rerun the runs of a results file under the installed versions (after changing constraints.txt), and show
the new numbers beside the old ones.

    OMP_NUM_THREADS=1 python scripts/rerun_records.py OLD.jsonl NEW.jsonl [--compare-only]

Each old record's command line (`command`) is parsed by the CLI's own parser into the same RunSpec; the
run goes through `oneshot.run` (one model load per model, as a sweep does) and its record is appended to
NEW with the old run_key, so `oneshot report NEW` gives the same table. Rerunning skips runs already in NEW.
Prints old | new | change per run as markdown. The thread count of the old records is named: float32 sums
depend on it, so use the same (OMP_NUM_THREADS) for a like-for-like rerun.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from oneshot.cli import build_parser
from oneshot.settings import apply_arguments
from oneshot.spec import Recovery, RunSpec
from oneshot.sweep import append_record, read_results
from oneshot.sweep.config import label


def spec_of(record: dict) -> RunSpec:
    argv = list(record["command"][1:])
    command = argv[0]
    args = build_parser().parse_args(argv)
    base = {"prune": RunSpec(), "eval": RunSpec(kind="eval", method="dense"),
            "recover": RunSpec(kind="recover", method="dense", recover=Recovery())}[command]
    spec = apply_arguments(vars(args), base, command)
    return spec.replace(output=None, save_model=None, progress=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--compare-only", action="store_true", help="print the comparison; run nothing")
    args = parser.parse_args(argv)
    old, _ = read_results(args.old)
    new, _ = read_results(args.new) if args.new.exists() else ([], 0)
    done = {r.get("run_key") for r in new}
    if not args.compare_only:
        from oneshot import run
        from oneshot.models import load_model

        kept = {}
        for record in old:
            if record.get("run_key") in done:
                continue
            spec = spec_of(record)
            print(f"rerunning {label(spec)} (old: {record['device']}, transformers "
                  f"{record['versions'].get('transformers')})", file=sys.stderr, flush=True)
            key = (spec.model, spec.dtype, spec.seed)
            if key not in kept:
                kept[key] = load_model(spec.model, dtype=getattr(__import__("torch"), spec.dtype if spec.dtype != "auto"
                                                                          else "float32"), seed=spec.seed)
            loaded = kept[key]
            copied = type(loaded)(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name, loaded.source)
            result = dict(run(spec, loaded=copied).to_dict(), run_key=record.get("run_key"))
            append_record(args.new, result)
            new.append(result)
    by_key = {r.get("run_key"): r for r in new}
    print("| run | old ppl | new ppl | change | old versions | new versions |\n|---|---:|---:|---:|---|---|")
    for record in old:
        again = by_key.get(record.get("run_key"))
        if again is None:
            continue
        for source, before in record["ppl"].items():
            after = again["ppl"].get(source)
            change = "" if after is None else f"{100 * (after / before - 1):+.2f}%"
            print(f"| {label(spec_of(record))} | {before:.4g} | {after:.4g} | {change} | "
                  f"transformers {record['versions'].get('transformers')}, {record['device']} | "
                  f"transformers {again['versions'].get('transformers')}, {again['device']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
