"""2:4 semi-structured sparse matmul against dense on an NVIDIA GPU (Ampere or newer), with torch.

    python benchmarks/sparse24_gpu.py                       # Llama-2-7B's linear shapes, fp16, batch 1..4096 tokens
    python benchmarks/sparse24_gpu.py --dtype bfloat16 --tokens 1 16 2048

For each weight shape [out, in] and token count, a random weight is pruned to 2:4 (the 2 smallest |w| of
every 4 inputs), compressed with torch.sparse.to_sparse_semi_structured (cuSPARSELt, or CUTLASS), and
x @ W^T is timed against the dense matmul of the same pruned weight (CUDA events, median of --repeat
runs after warm-up). The results are checked to agree. Prints a table and appends JSON lines to --results.
`--backends cusparselt cutlass` times each of torch's two kernels by name (default: torch's own choice,
to_sparse_semi_structured). benchmarks/gpu_check.py imports `measure` and `backend_status` from here.

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


def time_ms(fn, repeat: int, device: str = "cuda") -> float:
    """Median milliseconds of `fn` after 5 warm-up calls: CUDA events on a GPU, the wall clock on a CPU."""
    import time

    for _ in range(5):
        fn()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


BACKENDS = ("default", "cusparselt", "cutlass")  # default: whatever to_sparse_semi_structured picks


def backend_status(backend: str, device: str = "cuda") -> str | None:
    """None when `backend` can run here, else why not (one line)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "skipped: no CUDA (2:4 sparse kernels exist only on NVIDIA GPUs)"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"skipped: compute capability {torch.cuda.get_device_capability()} < (8, 0)"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "unavailable: torch.backends.cusparselt.is_available() is False in this torch build"
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}"
    return None


def compress(weight: torch.Tensor, backend: str):
    """The 2:4 weight as torch's semi-structured tensor of the named backend."""
    import torch.sparse as sparse

    if backend == "cusparselt":
        return sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense(weight)
    if backend == "cutlass":
        return sparse.SparseSemiStructuredTensorCUTLASS.from_dense(weight)
    return sparse.to_sparse_semi_structured(weight)


def measure(dtype: torch.dtype, tokens, repeat: int, backends=("default",), shapes=None, device: str = "cuda",
            seed: int = 0, on_row=None) -> list[dict]:
    """One row per shape, token count and backend: the dense and 2:4 milliseconds of x @ W^T, the
    speed-up and whether the two agree. A backend that cannot run here (backend_status) gives rows
    whose `agree` says why and whose sparse time is NaN; the dense time is measured all the same.
    `on_row(row)` is called as each row is done (to save results as they come)."""
    shapes = SHAPES if shapes is None else shapes
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for name, (out, inp) in shapes.items():
        weight = prune_2_4(torch.randn(out, inp, device=device, dtype=dtype, generator=generator))
        compressed = {}
        for backend in backends:
            why = backend_status(backend, device)
            if why is None:
                try:
                    compressed[backend] = compress(weight, backend)
                except (RuntimeError, NotImplementedError, ValueError) as exc:  # dtype or shape not taken
                    why = f"unsupported: {str(exc).splitlines()[0][:120]}"
            if why is not None:
                compressed[backend] = why
        for count in tokens:
            x = torch.randn(count, inp, device=device, dtype=dtype, generator=generator)
            dense_ms = time_ms(lambda: torch.nn.functional.linear(x, weight), repeat, device)
            for backend in backends:
                sparse = compressed[backend]
                if isinstance(sparse, str):
                    sparse_ms, agree = float("nan"), sparse
                else:
                    try:
                        sparse_ms = time_ms(lambda: torch.nn.functional.linear(x, sparse), repeat, device)
                        got = torch.nn.functional.linear(x, sparse)
                        want = torch.nn.functional.linear(x, weight)
                        agree = bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-1))
                    except (RuntimeError, NotImplementedError) as exc:  # a shape or batch the kernel does not take
                        sparse_ms, agree = float("nan"), f"unsupported: {str(exc).splitlines()[0][:80]}"
                row = {"shape": name, "out": out, "in": inp, "tokens": count, "dtype": str(dtype)[6:],
                       "backend": backend, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                       "speedup": dense_ms / sparse_ms, "agree": agree}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 2048, 4096])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--backends", nargs="+", default=["default"], choices=BACKENDS)
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
    rows = measure(getattr(torch, args.dtype), args.tokens, args.repeat, args.backends)
    print(f"{'layer':8} {'tokens':>6} {'backend':>10} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>8}  agree")
    for row in rows:
        print(f"{row['shape']:8} {row['tokens']:6d} {row['backend']:>10} {row['dense_ms']:9.4f} "
              f"{row['sparse_ms']:9.4f} {row['speedup']:8.2f}  {row['agree']}")
    provenance = {"benchmark": "sparse24_gpu", "device": torch.cuda.get_device_name(), "dtype": args.dtype,
                  "torch": torch.__version__, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(args.results, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**provenance, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
