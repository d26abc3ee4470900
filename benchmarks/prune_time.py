"""Prune time of whole runs side by side: each variant through `oneshot.run` on a copy of one loaded model,
round-robin, so that a busy neighbour slows every variant alike. Evaluation is off; the time is the
record's `timings.prune_s` (an allocation's own pass, such as OWL's, included).

    OMP_NUM_THREADS=1 python benchmarks/prune_time.py --sparsity 0.7 --nsamples 32 --seqlen 1024 \
        --variants sparsegpt,admm+owl+sequential --rounds 1

A variant is a method with optional options in brackets (`dsnot[base=sparsegpt]`, `alps[rho=0.1;iterations=300]`),
`+owl` (allocation), `+sequential`, `+asymmetric`, `+refit N` and `+refit lr LR`. Prints a table with each
variant's median time and its ratio to the first variant's, and appends one JSON line per run to
--results as the run ends (with the load average at that moment). An untimed warm-up run comes first
(--warmup): without it, the first variant of a process carried the process's one-time costs (2026-12-07,
SmolLM2 at 70%, 32 x 1024: SparseGPT, first, 254 s; after a warm-up, 142 s).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oneshot import RunSpec, run  # noqa: E402
from oneshot.errors import UsageError  # noqa: E402
from oneshot.methods import get_method  # noqa: E402
from oneshot.models import load_model  # noqa: E402
from oneshot.record import versions  # noqa: E402
from oneshot.settings import entry  # noqa: E402
from oneshot.spec import Calibration, Evaluation  # noqa: E402


def _split_variant(variant: str) -> list[str]:
    """'wanda+++owl' -> ['wanda++', 'owl']: the method, whose own name may hold '+', then its extras."""
    return re.split(r"\+(?=owl\b|sequential\b|asymmetric\b|refit )", variant)


def variant_spec(variant: str, args) -> RunSpec:
    method, *extras = _split_variant(variant)
    method, _, given = method.partition("[")  # dsnot[base=sparsegpt]: the method's options, KEY=VALUE;...
    options = dict(item.split("=", 1) for item in given.rstrip("]").split(";") if item)
    refit = {"refit": 0, "refit_lr": entry("refit_lr").default}  # "+refit 2", "+refit lr 1e-05": as rows say
    for extra in [e for e in extras if e.startswith("refit ")]:
        name, value = extra.rsplit(" ", 1)
        refit[name.replace(" ", "_")] = int(value) if name == "refit" else float(value)
        extras.remove(extra)
    try:  # before any model is loaded: a typo ("wanda+ow") reads as an unknown method name
        get_method(method)
    except UsageError as exc:
        raise SystemExit(f"--variants: {variant!r}: {exc}") from None
    unknown = set(extras) - {"owl", "sequential", "asymmetric"}
    if unknown:
        raise SystemExit(f"--variants: {variant!r}: unknown part(s) {sorted(unknown)}; use "
                         "METHOD[KEY=VALUE;...][+owl][+sequential][+asymmetric][+refit N][+refit lr LR]")
    return RunSpec(model=args.model, method=method, options=options,
                   sparsity=None if ":" in args.pattern else args.sparsity,
                   pattern=args.pattern, allocation="owl" if "owl" in extras else "uniform",
                   sequential="sequential" in extras, asymmetric="asymmetric" in extras, **refit,
                   calibration=Calibration("wiki-offline", args.nsamples, args.seqlen),
                   eval=Evaluation(ppl=()), seed=args.seed, device=args.device, dtype="float32", progress=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default="sparsegpt,admm+owl+sequential")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, metavar="N",
                        help="first, an untimed run of the first variant on N calibration windows, so that one-time "
                             "costs (thread pools, allocator growth, lazy imports, file caches) fall on no variant; "
                             "0: none")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results.jsonl")
    args = parser.parse_args(argv)

    variants = args.variants.split(",")
    specs = {v: variant_spec(v, args) for v in variants}
    base = load_model(args.model, dtype=torch.float32, seed=args.seed)
    fresh = lambda: type(base)(copy.deepcopy(base.model), base.tokenizer, base.name, base.source)  # noqa: E731
    times: dict[str, list[float]] = {v: [] for v in variants}
    setting = args.pattern if ":" in args.pattern else f"{args.sparsity:g}"
    # One line per run, written as it ends, so that a benchmark stopped halfway keeps what it measured; the
    # start date groups a process's lines (ratios are only taken within one process).
    stamp = {"benchmark": "prune_time", "model": args.model, "setting": setting, "nsamples": args.nsamples,
             "seqlen": args.seqlen, "threads": torch.get_num_threads(), "versions": versions(),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join(["python", "benchmarks/prune_time.py", *(argv if argv is not None else sys.argv[1:])]),
             "warmup": args.warmup}
    if args.warmup:
        warm = specs[variants[0]].replace(calibration=Calibration("wiki-offline", args.warmup, args.seqlen))
        run(warm, loaded=fresh())
    for round_ in range(args.rounds):
        for variant in variants:
            started = time.perf_counter()
            record = run(specs[variant], loaded=fresh())
            times[variant].append(record.timings["prune_s"])
            with open(args.results, "a") as handle:
                handle.write(json.dumps({**stamp, "variant": variant, "round": round_ + 1,
                                         "prune_s": [record.timings["prune_s"]],
                                         "load_average": round(os.getloadavg()[0], 2)}) + "\n")
            print(f"  round {round_ + 1} {variant:24s} prune {record.timings['prune_s']:7.1f} s "
                  f"(run {time.perf_counter() - started:.1f} s), sparsity {record.sparsity_measured:.4f}", file=sys.stderr)
    first = statistics.median(times[variants[0]])
    print(f"\n{args.model}, {setting}, {args.nsamples} x {args.seqlen} calibration, {torch.get_num_threads()} "
          f"thread(s), {args.rounds} round(s)\n")
    print(f"| variant | prune s (median) | x {variants[0]} |")
    print("|---|---:|---:|")
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"| {variant} | {median:.1f} | {median / first:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
