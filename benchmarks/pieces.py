"""Where one block's pruning time goes, piece by piece (the table in DESIGN.md section 5).

    python benchmarks/pieces.py --model random:llama-2-7b --device cuda --nsamples 128 --seqlen 2048
    python benchmarks/pieces.py --model smollm2-135m --device cpu --nsamples 32 --seqlen 1024

Times one decoder block (default: block 1): its forward at several batch sizes, the statistics pass
of each method (forward with hooks), the distinct Hessians alone, the inverse factors, and each
method's pruning of the block's linear layers (SparseGPT with the PyTorch column loop and, on CUDA,
the fused block). Each piece runs once to warm up, then is timed. Appends one JSON line to --results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oneshot.record import versions  # noqa: E402
from oneshot.engine import (BlockVisit, PruneReport, capture_block_inputs, default_batch_size,  # noqa: E402
                            gather_statistics)
from oneshot.engine.capture import forward_block  # noqa: E402
from oneshot.methods import get_method, parse_pattern  # noqa: E402
from oneshot.methods.sparsegpt import prepare_hessian, sparsegpt_prune  # noqa: E402
from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers  # noqa: E402
from speed import calibration_tokens  # noqa: E402


def timed(fn, device: str, repeats: int = 1) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--batch-sizes", default=None, help="comma-separated sequences per forward "
                        "(default: 1, the engine's default, and the whole set)")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results.jsonl")
    args = parser.parse_args(argv)

    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda")
                                                             else torch.float32)
    loaded = load_model(args.model, dtype=dtype, seed=args.seed)
    model = loaded.model
    ids = calibration_tokens(loaded, args.nsamples, args.seqlen, args.seed)
    block = decoder_blocks(model)[args.block]
    block.to(device)
    layers = prunable_layers(block)
    pattern = parse_pattern(args.pattern)
    default = min(default_batch_size(model, args.seqlen, device), args.nsamples)
    sizes = ([int(s) for s in args.batch_sizes.split(",")] if args.batch_sizes
             else sorted({1, default, args.nsamples}))
    rows: list[tuple[str, float]] = []

    captured = {}
    for size in sizes:
        cap = capture_block_inputs(model, ids, device, size, False)
        captured[size] = cap
        calls = cap.calls[args.block]
        rows.append((f"block forward, {size} x {args.seqlen} tokens per batch",
                     timed(lambda: [forward_block(block, h, c, device) for h, c in zip(cap.hidden, calls)], device)))
    cap = captured[default] if default in captured else captured[sizes[0]]
    calls = cap.calls[args.block]

    def gather(method):
        visit = BlockVisit(args.block, block, layers, torch.device(device), method, {}, pattern, {}, cap,
                           PruneReport(), last=False)
        gather_statistics(visit)
        return visit.stats

    stats = {}
    for name in ("wanda", "sparsegpt"):
        method = get_method(name)
        rows.append((f"statistics pass, {name} (forward with hooks)", timed(lambda: gather(method), device)))
        stats[name] = gather(method)

    rows.append(("Hessian accumulation (the two passes' difference)", rows[-1][1] - rows[-2][1]))
    hessians = {id(s): s for s in stats["sparsegpt"].values()}
    rows.append((f"{len(hessians)} distinct Hessian values and inverse factors",
                 timed(lambda: [prepare_hessian(s.value()) for s in hessians.values()], device)))

    weights = {name: get_weight(layer).detach().clone() for name, layer in layers.items()}
    factors = {key: prepare_hessian(s.value()) for key, s in hessians.items()}
    for kernel in ("torch", "auto") if device.startswith("cuda") else ("torch",):
        rows.append((f"SparseGPT {pattern} on {len(weights)} layers, kernel={kernel}",
                     timed(lambda: [sparsegpt_prune(weights[n], factors[id(stats['sparsegpt'][n])], 0.5, pattern,
                                                    kernel=kernel) for n in weights], device)))
    wanda = get_method("wanda")
    rows.append((f"Wanda {pattern} on {len(weights)} layers",
                 timed(lambda: [wanda.prune(weights[n], stats["wanda"][n].value(), 0.5, pattern) for n in weights],
                       device)))
    magnitude = get_method("magnitude")
    rows.append((f"magnitude {pattern} on {len(weights)} layers",
                 timed(lambda: [magnitude.prune(weights[n], None, 0.5, pattern) for n in weights], device)))

    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    blocks = len(decoder_blocks(model))
    print(f"\n{args.model} {str(dtype)[6:]} on {device_name}, block {args.block} of {blocks}, "
          f"{args.nsamples} x {args.seqlen} calibration tokens\n")
    print("| piece | seconds per block |")
    print("|---|---|")
    for piece, seconds in rows:
        print(f"| {piece} | {seconds:.3f} |")
    record = {"kind": "pieces", "model": args.model, "dtype": str(dtype)[6:], "device": device_name,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "block": args.block, "pattern": args.pattern,
              "threads": torch.get_num_threads(), "pieces": dict(rows), "versions": versions(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/pieces.py", *(argv if argv is not None else sys.argv[1:])])}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
