"""2:4 semi-structured sparse matmul against dense on an NVIDIA GPU (Ampere or newer), with torch.

    python benchmarks/sparse24_gpu.py                       # Llama-2-7B's linear shapes, fp16, batch 1..4096 tokens
    python benchmarks/sparse24_gpu.py --dtype bfloat16 --tokens 1 16 2048

For each weight shape [out, in] and token count, a random weight is pruned to 2:4 (the 2 smallest |w| of
every 4 inputs), compressed with torch.sparse.to_sparse_semi_structured (cuSPARSELt, or CUTLASS), and
x @ W^T is timed against the dense matmul of the same pruned weight (CUDA events, median of --repeat
runs after warm-up). The results are checked to agree. Prints a table and appends JSON lines to --results.

2:4 only speeds up matmuls on GPUs with sparse tensor cores, and only through kernels like these: on a
CPU, no PyTorch kernel uses it, so this script refuses to run there. vLLM (vllm#36799) and torchao
(ao#4728) removed their 2:4 inference paths in 2026; torch's own semi-structured tensors remain.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

SHAPES = {  # Llama-2-7B's linear layers, [out, in]
    "q/k/v/o": (4096, 4096),
    "gate/up": (11008, 4096),
    "down": (4096, 11008),
}


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    groups = weight.reshape(weight.shape[0], -1, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0).reshape(weight.shape)


def time_ms(fn, repeat: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 2048, 4096])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--results", default=str(Path(__file__).with_name("results.jsonl")))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sparse24_gpu.py: no CUDA GPU is visible; 2:4 sparse kernels exist only on NVIDIA GPUs "
              "(compute capability 8.0 or newer). Run it on such a machine.", file=sys.stderr)
        return 2
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        print(f"sparse24_gpu.py: this GPU has compute capability {capability}; 2:4 kernels need 8.0 or newer",
              file=sys.stderr)
        return 2
    from torch.sparse import to_sparse_semi_structured

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (out, inp) in SHAPES.items():
        weight = prune_2_4(torch.randn(out, inp, device="cuda", dtype=dtype, generator=generator))
        sparse = to_sparse_semi_structured(weight)
        for tokens in args.tokens:
            x = torch.randn(tokens, inp, device="cuda", dtype=dtype, generator=generator)
            dense_ms = time_ms(lambda: torch.nn.functional.linear(x, weight), args.repeat)
            try:
                sparse_ms = time_ms(lambda: torch.nn.functional.linear(x, sparse), args.repeat)
                got = torch.nn.functional.linear(x, sparse)
                want = torch.nn.functional.linear(x, weight)
                agree = bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-1))
            except (RuntimeError, NotImplementedError) as exc:  # a shape or batch the kernel does not take
                sparse_ms, agree = float("nan"), f"unsupported: {str(exc).splitlines()[0][:80]}"
            rows.append({"shape": name, "out": out, "in": inp, "tokens": tokens, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "agree": agree})
    print(f"{'layer':8} {'tokens':>6} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>8}  agree")
    for row in rows:
        print(f"{row['shape']:8} {row['tokens']:6d} {row['dense_ms']:9.4f} {row['sparse_ms']:9.4f} "
              f"{row['speedup']:8.2f}  {row['agree']}")
    provenance = {"benchmark": "sparse24_gpu", "device": torch.cuda.get_device_name(), "dtype": args.dtype,
                  "torch": torch.__version__, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(args.results, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**provenance, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
