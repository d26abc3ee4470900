"""Speed and perplexity of oneshot's GGUF files in llama.cpp itself (through llama-cpp-python).

    python benchmarks/llamacpp.py --model smollm2-135m --out benchmarks/llamacpp_runs
    python benchmarks/llamacpp.py --model gemma3-270m --out benchmarks/llamacpp_runs
    python benchmarks/llamacpp.py --model smollm2-135m --head f32 --out benchmarks/llamacpp_runs   # head left F32

Each variant is made once through the run API and saved with --format gguf (resumable: a variant whose file
and made.json exist is not made again): dense in F32, Q8_0 and Q4_0; width, layers and channels at 25% then quantised to
Q4_0 in a second run (one run does not quantise a structured model), the kept MLP channels a multiple of
32 (channel_multiple), the width of a Q4_0 block; unstructured 50% (Wanda) and 2:4
(SparseGPT) pruned jointly with oneshot's Q4_0 codes. The quantised files' output head is Q8_0 (--quantize-head,
as llama.cpp's own quantiser quantises it) unless --head f32. A variant the model cannot take (width on a model
whose query heads share one key/value head, blocks removed from Gemma 3's fixed sliding pattern) is refused
before any work and listed in the table with the reason. Then llama.cpp opens every file at once and times them
round-robin, so that a busy neighbour slows all of them alike:

- prefill: one pass over a --prefill token prompt (logits of the last position only), tokens/s;
- decode: --decode tokens fed one at a time after that prompt, tokens/s.

Medians over --rounds; ratios are the median over rounds of (dense of the same quantisation's time / the
variant's time) within a round. Perplexity beside each: llama.cpp's on the file, and oneshot's own on the same
weights (the run that made the file), on the same windows. Writes JSON (raw rounds, versions, device, date)
and a markdown table to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oneshot import RunSpec, run  # noqa: E402
from oneshot.record import versions  # noqa: E402
from oneshot.errors import UsageError  # noqa: E402
from oneshot.spec import Calibration, Evaluation  # noqa: E402

GRIDS = {"f32": {}, "q8_0": dict(quantize="int8", symmetric=True, group_size=32),
         "q4_0": dict(quantize="int4", symmetric=True, group_size=32)}
# name -> (method, pattern, sparsity, grid); structured ones are quantised in a second, dense run
VARIANTS = {
    "dense-f32": ("dense", "unstructured", None, "f32"),
    "dense-q8_0": ("dense", "unstructured", None, "q8_0"),
    "dense-q4_0": ("dense", "unstructured", None, "q4_0"),
    "width25-q4_0": ("wanda", "width", 0.25, "q4_0"),  # kept channels a multiple of Q4_0's 32 (channel_multiple)
    "layers25-q4_0": ("block-influence", "layers", 0.25, "q4_0"),
    "channels25-q4_0": ("wanda", "channels", 0.25, "q4_0"),
    "unstructured50-q4_0": ("wanda", "unstructured", 0.5, "q4_0"),
    "2:4-q4_0": ("sparsegpt", "2:4", None, "q4_0"),
}
STRUCTURED = ("layers", "heads", "channels", "width")


def make(model: str, name: str, out: Path, calibration: Calibration, evaluation: Evaluation,
         quantize_head: bool) -> dict:
    """Save variant `name` as out/name/model.gguf; its record's summary (cached beside it)."""
    target = out / name.replace(":", "_")
    summary = target / "made.json"
    if summary.exists() and (target / "gguf" / "model.gguf").exists():  # a summary alone (a clone) is made again
        return json.loads(summary.read_text())
    method, pattern, sparsity, grid = VARIANTS[name]
    common = dict(calibration=calibration, eval=evaluation, progress=True, format="gguf",
                  quantize_head=quantize_head and grid != "f32")
    if pattern in STRUCTURED:
        options = {"channel_multiple": 32} if pattern in ("width", "channels") else {}
        structure = run(RunSpec(model=model, method=method, pattern=pattern, sparsity=sparsity, options=options,
                                eval=Evaluation(ppl=()), calibration=calibration,
                                save_model=str(target / "structured"), progress=True)).structure
        record = run(RunSpec(model=str(target / "structured"), method="dense", save_model=str(target / "gguf"),
                             **GRIDS[grid], **common))
    else:
        structure = None
        record = run(RunSpec(model=model, method=method, pattern=pattern, sparsity=sparsity,
                             save_model=str(target / "gguf"), **GRIDS[grid], **common))
    made = {"variant": name, "method": method, "pattern": pattern, "sparsity": sparsity, "grid": grid,
            "ppl_oneshot": record.ppl["wiki-offline"], "windows": record.eval["windows"],
            "file_bytes": (target / "gguf" / "model.gguf").stat().st_size,
            "params_removed_fraction": (structure or {}).get("removed_fraction"),
            "sparsity_measured": record.sparsity_measured, "versions": record.versions}
    summary.write_text(json.dumps(made, indent=1))
    return made


def eval_windows(model: str, seqlen: int, samples: int):
    """The wiki-offline evaluation windows oneshot measures on (the same tokens llama.cpp gets)."""
    from calibration import evaluation_windows
    from oneshot.models import bos_every_window, load_model

    loaded = load_model(model)
    bos = bos_every_window(loaded.model) and getattr(loaded.tokenizer, "bos_token_id", None) is not None
    return evaluation_windows("wiki-offline", loaded.tokenizer, seqlen, samples,
                              bos=loaded.tokenizer.bos_token_id if bos else None)


def timed(llm, prompt: list[int], decode: list[int]) -> tuple[float, float]:
    """(prefill s, decode s) of one prompt and `decode` tokens fed one by one."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    middle = time.perf_counter()
    for token in decode:
        llm.eval([token])
    return middle - start, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="benchmarks/llamacpp_runs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--head", choices=("q8_0", "f32"), default="q8_0",
                        help="the output head of the quantised files: Q8_0 (--quantize-head, as llama.cpp's own "
                             "quantiser does) or F32 (results under MODEL-f32-head)")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    import torch
    from llama_cpp import Llama

    from oneshot.evaluate.llamacpp import perplexity

    torch.set_num_threads(args.threads)
    out = Path(args.out) / (args.model if args.head == "q8_0" else f"{args.model}-f32-head")
    out.mkdir(parents=True, exist_ok=True)
    calibration = Calibration("wiki-offline", 16, args.eval_seqlen)
    evaluation = Evaluation(samples=args.eval_samples)
    made, refused = {}, {}
    for name in names:
        try:
            made[name] = make(args.model, name, out, calibration, evaluation, args.head == "q8_0")
        except UsageError as error:  # the model's shape or llama.cpp cannot take this variant: say why in the table
            refused[name] = str(error)
            print(f"{name}: refused: {error}", flush=True)
    names = [name for name in names if name in made]
    windows = eval_windows(args.model, args.eval_seqlen, args.eval_samples)
    for name in names:
        if "ppl_llamacpp" not in made[name]:
            made[name]["ppl_llamacpp"] = perplexity(str(out / name.replace(":", "_") / "gguf" / "model.gguf"), windows)
            (out / name.replace(":", "_") / "made.json").write_text(json.dumps(made[name], indent=1))
    text = windows.flatten().tolist()
    prompt, decode = text[: args.prefill], text[args.prefill: args.prefill + args.decode]
    llms = {name: Llama(model_path=str(out / name.replace(":", "_") / "gguf" / "model.gguf"),
                        n_ctx=args.prefill + args.decode, n_batch=args.prefill, n_ubatch=args.prefill,
                        n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0)
            for name in names}
    load = [os.getloadavg()[0]]
    rounds = []
    for index in range(args.rounds + 1):  # round 0 warms caches and is not counted
        times = {name: timed(llms[name], prompt, decode) for name in names}
        if index:
            rounds.append(times)
            print(f"round {index}: " + ", ".join(f"{n} {args.decode / t[1]:.1f} tok/s" for n, t in times.items()),
                  flush=True)
    load.append(os.getloadavg()[0])
    rows = []
    for name in names:
        grid = VARIANTS[name][3]
        dense = f"dense-{grid}" if f"dense-{grid}" in names else None
        row = dict(made[name])
        row["prefill_tok_s"] = statistics.median(args.prefill / r[name][0] for r in rounds)
        row["decode_tok_s"] = statistics.median(args.decode / r[name][1] for r in rounds)
        if dense:
            row["prefill_x"] = statistics.median(r[dense][0] / r[name][0] for r in rounds)
            row["decode_x"] = statistics.median(r[dense][1] / r[name][1] for r in rounds)
        row["ppl_diff_pct"] = 100 * (row["ppl_llamacpp"] / row["ppl_oneshot"] - 1)
        rows.append(row)
    from llama_cpp import __version__ as llama_cpp_version

    result = {"model": args.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", *sys.argv]), "threads": args.threads, "rounds_counted": args.rounds,
              "prefill_tokens": args.prefill, "decode_tokens": args.decode, "load_average_start_end": load,
              "device": f"cpu ({os.cpu_count()} cores), llama.cpp {args.threads} threads",
              "versions": {**versions(), "llama-cpp-python": llama_cpp_version},
              "eval": {"source": "wiki-offline", "seqlen": args.eval_seqlen, "windows": args.eval_samples},
              "head": args.head, "rows": rows, "refused": refused, "raw_rounds": [{n: list(t) for n, t in r.items()} for r in rounds]}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    table = ["| variant | file MiB | ppl llama.cpp | ppl oneshot | diff | prefill tok/s | x dense | decode tok/s "
             "| x dense |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        fmt = lambda key: f"{row[key]:.2f}x" if key in row else "-"  # noqa: E731
        table.append(f"| {row['variant']} | {row['file_bytes'] / 2**20:.1f} | {row['ppl_llamacpp']:.2f} | "
                     f"{row['ppl_oneshot']:.2f} | {row['ppl_diff_pct']:+.2f}% | {row['prefill_tok_s']:.0f} | "
                     f"{fmt('prefill_x')} | {row['decode_tok_s']:.1f} | {fmt('decode_x')} |")
    table += [f"| {name} | refused: {why} |||||||| " for name, why in refused.items()]
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"load average {load[0]:.2f} -> {load[1]:.2f}; wrote {out / 'result.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
