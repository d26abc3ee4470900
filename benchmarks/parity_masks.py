"""Mask by mask beside the authors' code on a tiny random model: the same seeded weights pruned by oneshot
(`oneshot.run`) and by the reference's own function (benchmarks/reference_shim.py), then, per layer, how many
zero/non-zero states differ. In float64 an algorithm that is the same gives 0 everywhere; perplexity on a real
model (benchmarks/parity.py) then tells only how rounding moves the result.

    python benchmarks/parity_masks.py --reference dsnot=PATH --method dsnot --pattern unstructured --dtype float64
    python benchmarks/parity_masks.py --reference dsnot=PATH --method dsnot --option base=sparsegpt
"""
from __future__ import annotations

import argparse
import sys
from inspect import signature
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference_shim import REFERENCES  # noqa: E402

from oneshot import Calibration, Evaluation, RunSpec, run  # noqa: E402
from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, metavar="NAME=PATH", help=f"one of {', '.join(REFERENCES)}")
    parser.add_argument("--method", required=True)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--option", type=lambda s: tuple(s.split("=", 1)), action="append", default=[])
    parser.add_argument("--model", default="random:tiny-llama")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--out", type=Path, default=Path("parity_masks"), help="where the calibration tokens go")
    args = parser.parse_args(argv)
    reference, _, checkout = args.reference.partition("=")
    if reference not in REFERENCES or not Path(checkout).is_dir():
        parser.error(f"--reference NAME=PATH with NAME one of {', '.join(REFERENCES)} and PATH a checkout")
    args.out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(3, 500, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    tokens = args.out / f"calib_{args.nsamples}x{args.seqlen}.pt"
    torch.save(ids, tokens)
    options = dict(args.option)
    dtype = getattr(torch, args.dtype)
    spec = RunSpec(model=args.model, method=args.method, pattern=args.pattern,
                   sparsity=None if ":" in args.pattern else args.sparsity, calibration=Calibration(f"tokens:{tokens}"),
                   eval=Evaluation(()), dtype=args.dtype, device="cpu", progress=False, options=options)
    ours = load_model(args.model, dtype=dtype, seed=0)
    run(spec, loaded=ours)
    theirs = load_model(args.model, dtype=dtype, seed=0)
    runner = REFERENCES[reference]
    given = {"options": options} if options and "options" in signature(runner).parameters else {}
    runner(Path(checkout), theirs.model, args.method, args.pattern, ids, "cpu", args.sparsity, **given)
    print(f"{args.model}, {args.method} {args.pattern} {options or ''}, {args.dtype}: zero/non-zero states "
          "that differ, per layer\n\n| block | layer | differ | of | rows with a difference |\n|---|---|---:|---:|---:|")
    differ = total = 0
    for i, (a, b) in enumerate(zip(decoder_blocks(ours.model), decoder_blocks(theirs.model))):
        for (name, ours_layer), their_layer in zip(prunable_layers(a).items(), prunable_layers(b).values()):
            mine, their = get_weight(ours_layer) == 0, get_weight(their_layer) == 0
            count = int((mine != their).sum())
            differ, total = differ + count, total + mine.numel()
            print(f"| {i} | {name} | {count} | {mine.numel()} | {int((mine != their).any(1).sum())} of {mine.shape[0]} |")
    print(f"\n{differ} of {total} differ ({100 * (1 - differ / total):.3f}% the same)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
