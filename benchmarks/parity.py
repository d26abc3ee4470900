"""Parity with the authors' code: the same model, calibration windows and evaluation windows through
oneshot (`oneshot.run`) and through the reference implementation's own functions, imported from a
checkout at run time (never copied here; benchmarks/reference_shim.py adapts only their environment).

    python benchmarks/parity.py --reference wanda=/path/to/locuslab-wanda --out parity/ \
        [--methods magnitude,wanda,sparsegpt] [--patterns unstructured,2:4] [--dtype float32]

Writes the windows (`calib_NxL.pt`, `eval_NxL.pt`), one JSON line per pair to `parity.jsonl` (resumable:
pairs already there are skipped) and prints the markdown rows of benchmarks/PARITY.md: perplexity of
both, their difference, measured sparsity, and the share of weights whose zero/non-zero state agrees.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from inspect import signature
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_shim import PERPLEXITIES, REFERENCES, reference_perplexity  # noqa: E402

from oneshot import Calibration, Evaluation, RunSpec, run  # noqa: E402
from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers  # noqa: E402
from oneshot.record import versions  # noqa: E402


def windows(out: Path, model: str, nsamples: int, seqlen: int, eval_windows: int, seed: int) -> tuple[Path, Path]:
    """The calibration and evaluation windows as token files, written once and reused."""
    from calibration import calibration_windows, evaluation_windows

    calib, evaluation = out / f"calib_{nsamples}x{seqlen}.pt", out / f"eval_{eval_windows}x{seqlen}.pt"
    if not calib.exists() or not evaluation.exists():
        tokenizer = load_model(model, dtype=torch.float32).tokenizer
        torch.save(calibration_windows("wiki-offline", tokenizer, nsamples, seqlen, seed), calib)
        torch.save(evaluation_windows("wiki-offline", tokenizer, seqlen, eval_windows), evaluation)
    return calib, evaluation


def zeros(model) -> list[torch.Tensor]:
    return [get_weight(layer) == 0 for block in decoder_blocks(model) for layer in prunable_layers(block).values()]


def agreement(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """The share of pruned-layer weights whose zero/non-zero state is the same in both models."""
    return sum(int((a == b).sum()) for a, b in zip(ours, theirs)) / sum(a.numel() for a in ours)


def one_pair(args, reference: str, checkout: Path, method: str, pattern: str, calib: Path, evaluation: Path) -> dict:
    dtype = getattr(torch, args.dtype)
    spec = RunSpec(model=args.model, method=method, pattern=pattern, sparsity=None if ":" in pattern else args.sparsity,
                   calibration=Calibration(f"tokens:{calib}"), eval=Evaluation((f"tokens:{evaluation}",)),
                   dtype=args.dtype, device="cpu", progress=False, options=dict(args.option or {}))
    loaded = load_model(args.model, dtype=dtype)
    started = time.perf_counter()
    ours = run(spec, loaded=loaded)
    ours_s = time.perf_counter() - started
    our_zeros = zeros(loaded.model)
    del loaded
    theirs = load_model(args.model, dtype=dtype)
    ids = torch.load(calib)
    started = time.perf_counter()
    # A runner that takes `options` (ria) gets ours, as the flags they stand for; the others their defaults.
    runner = REFERENCES[reference]
    given = {"options": dict(args.option)} if args.option and "options" in signature(runner).parameters else {}
    runner(checkout, theirs.model, method, pattern, ids, "cpu", args.sparsity, **given)
    theirs_s = time.perf_counter() - started
    their_ppl = PERPLEXITIES.get(reference, reference_perplexity)(checkout, theirs.model, torch.load(evaluation), "cpu")
    their_zeros = zeros(theirs.model)
    our_ppl = ours.ppl[f"tokens:{evaluation}"]
    return {"reference": reference, "method": method, "pattern": pattern, "sparsity": args.sparsity,
            "options": dict(args.option or {}), "dtype": args.dtype, "reference_dtype": args.dtype, "ours_ppl": our_ppl, "reference_ppl": their_ppl,
            "difference": our_ppl / their_ppl - 1, "ours_sparsity": ours.sparsity_measured,
            "reference_sparsity": sum(int(z.sum()) for z in their_zeros) / sum(z.numel() for z in their_zeros),
            "mask_agreement": agreement(our_zeros, their_zeros), "ours_s": ours_s, "reference_s": theirs_s,
            "threads": torch.get_num_threads(), "device": f"cpu ({platform.machine()})", "versions": versions(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def row(result: dict) -> str:
    return (f"| {result['method']} | {result['pattern']} | {result['ours_ppl']:.4f} | {result['reference_ppl']:.4f} | "
            f"{100 * result['difference']:+.3f}% | {result['ours_sparsity']:.6f} / {result['reference_sparsity']:.6f} | "
            f"{100 * result['mask_agreement']:.3f}% |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, metavar="NAME=PATH",
                        help=f"which reference and its checkout: {', '.join(REFERENCES)}")
    parser.add_argument("--out", type=Path, required=True, help="directory for the windows and parity.jsonl")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--option", type=lambda s: tuple(s.split("=", 1)), action="append",
                        help="an option of ours, NAME=VALUE (the reference gets its own defaults; ria: the same)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args(argv)
    reference, _, checkout = args.reference.partition("=")
    if reference not in REFERENCES or not Path(checkout).is_dir():
        parser.error(f"--reference NAME=PATH with NAME one of {', '.join(REFERENCES)} and PATH a checkout")
    args.out.mkdir(parents=True, exist_ok=True)
    calib, evaluation = windows(args.out, args.model, args.nsamples, args.seqlen, args.eval_windows, args.seed)
    results = args.out / "parity.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    key = lambda r: (r["reference"], r["method"], r["pattern"], r["sparsity"], r["dtype"],  # noqa: E731
                     r.get("reference_dtype", r["dtype"]), json.dumps(r["options"], sort_keys=True))
    finished = {key(r) for r in done}
    for method in args.methods.split(","):
        for pattern in args.patterns.split(",")[:1] if method == "dense" else args.patterns.split(","):
            probe = {"reference": reference, "method": method, "pattern": pattern, "sparsity": args.sparsity,
                     "dtype": args.dtype, "reference_dtype": args.dtype, "options": dict(args.option or {})}
            if key(probe) in finished:
                continue
            result = one_pair(args, reference, Path(checkout), method, pattern, calib, evaluation)
            with results.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            done.append(result)
            print(row(result), flush=True)
    print("\n| method | pattern | oneshot ppl | reference ppl | difference | measured sparsity (ours / theirs) | "
          "same zero/non-zero |\n|---|---|---|---|---|---|---|")
    for result in done:
        if result["reference"] == reference and result["dtype"] == args.dtype:
            print(row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
