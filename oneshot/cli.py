"""Command line: `oneshot prune` and `oneshot eval`.

Every argument is checked before any work starts; a bad one ends the run with one line on stderr,
exit status 2, and nothing written. Outputs are written only when the run has finished, each to a
temporary name first, so an interrupted run leaves no partial result behind.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import __version__
from .atomic import write_atomic


DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")  # float64: for numerical studies


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class RunError(Exception):
    """A run that started but cannot finish (memory, numerics, a foreign checkpoint): one line, exit 1."""


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
    p.add_argument("--dtype", default="auto", help=" | ".join(DTYPES) + " (auto: float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per block forward (default: about 16k tokens per batch on CUDA, 4k on CPU)")
    _add_zeroshot_arguments(p)
    p.add_argument("--output", default=None, help="directory for result.json")
    p.add_argument("--save-model", default=None, help="directory for the pruned model (safetensors) and its card")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of existing output directories")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save each finished block here, so that a killed run can continue with --resume")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")


def _add_zeroshot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-tasks", default="none",
                   help="zero-shot accuracy through lm-eval on the model in memory: a suite (offline | wanda | "
                        "sparsegpt) or comma-separated lm-eval task names; 'none' to skip")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate at most this many documents per zero-shot task (default: all)")
    p.add_argument("--eval-batch-size", default=None,
                   help="lm-eval batch size: a whole number or auto (default: 8 on CPU, 32 on CUDA)")
    p.add_argument("--offline", action="store_true",
                   help="never contact the Hugging Face Hub (also automatic when it is unreachable)")


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=None,
                       help="as for prune (default smollm2-135m): alias, random:<preset>, .gguf, directory or Hub id")
    which.add_argument("--pruned", default=None, help="a directory written by `oneshot prune --save-model`")
    p.add_argument("--eval-ppl", default="wiki-offline",
                   help="comma-separated perplexity sources (as for prune); 'none' to skip")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate at most this many windows per source (default: all)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per perplexity window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for random models")
    _add_zeroshot_arguments(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help=" | ".join(DTYPES) + " (auto: float32 on CPU)")
    p.add_argument("--output", default=None, help="directory for result.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oneshot", description="One-shot pruning of LLMs: SparseGPT, Wanda, magnitude.")
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_prune_arguments(commands.add_parser("prune", help="prune a model and measure it"))
    from . import report, sweep

    sweep.add_parser(commands)
    report.add_parser(commands)
    _add_eval_arguments(commands.add_parser("eval", help="measure a dense or saved pruned model (perplexity, "
                                                         "zero-shot accuracy)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`oneshot COMMAND ...`: a bad argument or a failed run is one line on stderr and an exit status."""
    return dispatch(sys.argv[1:] if argv is None else argv)


def dispatch(argv: list[str]) -> int:
    """main's body; `python -m oneshot.sweep|report` enter here too (a sweep calls main per run)."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("give a command: oneshot prune ... or oneshot eval ... (see `oneshot --help`)")
        if args.command in ("sweep", "report"):
            return args.handler(args)
        if args.offline:  # before anything can import datasets or probe the Hub
            from .evaluate.zeroshot import configure_offline

            configure_offline(force=True)
        return run_eval(args, argv) if args.command == "eval" else run_prune(args, argv)
    except UsageError as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("oneshot: interrupted; nothing was written", file=sys.stderr)
        return 130


# ---- prune -----------------------------------------------------------------------------------

def _check_prune_args(args):
    """Everything that can be checked without loading the model; returns the resolved settings."""
    from calibration import SourceError, check_source
    from .methods import METHODS, PatternError, check_sparsity, parse_pattern

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
    _check_counts(("--nsamples", args.nsamples), ("--batch-size", args.batch_size))
    try:
        if args.method not in ("dense", "magnitude"):
            check_source(args.calibration, "calibration")
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    if args.output and args.save_model and Path(args.output).resolve() == Path(args.save_model).resolve():
        raise UsageError("--output and --save-model must be different directories")
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (the directory of the run to continue)")
    if args.checkpoint_dir:
        state = Path(args.checkpoint_dir) / "state.json"
        if state.exists() and not args.resume:
            raise UsageError(f"--checkpoint-dir {args.checkpoint_dir} holds a checkpoint; pass --resume to "
                             "continue it, or choose another directory")
        if args.resume and not state.exists():
            raise UsageError(f"--resume: {args.checkpoint_dir} holds no checkpoint (no state.json)")
    settings = _check_model_and_evaluation(args, ("--output", args.output), ("--save-model", args.save_model))
    return dict(settings, pattern=pattern, sparsity=sparsity)


def _check_counts(*flags) -> None:
    for flag, value in flags:
        if value is not None and value < (2 if flag == "--seqlen" else 1):
            raise UsageError(f"{flag} must be a positive whole number (got {value})")


def _check_model_and_evaluation(args, *directories) -> dict:
    """The checks prune and eval share: model, device, dtype, evaluation sources and tasks, outputs.
    Returns device, dtype, model_kind, eval_sources and zeroshot (prepared tasks or None)."""
    from calibration import SourceError, check_source
    from .models import ModelError, check_model_spec

    _check_counts(("--seqlen", args.seqlen), ("--eval-samples", args.eval_samples))
    device = _resolve_device(args.device)
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; choose {', '.join(DTYPES)}")
    try:
        model_kind = check_model_spec(args.model)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    eval_sources = [] if args.eval_ppl.strip().lower() in ("", "none") else [s.strip() for s in args.eval_ppl.split(",")]
    try:
        for source in eval_sources:
            check_source(source, "evaluation")
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    for flag, directory in directories:
        if directory and Path(directory).exists() and not Path(directory).is_dir():
            raise UsageError(f"{flag} {directory} is a file, not a directory")
        if (directory and not getattr(args, "overwrite", False) and Path(directory).exists()
                and any(Path(directory).iterdir())):
            raise UsageError(f"{flag} {directory} already exists and is not empty; choose a new directory "
                             "or pass --overwrite")
    dtype = _resolve_dtype(args.dtype, device, args.model, model_kind)
    zeroshot = _check_zeroshot_args(args, model_kind)  # last: it may take seconds
    return dict(device=device, dtype=dtype, eval_sources=eval_sources, model_kind=model_kind, zeroshot=zeroshot)


def _check_zeroshot_args(args, model_kind: str):
    """Check --eval-tasks/--eval-limit/--eval-batch-size and load the tasks' data (None if no tasks).
    Runs last among the checks: it may take seconds (lm-eval's task index, the data)."""
    from .evaluate.zeroshot import ZeroShotError, parse_task_spec, prepare_tasks

    if args.eval_limit is not None and args.eval_limit < 1:
        raise UsageError(f"--eval-limit must be a positive whole number (got {args.eval_limit})")
    batch = args.eval_batch_size
    if batch is not None and batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        raise UsageError(f"--eval-batch-size must be a positive whole number or auto (got {batch})")
    try:
        if not parse_task_spec(args.eval_tasks):
            return None
        if model_kind == "random":
            raise UsageError("--eval-tasks needs a model with a real tokenizer; random:<preset> models read bytes")
        return prepare_tasks(args.eval_tasks)
    except ZeroShotError as exc:
        raise UsageError(str(exc)) from None


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

    from calibration import SourceError, calibration_windows
    from .checkpoint import Checkpoint, CheckpointError
    from .engine import ResourceError, check_memory, measure_sparsity, prune_model
    from .evaluate.zeroshot import ZeroShotError
    from .methods import NumericsError, PatternError, get_method
    from .models import ModelError

    device, dtype, pattern = settings["device"], settings["dtype"], settings["pattern"]
    progress = not args.quiet
    timings = {}
    try:
        loaded = _load(args, dtype, timings)
        model, tokenizer = loaded.model, loaded.tokenizer
        seqlen = _check_against_model(model, args, pattern)

        calibration = None
        method = None if args.method == "dense" else get_method(args.method)
        if method is not None and method.statistic is not None:
            if seqlen and not args.calibration.startswith("tokens:"):  # before sampling anything
                check_memory(model, args.nsamples or 128, seqlen, device, args.batch_size)
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
            if calibration:
                check_memory(model, int(ids.shape[0]), int(ids.shape[1]), device, args.batch_size)
            checkpoint = None
            if args.checkpoint_dir:
                checkpoint = Checkpoint(args.checkpoint_dir, {"model": args.model, "dtype": str(dtype), "seed": args.seed})
            report = prune_model(model, method, settings["sparsity"], pattern,
                                 ids if calibration else None, device=device, batch_size=args.batch_size,
                                 progress=progress, checkpoint=checkpoint)
            timings["prune_s"] = report.timings["prune_s"]

        ppl, windows, zeroshot = _evaluate(loaded, args, settings, seqlen, timings)
    except (SourceError, ModelError, PatternError, ZeroShotError) as exc:
        raise UsageError(str(exc)) from None
    except (NumericsError, ResourceError, CheckpointError) as exc:
        raise RunError(str(exc)) from None
    except torch.cuda.OutOfMemoryError:
        raise RunError("CUDA ran out of memory; lower --batch-size, --nsamples or --seqlen, or use --device cpu") from None

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
        "zeroshot": zeroshot,
        "calibration": calibration,
        "seed": args.seed,
        **_provenance(device, dtype, timings, argv),
    }
    _print_table(result)
    if args.save_model:
        save_model(loaded, result, args.save_model)
        _log(f"saved the pruned model to {args.save_model}")
    _write_result(result, args.output)
    return 0


def _load(args, dtype, timings: dict):
    """Load --model in `dtype`, logging it and recording load_s."""
    from .models import load_model

    _log(f"loading {args.model} ({str(dtype).replace('torch.', '')})")
    start = time.perf_counter()
    loaded = load_model(args.model, dtype=dtype, seed=args.seed)
    timings["load_s"] = time.perf_counter() - start
    return loaded


def _evaluate(loaded, args, settings, seqlen, timings) -> tuple[dict, dict, dict | None]:
    """Perplexity on each --eval-ppl source, then zero-shot tasks, on the model in memory.
    Returns (ppl, windows, zeroshot record or None); adds eval_s and zeroshot_s to timings."""
    from calibration import evaluation_windows
    from .evaluate.perplexity import perplexity
    from .evaluate.zeroshot import default_batch_size, evaluate_zeroshot

    model, tokenizer, device, progress = loaded.model, loaded.tokenizer, settings["device"], not args.quiet
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
    zeroshot = None
    if settings["zeroshot"] is not None:
        start = time.perf_counter()
        batch = args.eval_batch_size
        batch = default_batch_size(device) if batch is None else (batch if batch == "auto" else int(batch))
        _log(f"zero-shot: {', '.join(settings['zeroshot'].names)} (lm-eval, batch size {batch}"
             + (f", at most {args.eval_limit} documents each)" if args.eval_limit else ")"))
        try:
            zeroshot = evaluate_zeroshot(model, tokenizer, settings["zeroshot"], device=device, batch_size=batch,
                                         limit=args.eval_limit, progress=progress)
        finally:
            model.to("cpu")
        timings["zeroshot_s"] = time.perf_counter() - start
    return ppl, windows, zeroshot


# ---- eval ------------------------------------------------------------------------------------

def _check_eval_args(args):
    """`oneshot eval`: everything that can be checked before loading the model."""
    from .evaluate.zeroshot import parse_task_spec

    if args.pruned is not None:
        if not (Path(args.pruned) / "config.json").is_file():
            raise UsageError(f"--pruned {args.pruned} is not a model directory written by --save-model "
                             "(no config.json)")
        args.model = args.pruned
    elif args.model is None:
        args.model = "smollm2-135m"
    try:
        nothing = args.eval_ppl.strip().lower() in ("", "none") and not parse_task_spec(args.eval_tasks)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if nothing:
        raise UsageError("nothing to evaluate: give --eval-ppl SOURCE and/or --eval-tasks SUITE|TASKS")
    return _check_model_and_evaluation(args, ("--output", args.output))


def run_eval(args, argv) -> int:
    """Measure a model as it is: perplexity and/or zero-shot accuracy, nothing pruned or saved."""
    settings = _check_eval_args(args)
    from calibration import SourceError
    from .engine import measure_sparsity
    from .evaluate.zeroshot import ZeroShotError
    from .models import ModelError

    device, dtype = settings["device"], settings["dtype"]
    timings = {}
    try:
        loaded = _load(args, dtype, timings)
        seqlen = args.seqlen
        if any(not source.startswith("tokens:") for source in settings["eval_sources"]):
            _check_seqlen(loaded.model, seqlen or 2048)
        report = measure_sparsity(loaded.model)
        ppl, windows, zeroshot = _evaluate(loaded, args, settings, seqlen, timings)
    except (SourceError, ModelError, ZeroShotError) as exc:
        raise UsageError(str(exc)) from None

    lineage = None
    if args.pruned is not None and (Path(args.pruned) / "oneshot.json").is_file():
        lineage = json.loads((Path(args.pruned) / "oneshot.json").read_text())
    result = {
        "model": args.model,
        "model_source": loaded.source,
        "family": getattr(loaded.model.config, "model_type", type(loaded.model).__name__),
        "method": (lineage or {}).get("method", "dense" if args.pruned is None else "unknown"),
        "pattern": (lineage or {}).get("pattern", "unstructured" if args.pruned is None else "unknown"),
        "sparsity_measured": report.sparsity,
        "sparsity_per_layer": report.layer_sparsity,
        "ppl": ppl,
        "eval": {"windows": windows, "max_windows": args.eval_samples},
        "zeroshot": zeroshot,
        "lineage": lineage,
        "seed": args.seed,
        **_provenance(device, dtype, timings, argv),
    }
    _print_table(result)
    _write_result(result, args.output)
    return 0


def _write_result(result: dict, output: str | None) -> None:
    if output:
        write_json_atomic(Path(output) / "result.json", result)
        _log(f"wrote {Path(output) / 'result.json'}")


def _provenance(device: str, dtype, timings: dict, argv) -> dict:
    """What every record carries so that a number can be traced and reproduced."""
    return {
        "timings": timings,
        "peak_memory_gib": _peak_memory_gib(device),
        "peak_memory_kind": "cuda max allocated" if device.startswith("cuda") else "host max RSS",
        "device": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(),
        "command": ["oneshot", *argv],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _check_against_model(model, args, pattern) -> int:
    """Checks that need the model (layer widths, positions); returns the seqlen to use."""
    from .engine import check_pattern

    check_pattern(model, pattern)
    seqlen = args.seqlen
    if seqlen is None and not args.calibration.startswith("tokens:"):
        seqlen = 2048
    _check_seqlen(model, seqlen)
    return seqlen


def _check_seqlen(model, seqlen) -> None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if seqlen and limit and seqlen > limit:
        raise UsageError(f"--seqlen {seqlen} exceeds the model's {limit} positions; pass --seqlen {limit} or less")


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


@functools.lru_cache(maxsize=1)
def _source_commit() -> str | None:
    """The git commit of a source checkout (with "+dirty" for uncommitted changes), else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def versions() -> dict:
    found = {"python": platform.python_version(), "oneshot": __version__}
    if _source_commit():
        found["oneshot_commit"] = _source_commit()
    for package in ("torch", "transformers", "numpy", "datasets", "lm-eval", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _print_table(result: dict) -> None:
    sources = list(result["ppl"])
    zeroshot = result.get("zeroshot")
    header = ["method", "pattern", "sparsity"] + [f"ppl {s}" for s in sources]
    row = [result["method"], result["pattern"], f"{result['sparsity_measured']:.4f}"]
    row += [f"{result['ppl'][s]:.3f}" for s in sources]
    if zeroshot is not None:
        header.append("mean acc")
        row.append("-" if zeroshot["mean_acc"] is None else f"{zeroshot['mean_acc']:.4f}")
    if "prune_s" in result["timings"]:
        header.append("prune s")
        row.append(f"{result['timings']['prune_s']:.1f}")
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if zeroshot is not None:
        from .evaluate.zeroshot import format_table

        print()
        print("\n".join(format_table(zeroshot)))


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def save_model(loaded, result: dict, directory: str) -> None:
    """A from_pretrained-loadable checkpoint (safetensors) plus a lineage card, written then renamed."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        loaded.tokenizer.save_pretrained(tmp)
        lineage = {key: result[key] for key in ("model", "model_source", "method", "pattern", "sparsity_target",
                                                 "sparsity_measured", "calibration", "seed", "ppl", "versions")}
        if result.get("zeroshot"):
            lineage["zeroshot"] = {key: result["zeroshot"][key] for key in ("suite", "limit", "mean_acc", "tasks")}
        (tmp / "oneshot.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(lineage))
        old = None
        if final.exists():  # empty, or --overwrite: swap, so a model is in place at every moment
            old = final.with_name(f".{final.name}.old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
    if lineage.get("zeroshot") and lineage["zeroshot"]["mean_acc"] is not None:
        zeroshot = lineage["zeroshot"]
        limit = f", at most {zeroshot['limit']} documents per task" if zeroshot["limit"] else ""
        lines.append(f"- zero-shot mean accuracy ({zeroshot['suite']}{limit}): {zeroshot['mean_acc']:.4f}")
    lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in lineage["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
