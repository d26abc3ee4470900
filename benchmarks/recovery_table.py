"""Recovery after pruning on SmolLM2-135M (issue 13): perplexity before recovery and at checkpoints
within one run, seconds per step, exact sparsity after, for each pruning config and recovery mode.

Every run goes through `oneshot.run` (RunSpec kinds "prune" and "recover"), as the CLI does:
  1. the dense model's perplexity (once);
  2. per config, prune once and save the model (cached under --cache) -> the pruned perplexity;
  3. per mode, `recover` that saved model for --steps steps, measuring perplexity at --eval-at steps;
  4. config "iter70": iterative K=3 (--steps / 3 per stage) against one-shot 70% with --steps steps.
Training text is wiki-offline's calibration split; perplexity is its evaluation split (never trained on).
Each result is one JSON line in --out; --table prints the markdown table from that file.

    nice python benchmarks/recovery_table.py --configs sgpt70 --modes full,lora,distill --steps 200 \\
        --batch-size 2 --seqlen 256 --eval-samples 16 --out benchmarks/recovery_results.jsonl
    python benchmarks/recovery_table.py --table benchmarks/recovery_results.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oneshot import RunSpec, run  # noqa: E402
from oneshot.spec import Calibration, Evaluation, Recovery  # noqa: E402

# name -> (method, pattern, sparsity)
CONFIGS = {
    "sgpt60": ("sparsegpt", "unstructured", 0.6),
    "sgpt70": ("sparsegpt", "unstructured", 0.7),
    "sgpt24": ("sparsegpt", "2:4", None),
    "width25": ("wanda", "width", 0.25),
    "iter70": ("sparsegpt", "unstructured", 0.7),  # iterative K=3 vs one-shot, same total steps
}
MODES = {"full": dict(mode="full"), "lora": dict(mode="lora"), "lora-dense": dict(mode="lora", lora_update="dense"),
         "distill": dict(mode="full", distill=True)}


def _common(args, evaluate: bool = True) -> dict:
    return dict(model=args.model, device=args.device, seed=0, progress=not args.quiet,
                eval=Evaluation(ppl=("wiki-offline",) if evaluate else (), samples=args.eval_samples))


def _calibration(args) -> Calibration:
    return Calibration("wiki-offline", args.nsamples, args.eval_seqlen)


def _emit(out: Path, row: dict, args) -> None:
    row.setdefault("eval_samples", args.eval_samples)
    row.setdefault("eval_seqlen", args.eval_seqlen)
    row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)


def _recovery(args, mode: str, steps: int, **extra) -> Recovery:
    eval_at = tuple(s for s in args.eval_at if s < steps)
    return Recovery(steps=steps, batch_size=args.batch_size, seqlen=args.seqlen, grad_accum=args.grad_accum,
                    eval_at=eval_at, lr=args.lr.get(mode), **MODES[mode], **extra)


def _recovery_row(config: str, mode: str, record, started: float, **extra) -> dict:
    recovery = record.recovery
    before, after = recovery["ppl_before"].get("wiki-offline"), record.ppl.get("wiki-offline")
    ppl_at = {k: v["wiki-offline"] for k, v in recovery["ppl_at"].items()}
    if after is not None:
        ppl_at[str(recovery["steps"])] = after
    return dict(config=config, mode=mode, steps=recovery["steps"], batch_size=recovery["batch_size"],
                seqlen=recovery["seqlen"], grad_accum=recovery["grad_accum"], tokens=recovery["tokens"],
                lr=recovery["lr"], ppl_before=before, ppl_at=ppl_at, ppl_after=after,
                seconds_per_step=recovery["seconds_per_step"], recover_s=recovery["seconds"],
                sparsity_before=recovery["sparsity_before"], sparsity_after=recovery["sparsity_after"],
                masks_locked=recovery["masks_locked"], loss_curve=recovery["loss_curve"],
                wall_s=time.perf_counter() - started, command=record.command, device=record.device, **extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", default="sgpt60,sgpt70,sgpt24,width25,iter70")
    parser.add_argument("--modes", default="full,lora,distill",
                        help="full | lora (masked update) | lora-dense (peft's update, masked at the merge) | distill")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-at", default="50,100", help="steps (below --steps) with a perplexity measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512, help="training window")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr-full", type=float, help="peak lr for full and distill (default: oneshot's)")
    parser.add_argument("--lr-lora", type=float, help="peak lr for lora (default: oneshot's)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows for pruning")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="calibration and perplexity window")
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default="/tmp/oneshot-recovery-cache", help="pruned models, saved once")
    parser.add_argument("--out", default="benchmarks/recovery_results.jsonl")
    parser.add_argument("--no-baselines", action="store_true", help="skip the dense row")
    parser.add_argument("--time-only", action="store_true",
                        help="no perplexity at all: only seconds per step (e.g. --steps 2 at 8 x 512)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--table", metavar="RESULTS.jsonl", help="print the markdown table of a results file")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return 0
    args.eval_at = [int(s) for s in args.eval_at.split(",") if s.strip()]
    args.lr = {name: args.lr_lora if mode["mode"] == "lora" else args.lr_full for name, mode in MODES.items()}
    out, cache = Path(args.out), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    configs, modes = args.configs.split(","), args.modes.split(",")

    if not args.no_baselines and not args.time_only:
        started = time.perf_counter()
        dense = run(RunSpec(method="dense", calibration=_calibration(args), **_common(args)))
        _emit(out, dict(config="dense", mode="-", ppl_after=dense.ppl["wiki-offline"], sparsity_after=0.0,
                        wall_s=time.perf_counter() - started, command=dense.command, device=dense.device), args)
    for config in configs:
        method, pattern, sparsity = CONFIGS[config]
        saved = cache / f"{config if config != 'iter70' else 'sgpt70'}-{args.nsamples}x{args.eval_seqlen}"
        if not (saved / "oneshot.json").is_file():  # pruned once; its perplexity is each recovery's "before"
            started = time.perf_counter()
            pruned = run(RunSpec(method=method, pattern=pattern, sparsity=sparsity, calibration=_calibration(args),
                                 save_model=str(saved), overwrite=True, **_common(args, evaluate=False)))
            _emit(out, dict(config=config, mode="none", sparsity_after=pruned.sparsity_measured,
                            prune_s=pruned.timings["prune_s"], wall_s=time.perf_counter() - started,
                            command=pruned.command, device=pruned.device), args)
        if config == "iter70":
            for mode in modes:
                stages = 3
                started = time.perf_counter()
                record = run(RunSpec(method=method, pattern=pattern, sparsity=sparsity, calibration=_calibration(args),
                                     recover=_recovery(args, mode, args.steps // stages, iterative=stages),
                                     **_common(args, evaluate=not args.time_only)))
                row = _recovery_row("iter70 (K=3)", mode, record, started, stages=record.stages)
                row["steps_total"] = stages * (args.steps // stages)
                _emit(out, row, args)
            continue
        for mode in modes:
            started = time.perf_counter()
            record = run(RunSpec(kind="recover", method="dense", model=str(saved), recover=_recovery(args, mode, args.steps),
                                 calibration=Calibration(seqlen=args.eval_seqlen),
                                 **{k: v for k, v in _common(args, evaluate=not args.time_only).items() if k != "model"}))
            _emit(out, _recovery_row(config, mode, record, started), args)
    return 0


def markdown_table(rows: list[dict]) -> str:
    """One line per (config, mode, batch x seqlen): perplexity before, at each step measured, after."""
    # the dense perplexity on the same evaluation windows as each row (the gap it closes is to that one)
    dense_at = {(r.get("eval_samples", 16), r.get("eval_seqlen", 512)): r["ppl_after"] for r in rows
                if r["config"] == "dense"}
    steps = sorted({int(s) for r in rows if not r.get("stages") for s in r.get("ppl_at", {})})
    lines = ["dense perplexity: " + ", ".join(f"{v:.2f} ({n} windows of {L})" for (n, L), v in dense_at.items()), "",
             "| config | mode | batch x seqlen | ppl before | " + " | ".join(f"ppl @{s}" for s in steps)
             + " | gap closed | s/step | sparsity after | eval windows |",
             "|---|---|---|---|" + "---|" * len(steps) + "---|---|---|---|"]
    for r in rows:
        if r["config"] == "dense":
            continue
        if r["mode"] == "none" or r.get("stages"):  # the pruning itself; iterative runs: their own table below
            continue
        at = [f"{r['ppl_at'][str(s)]:.2f}" if str(s) in r["ppl_at"] else "" for s in steps]
        gap = ""
        windows = (r.get("eval_samples", 16), r.get("eval_seqlen", 512))
        if r["ppl_before"] is None:  # a timing run
            lines.append(f"| {r['config']} | {r['mode']} | {r['batch_size']}x{r['seqlen']} | (timing only, "
                         f"{r['steps']} steps) | " + " | " * len(steps) + f" | {r['seconds_per_step']:.1f} | "
                         f"{r['sparsity_after']:.4f} | - |")
            continue
        dense = dense_at.get(windows)
        if dense is not None and r["ppl_before"] > dense:
            gap = f"{100 * (r['ppl_before'] - r['ppl_after']) / (r['ppl_before'] - dense):.0f}%"
        lines.append(f"| {r['config']} | {r['mode']} | {r['batch_size']}x{r['seqlen']} | {r['ppl_before']:.2f} | "
                     + " | ".join(at) + f" | {gap} | {r['seconds_per_step']:.2f} | {r['sparsity_after']:.4f} | "
                     f"{windows[0]}x{windows[1]} |")
    for r in rows:
        if not r.get("stages"):
            continue
        lines += ["", f"{r['config']} {r['mode']}, {r['steps']} steps of {r['batch_size']}x{r['seqlen']} per stage "
                  f"({r['steps_total']} in all), {r['seconds_per_step']:.2f} s/step:", "",
                  "| stage | target | sparsity | ppl pruned | ppl recovered | prune s | recover s |",
                  "|---|---|---|---|---|---|---|"]
        for st in r["stages"]:
            lines.append(f"| {st['stage']} | {st['sparsity_target']:.4f} | {st['sparsity']:.6f} | "
                         f"{st['ppl_pruned']['wiki-offline']:.2f} | {st['ppl_recovered']['wiki-offline']:.2f} | "
                         f"{st['prune_s']:.0f} | {st['recover_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
