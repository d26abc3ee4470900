"""Choosing --refit's learning rate without looking at the leaderboard's evaluation windows: SparseGPT with
--sequential --asymmetric at 2:4 on SmolLM2-135M (the leaderboard's calibration, 32 x 1024), each learning
rate scored by perplexity on held-out text, the second half of wiki-offline's evaluation split (its articles
after the middle of the text; the leaderboard reads only the first 32 windows of 1024 tokens, about 33k of the
split's 105k tokens, and calibration reads the other split).

    python benchmarks/refit_validation.py [--lrs 1e-5,1e-4,3e-4,1e-3] [--passes 2]
        [--text /tmp/heldout.txt] [--out experiments/results/refit_validation.jsonl]

Appends one record per run (dense, no refit, then each learning rate) to --out, skipping those already
there, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from calibration import wiki_offline  # noqa: E402
from oneshot import Calibration, Evaluation, RunSpec, run  # noqa: E402


def write_heldout(path: Path) -> None:
    text = wiki_offline.split_text("evaluation")
    half = text[len(text) // 2:]
    path.write_text(half[half.index("\n\n") + 2:])  # from the first whole article after the middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", default="1e-5,1e-4,3e-4,1e-3")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--text", type=Path, default=Path("/tmp/heldout.txt"))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/refit_validation.jsonl")
    args = parser.parse_args()
    write_heldout(args.text)
    source = f"file:{args.text}"
    base = dict(model="smollm2-135m", method="sparsegpt", pattern="2:4", sequential=True, asymmetric=True,
                calibration=Calibration("wiki-offline", 32, 1024), eval=Evaluation(ppl=(source,), samples=16),
                device="cpu", dtype="float32", seed=0)
    wanted = [("dense", 0, None), ("sparsegpt", 0, None)] + \
             [("sparsegpt", args.passes, float(lr)) for lr in args.lrs.split(",")]
    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            s = r["settings"]
            done[(r["method"], s.get("refit", 0), s.get("refit_lr") if s.get("refit") else None)] = r
    for method, passes, lr in wanted:
        if (method, passes, lr) in done:
            continue
        settings = dict(base, method=method) if method != "dense" else \
            dict(model=base["model"], method="dense", eval=base["eval"], device="cpu", dtype="float32")
        if passes:
            settings.update(refit=passes, refit_lr=lr)
        record = run(RunSpec(**settings))
        with args.out.open("a") as handle:
            handle.write(json.dumps(record.to_dict()) + "\n")
        done[(method, passes, lr)] = record.to_dict()
    print("| run | held-out ppl |\n|---|---|")
    for (method, passes, lr), r in done.items():
        name = method if not passes else f"{method} + refit {passes} x, lr {lr:g}"
        print(f"| {name} | {next(iter(r['ppl'].values())):.2f} |")


if __name__ == "__main__":
    main()
