"""Inference speed of a dense model and its pruned versions, side by side in one run.

    python benchmarks/inference.py --model smollm2-135m --sparsity 0.25
    python benchmarks/inference.py --model smollm2-135m --variants dense,width,layers --rounds 9 --output out.json

Each variant is made from the same loaded model through the run API (no evaluation): structured
patterns with a weight-only criterion by default (speed depends on the shapes, not on which units
went), plus `unstructured` (magnitude, 50% zeros: same shapes as dense). Then, per device (the CPU,
and CUDA when present), variants are timed round-robin so that a busy neighbour slows all of them
alike, and the median of the rounds is reported, as tokens/s and as a ratio to dense:

- prefill: one forward of a `--prefill` token prompt at batch 1, with the KV cache on and logits
  for the last position only (what `generate` does before its first token);
- decode: `--decode` greedy tokens at batch 1, one forward per token with the KV cache, after a
  `--context` token prompt.

Ratios are the median over rounds of dense time / variant time within the round.

Also reported: parameters, and the size of the safetensors checkpoint each variant saves to.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oneshot import RunSpec, run  # noqa: E402
from oneshot.export import directory_bytes  # noqa: E402
from oneshot.models import load_model  # noqa: E402
from oneshot.record import device_name, versions  # noqa: E402
from oneshot.spec import Calibration, Evaluation  # noqa: E402

STRUCTURED = ("layers", "heads", "channels", "width")


def make_variant(loaded, name: str, sparsity: float, criterion: str, options: dict):
    """A pruned copy of the loaded model, and what its run recorded (None for dense)."""
    model = copy.deepcopy(loaded.model)
    if name == "dense":
        return model, None
    pattern, method, target = (name, criterion, sparsity) if name in STRUCTURED else ("unstructured", "magnitude", 0.5)
    spec = RunSpec(model=loaded.name, method=method, pattern=pattern, sparsity=target, options=options,
                   calibration=Calibration("wiki-offline", 8, 256), eval=Evaluation((), None), device="cpu",
                   dtype="float32", progress=False)
    own = type(loaded)(model, loaded.tokenizer, loaded.name, loaded.source)
    record = run(spec, loaded=own)
    return model, record


def checkpoint_bytes(model) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory, safe_serialization=True)
        return directory_bytes(directory)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, steps: int, device: str) -> float:
    """Seconds for `steps` greedy tokens after the prompt `ids` (the prompt's own forward excluded)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start


def measure(models: dict, device: str, args, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, args.prefill), generator=generator).to(device)
    context = torch.randint(3, vocab, (1, args.context), generator=generator).to(device)
    for model in models.values():
        model.to(device).eval()
        prefill_seconds(model, prompt, device)  # warm-up: allocator, kernels, caches
        decode_seconds(model, context, 4, device)
    times = {name: {"prefill": [], "decode": []} for name in models}
    for _ in range(args.rounds):  # round-robin: a busy neighbour slows every variant alike
        for name, model in models.items():
            times[name]["prefill"].append(prefill_seconds(model, prompt, device))
            times[name]["decode"].append(decode_seconds(model, context, args.decode, device))
    for model in models.values():
        model.to("cpu")
    result = {}
    dense = times["dense"]
    for name, t in times.items():
        prefill, decode = statistics.median(t["prefill"]), statistics.median(t["decode"])
        # Ratios within a round, then their median: the load of a shared machine drifts between rounds.
        result[name] = {"prefill_tok_s": args.prefill / prefill, "decode_tok_s": args.decode / decode,
                        "prefill_ratio": statistics.median(d / v for d, v in zip(dense["prefill"], t["prefill"])),
                        "decode_ratio": statistics.median(d / v for d, v in zip(dense["decode"], t["decode"])),
                        "prefill_s": t["prefill"], "decode_s": t["decode"]}
    return result


def table(device: str, rows: dict, info: dict) -> list[str]:
    lines = [f"### {device}", "",
             "| variant | removed (block params) | parameters | checkpoint MB | prefill tok/s | x dense | "
             "decode tok/s | x dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, values in rows.items():
        about = info[name]
        lines.append(f"| {about['label']} | {about['removed']} | {about['parameters'] / 1e6:.1f}M | "
                     f"{about['checkpoint_bytes'] / 1e6:.0f} | {values['prefill_tok_s']:.0f} | "
                     f"{values.get('prefill_ratio', 1):.2f} | {values['decode_tok_s']:.1f} | "
                     f"{values.get('decode_ratio', 1):.2f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.25, help="fraction of decoder-block parameters removed")
    parser.add_argument("--variants", default="dense,width,layers,channels,unstructured",
                        help="dense, layers, heads, channels, width, unstructured (magnitude 50%%); heads cannot "
                             "reach 25%% on SmolLM2-135M (attention is 25%% of a block)")
    parser.add_argument("--criterion", default="magnitude",
                        help="criterion of the structured variants (speed depends on shapes only)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prefill measurement")
    parser.add_argument("--context", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--decode", type=int, default=64, help="tokens decoded per measurement")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when present)")
    parser.add_argument("--output", help="write the measurements as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(item.split("=", 1) for item in args.option)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ("dense", "unstructured") + STRUCTURED]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}")
    if "dense" not in variants:
        variants.insert(0, "dense")
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    loaded = load_model(args.model, torch.float32)
    models, info = {}, {}
    for name in variants:
        model, record = make_variant(loaded, name, args.sparsity, args.criterion, options)
        structure = record.structure if record is not None else None
        if structure:
            removed = f"{100 * structure['removed_fraction']:.1f}%"
            label = f"{name} ({args.criterion})"
        elif name == "unstructured":
            removed, label = "0% (50% zeros)", "unstructured 50% (magnitude)"
        else:
            removed, label = "0%", "dense"
        info[name] = {"label": label, "removed": removed, "parameters": sum(p.numel() for p in model.parameters()),
                      "checkpoint_bytes": checkpoint_bytes(model),
                      "config": structure["config"] if structure else {}}
        models[name] = model
    vocab = loaded.model.get_input_embeddings().num_embeddings
    results = {}
    for device in devices:
        results[device] = measure(models, device, args, vocab)
    lines = [f"{args.model}, float32, prefill {args.prefill} tokens, decode {args.decode} tokens after "
             f"{args.context}, batch 1, median of {args.rounds} round-robin rounds; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads", ""]
    for device, rows in results.items():
        lines += table(device_name(device), rows, info) + [""]
    print("\n".join(lines))
    if args.output:
        payload = {"args": vars(args), "variants": info, "results": results, "versions": versions(),
                   "devices": {d: device_name(d) for d in devices},
                   "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
