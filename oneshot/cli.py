"""Command line: `oneshot prune`.

Every argument is checked before any work starts; a bad one ends the run with one line on stderr,
exit status 2, and nothing written. Outputs are written only when the run has finished, each to a
temporary name first, so an interrupted run leaves no partial result behind.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import __version__


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in alias (smollm2-135m), random:<preset>, a .gguf file, a local directory or a Hub id")
    p.add_argument("--method", default="sparsegpt", help="magnitude | wanda | sparsegpt | dense (no pruning)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights to prune, in [0, 1); default 0.5 (N:M patterns fix it to N/M)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (N of every M inputs pruned), e.g. 2:4")
    p.add_argument("--calibration", default="wiki-offline",
                   help="wiki-offline | c4 | wikitext2 | ptb | file:PATH | tokens:PATH")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; all rows for tokens:)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; the file's for tokens:)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and random models")
    p.add_argument("--eval-ppl", default="wiki-offline",
                   help="comma-separated perplexity sources (same names as --calibration); 'none' to skip")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate at most this many windows per source (default: all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16 (auto: float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per block forward (default: about 16k tokens per batch)")
    p.add_argument("--output", default=None, help="directory for result.json")
    p.add_argument("--save-model", default=None, help="directory for the pruned model (safetensors) and its card")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oneshot", description="One-shot pruning of LLMs: SparseGPT, Wanda, magnitude.")
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_prune_arguments(commands.add_parser("prune", help="prune a model and measure it"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("give a command: oneshot prune ... (see `oneshot --help`)")
        return run_prune(args, argv)
    except UsageError as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oneshot: interrupted; nothing was written", file=sys.stderr)
        return 130


# ---- prune -----------------------------------------------------------------------------------

def _check_prune_args(args):
    """Everything that can be checked without loading the model; returns the resolved settings."""
    import torch

    from calibration import SourceError, check_source
    from .methods import METHODS, PatternError, check_sparsity, parse_pattern
    from .models import ModelError, check_model_spec

    if args.method != "dense" and args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)} or dense")
    try:
        pattern = parse_pattern(args.pattern)
        if pattern.structured:
            if args.sparsity is not None and abs(args.sparsity - pattern.sparsity) > 1e-9:
                raise UsageError(f"--sparsity {args.sparsity} conflicts with pattern {pattern}, which prunes "
                                 f"{pattern.sparsity:g}; leave --sparsity out")
            sparsity = pattern.sparsity
        else:
            sparsity = check_sparsity(0.5 if args.sparsity is None else args.sparsity)
    except PatternError as exc:
        raise UsageError(str(exc)) from None
    for flag, value in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen), ("--batch-size", args.batch_size),
                        ("--eval-samples", args.eval_samples)):
        if value is not None and value < (2 if flag == "--seqlen" else 1):
            raise UsageError(f"{flag} must be a positive whole number (got {value})")
    device = _resolve_device(args.device)
    if args.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"unknown dtype {args.dtype!r}; choose auto, float32, float16 or bfloat16")
    try:
        model_kind = check_model_spec(args.model)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    eval_sources = [] if args.eval_ppl.strip().lower() in ("", "none") else [s.strip() for s in args.eval_ppl.split(",")]
    try:
        if args.method not in ("dense", "magnitude"):
            check_source(args.calibration, "calibration")
        for source in eval_sources:
            check_source(source, "evaluation")
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    for flag, directory in (("--output", args.output), ("--save-model", args.save_model)):
        if directory and Path(directory).exists() and any(Path(directory).iterdir()):
            raise UsageError(f"{flag} {directory} already exists and is not empty; choose a new directory")
    if args.output and args.save_model and Path(args.output).resolve() == Path(args.save_model).resolve():
        raise UsageError("--output and --save-model must be different directories")
    dtype = _resolve_dtype(args.dtype, device, args.model, model_kind)
    return dict(pattern=pattern, sparsity=sparsity, device=device, dtype=dtype, eval_sources=eval_sources,
                model_kind=model_kind)


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return name
    raise UsageError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")


def _resolve_dtype(name: str, device: str, spec: str, kind: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and gain nothing here
    if kind in ("hub", "local"):
        from transformers import AutoConfig

        if getattr(AutoConfig.from_pretrained(spec), "dtype", None) == torch.bfloat16:
            return torch.bfloat16  # bf16-trained weights can overflow in fp16
    return torch.float16


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_prune(args, argv) -> int:
    settings = _check_prune_args(args)
    import torch

    from calibration import SourceError, calibration_windows, evaluation_windows
    from .engine import measure_sparsity, prune_model
    from .evaluate.perplexity import perplexity
    from .methods import NumericsError, PatternError, get_method
    from .models import ModelError, load_model

    device, dtype, pattern = settings["device"], settings["dtype"], settings["pattern"]
    progress = not args.quiet
    timings = {}
    try:
        _log(f"loading {args.model} ({str(dtype).replace('torch.', '')})")
        start = time.perf_counter()
        loaded = load_model(args.model, dtype=dtype, seed=args.seed)
        timings["load_s"] = time.perf_counter() - start
        model, tokenizer = loaded.model, loaded.tokenizer
        seqlen = _check_against_model(model, args, pattern)

        calibration = None
        method = None if args.method == "dense" else get_method(args.method)
        if method is not None and method.statistic is not None:
            start = time.perf_counter()
            ids = calibration_windows(args.calibration, tokenizer, args.nsamples, seqlen, args.seed)
            _check_token_range(ids, model, args.calibration)
            seqlen = seqlen or int(ids.shape[1])  # a tokens: file sets it for evaluation too
            calibration = {"source": args.calibration, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                           "seed": args.seed}
            timings["calibration_s"] = time.perf_counter() - start
            _log(f"calibration: {ids.shape[0]} windows x {ids.shape[1]} tokens from {args.calibration}")
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        if method is None:
            report = measure_sparsity(model)
            timings["prune_s"] = 0.0
        else:
            report = prune_model(model, method, settings["sparsity"], pattern,
                                 ids if calibration else None, device=device, batch_size=args.batch_size,
                                 progress=progress)
            timings["prune_s"] = report.timings["prune_s"]

        ppl, windows = {}, {}
        start = time.perf_counter()
        if settings["eval_sources"]:
            model.to(device)
            for source in settings["eval_sources"]:
                eval_ids = evaluation_windows(source, tokenizer, seqlen, args.eval_samples)
                _check_token_range(eval_ids, model, source)
                windows[source] = list(eval_ids.shape)
                ppl[source] = perplexity(model, eval_ids, device, batch_size=1, progress=progress)
                _log(f"perplexity {source}: {ppl[source]:.3f} ({eval_ids.shape[0]} windows x {eval_ids.shape[1]})")
            model.to("cpu")
        timings["eval_s"] = time.perf_counter() - start
    except (SourceError, ModelError, PatternError, NumericsError) as exc:
        raise UsageError(str(exc)) from None

    result = {
        "model": args.model,
        "model_source": loaded.source,
        "family": getattr(model.config, "model_type", type(model).__name__),
        "method": args.method,
        "pattern": str(pattern),
        "sparsity_target": 0.0 if method is None else settings["sparsity"],
        "sparsity_measured": report.sparsity,
        "sparsity_per_layer": report.layer_sparsity,
        "method_notes": report.layer_info,
        "ppl": ppl,
        "eval": {"windows": windows, "max_windows": args.eval_samples},
        "calibration": calibration,
        "seed": args.seed,
        "timings": timings,
        "peak_memory_gib": _peak_memory_gib(device),
        "peak_memory_kind": "cuda max allocated" if device.startswith("cuda") else "host max RSS",
        "device": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(),
        "command": ["oneshot", *argv],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _print_table(result)
    if args.save_model:
        save_model(loaded, result, args.save_model)
        _log(f"saved the pruned model to {args.save_model}")
    if args.output:
        write_json_atomic(Path(args.output) / "result.json", result)
        _log(f"wrote {Path(args.output) / 'result.json'}")
    return 0


def _check_against_model(model, args, pattern) -> int:
    """Checks that need the model (layer widths, positions); returns the seqlen to use."""
    from .engine import check_pattern

    check_pattern(model, pattern)
    seqlen = args.seqlen
    if seqlen is None and not args.calibration.startswith("tokens:"):
        seqlen = 2048
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if seqlen and limit and seqlen > limit:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's {limit} positions; pass --seqlen {limit} or less")
    return seqlen


def _check_token_range(ids, model, source) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise UsageError(f"{source} has token id {int(ids.max())} but the model's vocabulary has {vocab} entries; "
                         "it was tokenised for another model")


def _peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    found = {"python": platform.python_version(), "oneshot": __version__}
    for package in ("torch", "transformers", "numpy", "datasets", "lm-eval", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _print_table(result: dict) -> None:
    sources = list(result["ppl"])
    header = ["method", "pattern", "sparsity"] + [f"ppl {s}" for s in sources] + ["prune s"]
    row = [result["method"], result["pattern"], f"{result['sparsity_measured']:.4f}"]
    row += [f"{result['ppl'][s]:.3f}" for s in sources] + [f"{result['timings']['prune_s']:.1f}"]
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_model(loaded, result: dict, directory: str) -> None:
    """A from_pretrained-loadable checkpoint (safetensors) plus a lineage card, written then renamed."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        lineage = {key: result[key] for key in ("model", "model_source", "method", "pattern", "sparsity_target",
                                                 "sparsity_measured", "calibration", "seed", "ppl", "versions")}
        (tmp / "oneshot.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(lineage))
        if final.exists():
            final.rmdir()  # empty: checked before the run
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _card(lineage: dict) -> str:
    calibration = lineage["calibration"] or {}
    lines = [
        f"# {lineage['model']} pruned with {lineage['method']}",
        "",
        "Made by oneshot (one-shot pruning of LLMs). Lineage:",
        "",
        f"- base model: `{lineage['model']}` ({lineage['model_source']})",
        f"- method: {lineage['method']}, pattern: {lineage['pattern']}, target sparsity: {lineage['sparsity_target']}",
        f"- measured sparsity of the pruned layers: {lineage['sparsity_measured']:.4f}",
        f"- calibration: {calibration.get('source', 'none')}, {calibration.get('nsamples', 0)} x "
        f"{calibration.get('seqlen', 0)} tokens, seed {lineage['seed']}",
    ]
    lines += [f"- perplexity on {source}: {value:.3f}" for source, value in lineage["ppl"].items()]
    lines += [f"- versions: " + ", ".join(f"{k} {v}" for k, v in lineage["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
