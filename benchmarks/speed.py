"""Speed and memory of each method end to end (load and evaluation excluded).

    python benchmarks/speed.py --model random:llama-2-7b --device cuda --nsamples 128 --seqlen 2048
    python benchmarks/speed.py --model smollm2-135m --device cpu --nsamples 32 --seqlen 1024 \
        --reference /path/to/locuslab-wanda-checkout

Prints a table (method, pattern, wall s, peak GPU GiB, calibration tokens/s) and appends one JSON
line per run to --results. With --reference, the same model and token windows also go through the
reference implementation's own prune functions, imported from that checkout at run time (its code
is never part of this project), for a side-by-side ratio. Speed does not depend on weight values,
so random presets with real shapes stand in for checkpoints that cannot be downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oneshot.record import versions  # noqa: E402
from oneshot.engine import prune_model  # noqa: E402
from oneshot.engine.sequential import SEQUENTIAL_STAGES  # noqa: E402
from oneshot.engine.stages import DEFAULT_STAGES  # noqa: E402
from oneshot.methods import get_method, parse_pattern  # noqa: E402
from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers  # noqa: E402


def calibration_tokens(loaded, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Real text for real models; seeded random ids for random presets (values do not change speed)."""
    if loaded.name.startswith("random:"):
        vocab = loaded.model.get_input_embeddings().num_embeddings
        return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))
    from calibration import calibration_windows

    return calibration_windows("wiki-offline", loaded.tokenizer, nsamples, seqlen, seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_ours(model, method: str, pattern: str, ids, device: str, batch_size=None, sequential=False) -> dict:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    report = prune_model(model, get_method(method), 0.5, parse_pattern(pattern), ids, device=device,
                         batch_size=batch_size, progress=False,
                         stages=SEQUENTIAL_STAGES if sequential else DEFAULT_STAGES)
    _sync(device)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "sparsity": report.sparsity,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None}


def time_reference(checkout: Path, model, method: str, pattern: str, ids, device: str) -> dict:
    """Run locuslab/wanda's prune_<method> on our model and windows; adapts only the environment."""
    from reference_shim import run_reference  # benchmarks/reference_shim.py

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    run_reference(checkout, model, method, pattern, ids, device)
    _sync(device)
    wall = time.perf_counter() - start
    return {"wall_s": wall,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None}


def zero_masks(model) -> list[torch.Tensor]:
    return [get_weight(layer) == 0 for block in decoder_blocks(model) for layer in prunable_layers(block).values()]


def mask_agreement(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Fraction of pruned-layer weights whose zero/non-zero state is the same in both models."""
    same = sum(int((a == b).sum()) for a, b in zip(ours, theirs))
    return same / sum(a.numel() for a in ours)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-2-7b")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--memory-fraction", type=float, default=None,
                        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    parser.add_argument("--reference", type=Path, default=None, help="a locuslab/wanda checkout to time beside ours")
    parser.add_argument("--sequential", action="store_true",
                        help="also time ours with sublayer-sequential calibration (--sequential), beside the default")
    parser.add_argument("--orders", default=None,
                        help="which of ours to time, comma-separated: default, sequential (default: default, "
                             "or both with --sequential)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results.jsonl")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda")
                                                             else torch.float32)
    if args.memory_fraction and args.device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, torch.device(args.device))
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=dtype, seed=args.seed)
    load_s = time.perf_counter() - start
    ids = calibration_tokens(loaded, args.nsamples, args.seqlen, args.seed)
    pristine = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"{args.model} {str(dtype)[6:]} on {device_name}, {args.nsamples} x {args.seqlen} calibration, "
          f"load {load_s:.1f} s", file=sys.stderr)

    orders = (args.orders or ("default,sequential" if args.sequential else "default")).split(",")
    if set(orders) - {"default", "sequential"}:
        parser.error(f"--orders: {args.orders!r}; use default and/or sequential")
    rows = []
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            loaded.model.load_state_dict(pristine)
            ours, our_zeros = None, None
            if "default" in orders:
                ours = time_ours(loaded.model, method, pattern, ids, args.device, args.batch_size)
                rows.append({"impl": "oneshot", "method": method, "pattern": pattern, **ours})
                print(f"  oneshot   {method:9s} {pattern:12s} {ours['wall_s']:8.1f} s", file=sys.stderr)
                our_zeros = zero_masks(loaded.model) if args.reference else None  # the default order's masks
            if "sequential" in orders:
                loaded.model.load_state_dict(pristine)
                seq = time_ours(loaded.model, method, pattern, ids, args.device, args.batch_size, sequential=True)
                rows.append({"impl": "oneshot --sequential", "method": method, "pattern": pattern, **seq})
                print(f"  oneshot --sequential {method:9s} {pattern:12s} {seq['wall_s']:8.1f} s", file=sys.stderr)
            if args.reference:
                loaded.model.load_state_dict(pristine)
                ref = time_reference(args.reference, loaded.model, method, pattern, ids, args.device)
                extra = {} if ours is None else {"ratio_ref_over_ours": ref["wall_s"] / ours["wall_s"],
                                                 "mask_agreement": mask_agreement(our_zeros, zero_masks(loaded.model))}
                rows.append({"impl": "reference", "method": method, "pattern": pattern, **ref, **extra})
                print(f"  reference {method:9s} {pattern:12s} {ref['wall_s']:8.1f} s", file=sys.stderr)

    tokens = args.nsamples * args.seqlen
    ref_wall = {(r["method"], r["pattern"]): r["wall_s"] for r in rows if r["impl"] == "reference"}
    for row in rows:
        if (row["method"], row["pattern"]) in ref_wall:
            row["time_over_reference"] = row["wall_s"] / ref_wall[row["method"], row["pattern"]]
    print("\n| impl | method | pattern | wall s | peak GPU GiB | calib tokens/s | time / reference | masks agree |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.2f}"
        ratio = f"{row['time_over_reference']:.2f}" if "time_over_reference" in row else ""
        agree = f"{100 * row['mask_agreement']:.3f}%" if "mask_agreement" in row else ""
        print(f"| {row['impl']} | {row['method']} | {row['pattern']} | {row['wall_s']:.2f} | {peak} | "
              f"{tokens / row['wall_s']:.0f} | {ratio} | {agree} |")
    record = {"model": args.model, "dtype": str(dtype)[6:], "device": device_name, "nsamples": args.nsamples,
              "seqlen": args.seqlen, "memory_fraction": args.memory_fraction, "threads": torch.get_num_threads(),
              "versions": versions(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])])}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**record, **row}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
