"""`oneshot sweep CONFIG.yaml`: a grid of models x methods x patterns x sparsities, resumable.

Every grid point runs the exact `oneshot prune` path in this process (`oneshot.cli.main`), so each
line of the results file is that run's `result.json` record plus a `run_key`: a hash of the settings
that determine the result (model, method, pattern, sparsity, calibration, evaluation, dtype).

- The whole config is checked before any run: a bad key or value is one line, exit status 2.
- Finished runs are appended one JSON line each (append, flush, fsync): a crash, kill or Ctrl-C
  loses at most the run in progress, and never a finished line.
- Rerunning the same config skips every run whose `run_key` is already in the results file.
- The dense baseline is run once per model, added automatically.
- A run that fails (non-zero exit or an exception) records nothing, prints one line, and the sweep
  goes on with the next run; the sweep then exits 1. Ctrl-C stops the sweep (exit 130).

Config (YAML; see experiments/README.md for every key):

    models: [smollm2-135m]
    methods: [magnitude, wanda, sparsegpt]
    patterns: [unstructured, 2:4]            # N:M runs ignore sparsities (they prune N/M)
    sparsities: [0.1, 0.2, 0.3]
    calibration: {source: wiki-offline, nsamples: 32, seqlen: 512, seed: 0}
    eval: {ppl: [wiki-offline], samples: 40}
    device: auto
    dtype: auto
    results: results.jsonl                   # relative to the config file's directory
    paper: {table: ..., source: ..., eval: ..., ppl: {...}}   # optional, used by `oneshot report`
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cli  # cli imports this module only inside its functions
from .cli import DTYPES, UsageError

TOP_KEYS = ("models", "methods", "patterns", "sparsities", "calibration", "eval", "device", "dtype",
            "batch_size", "results", "paper")
CALIBRATION_KEYS = ("source", "nsamples", "seqlen", "seed")
EVAL_KEYS = ("ppl", "samples", "tasks", "limit")
PAPER_KEYS = ("table", "source", "eval", "ppl", "notes")
CALIBRATION_DEFAULTS = {"source": "wiki-offline", "nsamples": 128, "seqlen": 2048, "seed": 0}


# ---- YAML ----------------------------------------------------------------------------------------

def _yaml_loader():
    """SafeLoader without YAML 1.1's base-60 numbers, so `2:4` stays the string "2:4" (not 124), and
    with `1e-3` read as a float as people expect."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in numbers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:int",
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
                   r"|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config {path}: cannot read it ({exc})") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"config {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config {path}: expected a mapping of keys ({', '.join(TOP_KEYS)}), "
                     f"got {type(data).__name__}")
    return data


# ---- the config ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One grid point: the settings of one `oneshot prune` call."""

    model: str
    method: str
    pattern: str  # "unstructured" or "N:M"
    sparsity: float  # N/M for N:M patterns, 0 for dense
    calibration: tuple  # (source, nsamples, seqlen, seed)
    eval_ppl: tuple
    eval_samples: int | None
    eval_tasks: tuple | None
    eval_limit: int | None
    device: str
    dtype: str
    batch_size: int | None

    @property
    def uses_calibration(self) -> bool:
        from .methods import METHODS

        return self.method in METHODS and METHODS[self.method].statistic is not None

    def key_config(self) -> dict:
        """What determines the result. Methods without a statistic (dense, magnitude) read no
        calibration text, so only seqlen (the evaluation window) and seed enter their key."""
        source, nsamples, seqlen, seed = self.calibration
        calibration = {"seqlen": seqlen, "seed": seed}
        if self.uses_calibration:
            calibration.update(source=source, nsamples=nsamples)
        evaluation = {"ppl": list(self.eval_ppl), "samples": self.eval_samples}
        if self.eval_tasks:
            evaluation.update(tasks=list(self.eval_tasks), limit=self.eval_limit)
        return {"model": self.model, "method": self.method, "pattern": self.pattern,
                "sparsity": round(self.sparsity, 6), "calibration": calibration, "eval": evaluation,
                "dtype": self.dtype}

    @property
    def run_key(self) -> str:
        text = json.dumps(self.key_config(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def argv(self, output: str) -> list[str]:
        source, nsamples, seqlen, seed = self.calibration
        argv = ["prune", "--model", self.model, "--method", self.method]
        if self.method != "dense":
            argv += ["--pattern", self.pattern]
            if self.pattern == "unstructured":
                argv += ["--sparsity", repr(float(self.sparsity))]
        if self.uses_calibration:
            argv += ["--calibration", source]
            if nsamples is not None:
                argv += ["--nsamples", str(nsamples)]
        argv += ["--seqlen", str(seqlen), "--seed", str(seed), "--eval-ppl", ",".join(self.eval_ppl) or "none"]
        if self.eval_samples is not None:
            argv += ["--eval-samples", str(self.eval_samples)]
        if self.eval_tasks:
            argv += ["--eval-tasks", ",".join(self.eval_tasks)]
            if self.eval_limit is not None:
                argv += ["--eval-limit", str(self.eval_limit)]
        argv += ["--device", self.device, "--dtype", self.dtype]
        if self.batch_size is not None:
            argv += ["--batch-size", str(self.batch_size)]
        return argv + ["--output", output, "--quiet"]

    def label(self) -> str:
        if self.method == "dense":
            return f"{self.model} dense"
        setting = f"{self.sparsity:g}" if self.pattern == "unstructured" else self.pattern
        return f"{self.model} {self.method} {setting}"


@dataclass
class SweepConfig:
    path: Path
    models: list
    methods: list
    patterns: list
    sparsities: list
    calibration: dict
    eval_ppl: list
    eval_samples: int | None
    eval_tasks: list | None
    eval_limit: int | None
    device: str
    dtype: str
    batch_size: int | None
    results: Path
    paper: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def runs(self) -> list[Run]:
        """Per model: the dense baseline, then every pattern x method (x sparsity when unstructured)."""
        cal = tuple(self.calibration[k] for k in CALIBRATION_KEYS)
        common = dict(calibration=cal, eval_ppl=tuple(self.eval_ppl), eval_samples=self.eval_samples,
                      eval_tasks=tuple(self.eval_tasks) if self.eval_tasks else None, eval_limit=self.eval_limit,
                      device=self.device,
                      dtype=self.dtype, batch_size=self.batch_size)
        runs = []
        for model in self.models:
            runs.append(Run(model, "dense", "unstructured", 0.0, **common))
            for pattern in self.patterns:
                for method in self.methods:
                    if method == "dense":
                        continue
                    if pattern == "unstructured":
                        runs += [Run(model, method, pattern, s, **common) for s in self.sparsities]
                    else:
                        n, m = (int(x) for x in pattern.split(":"))
                        runs.append(Run(model, method, pattern, n / m, **common))
        unique = {}
        for run in runs:
            unique.setdefault(run.run_key, run)
        return list(unique.values())


def _where(path: Path, key: str) -> str:
    return f"config {path}: {key}"


def _check_keys(path: Path, mapping, allowed, prefix: str) -> None:
    if not isinstance(mapping, dict):
        raise UsageError(f"{_where(path, prefix.rstrip('.') or 'top level')} must be a mapping with keys "
                     f"{', '.join(allowed)}")
    for key in mapping:
        if key not in allowed:
            raise UsageError(f"config {path}: unknown key {prefix + str(key)!r}; allowed keys"
                         f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(allowed)}")


def _as_list(path: Path, key: str, value) -> list:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{_where(path, key)} must be a non-empty list")
    return value


def _number(path, key, value, *, integer=False, minimum=None, allow_none=False):
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        kind = "a whole number" if integer else "a number"
        raise UsageError(f"{_where(path, key)} must be {kind}, not {value!r}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{_where(path, key)} must be at least {minimum} (got {value})")
    return value


def _pattern(path: Path, key: str, value) -> str:
    from .methods import PatternError, parse_pattern

    if not isinstance(value, str):
        raise UsageError(f"{_where(path, key)}: pattern {value!r} is not 'unstructured' or 'N:M' (quote it: \"2:4\")")
    try:
        return str(parse_pattern(value))
    except PatternError as exc:
        raise UsageError(f"{_where(path, key)}: {exc}") from None


def _sparsity(path: Path, key: str, value) -> float:
    from .methods import PatternError, check_sparsity

    value = _number(path, key, value)
    try:
        return check_sparsity(value)
    except PatternError as exc:
        raise UsageError(f"{_where(path, key)}: {exc}") from None


def _source(path: Path, key: str, value) -> str:
    """A source name, or file:/tokens: with a path resolved against the config's directory."""
    from calibration import SOURCES

    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{_where(path, key)} must be a source name ({', '.join(SOURCES)})")
    value = value.strip()
    for prefix in ("file:", "tokens:"):
        if value.startswith(prefix):
            target = Path(value[len(prefix):]).expanduser()
            if not target.is_absolute():
                target = path.parent / target
            return prefix + str(target)
    if value not in SOURCES:
        raise UsageError(f"{_where(path, key)}: unknown source {value!r}; known: {', '.join(SOURCES)}")
    return value


def _string_list(path: Path, key: str, value) -> list[str]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",")]
    value = _as_list(path, key, value)
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise UsageError(f"{_where(path, key)}: {item!r} is not a name")
    return [item.strip() for item in value]


def _dedupe(items):
    return list(dict.fromkeys(items))


def load_config(path: str | Path) -> SweepConfig:
    """Read and check the whole config; raises UsageError (one line) for anything wrong."""
    from .methods import METHODS

    path = Path(path).expanduser().resolve()
    data = read_yaml(path)
    _check_keys(path, data, TOP_KEYS, "")
    for required in ("models", "methods"):
        if data.get(required) is None:
            raise UsageError(f"config {path}: missing required key {required!r}")

    models = _dedupe(_string_list(path, "models", data["models"]))
    methods = _dedupe(_string_list(path, "methods", data["methods"]))
    known = list(METHODS) + ["dense"]
    for method in methods:
        if method not in known:
            raise UsageError(f"{_where(path, 'methods')}: unknown method {method!r}; choose from {', '.join(known)}")
    patterns = _dedupe(_pattern(path, "patterns", p) for p in _as_list(path, "patterns", data.get("patterns", "unstructured")))

    pruning = [m for m in methods if m != "dense"]
    sparsities = []
    if data.get("sparsities") is not None:
        sparsities = _dedupe(_sparsity(path, "sparsities", s) for s in _as_list(path, "sparsities", data["sparsities"]))
    elif pruning and "unstructured" in patterns:
        raise UsageError(f"config {path}: missing required key 'sparsities' (needed for unstructured pruning)")

    raw_cal = data.get("calibration") or {}
    _check_keys(path, raw_cal, CALIBRATION_KEYS, "calibration.")
    calibration = dict(CALIBRATION_DEFAULTS, **{k: v for k, v in raw_cal.items() if v is not None})
    calibration["source"] = _source(path, "calibration.source", calibration["source"])
    if calibration["source"].startswith("tokens:") and raw_cal.get("nsamples") is None:
        calibration["nsamples"] = None  # every row of the file; seqlen must still match its width
    else:
        calibration["nsamples"] = _number(path, "calibration.nsamples", calibration["nsamples"], integer=True, minimum=1)
    # seqlen is explicit for every run (also the evaluation window), so all rows share one protocol
    calibration["seqlen"] = _number(path, "calibration.seqlen", calibration["seqlen"], integer=True, minimum=2)
    calibration["seed"] = _number(path, "calibration.seed", calibration["seed"], integer=True, minimum=0)

    raw_eval = data.get("eval") or {}
    _check_keys(path, raw_eval, EVAL_KEYS, "eval.")
    ppl = raw_eval.get("ppl", ["wiki-offline"])
    if ppl is None or (isinstance(ppl, str) and ppl.strip().lower() in ("", "none")):
        eval_ppl = []
    else:
        eval_ppl = _dedupe(_source(path, "eval.ppl", s) for s in _string_list(path, "eval.ppl", ppl))
    eval_samples = _number(path, "eval.samples", raw_eval.get("samples"), integer=True, minimum=1, allow_none=True)
    tasks = raw_eval.get("tasks")
    eval_tasks = _dedupe(_string_list(path, "eval.tasks", tasks)) if tasks is not None else None
    if eval_tasks and [t.lower() for t in eval_tasks] == ["none"]:
        eval_tasks = None
    eval_limit = _number(path, "eval.limit", raw_eval.get("limit"), integer=True, minimum=1, allow_none=True)
    if not eval_ppl and not eval_tasks:
        raise UsageError(f"{_where(path, 'eval')}: nothing to measure; give eval.ppl sources or eval.tasks")

    device = data.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"{_where(path, 'device')}: unknown device {device!r}; choose auto, cpu, cuda or cuda:N")
    dtype = data.get("dtype", "auto")
    if dtype not in DTYPES:
        raise UsageError(f"{_where(path, 'dtype')}: unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    batch_size = _number(path, "batch_size", data.get("batch_size"), integer=True, minimum=1, allow_none=True)

    results = data.get("results", f"{path.stem}.jsonl")
    if not isinstance(results, str) or not results.strip():
        raise UsageError(f"{_where(path, 'results')} must be a file path")
    results = Path(results).expanduser()
    results = results if results.is_absolute() else path.parent / results

    config = SweepConfig(path, models, methods, patterns, sparsities, calibration, eval_ppl, eval_samples,
                         eval_tasks, eval_limit, device, dtype, batch_size, results, raw=data)
    if data.get("paper") is not None:
        config.paper = check_paper(path, data["paper"], config)
    return config


def check_paper(path: Path, paper, config: SweepConfig) -> dict:
    """paper: {table, source, eval, ppl: {model: {dense: x, method: {sparsity | "N:M": x}}}, notes}."""
    from .methods import METHODS

    _check_keys(path, paper, PAPER_KEYS, "paper.")
    for key in ("table", "source"):
        if not isinstance(paper.get(key), str) or not paper[key].strip():
            raise UsageError(f"{_where(path, 'paper.' + key)} must be given as text (which table, and where it came from)")
    source = paper.get("eval", config.eval_ppl[0] if config.eval_ppl else None)
    if source is not None:
        source = _source(path, "paper.eval", source)
    if source not in config.eval_ppl:
        raise UsageError(f"{_where(path, 'paper.eval')}: {source!r} is not one of eval.ppl ({', '.join(config.eval_ppl)})")
    table = paper.get("ppl") or {}
    if not isinstance(table, dict):
        raise UsageError(f"{_where(path, 'paper.ppl')} must map model -> method -> numbers")
    cells = []  # (model, method, pattern, sparsity, value)
    for model, methods in table.items():
        if model not in config.models:
            raise UsageError(f"{_where(path, 'paper.ppl')}: model {model!r} is not in models ({', '.join(config.models)})")
        if not isinstance(methods, dict):
            raise UsageError(f"{_where(path, f'paper.ppl.{model}')} must map method -> numbers")
        for method, values in methods.items():
            key = f"paper.ppl.{model}.{method}"
            if method not in list(METHODS) + ["dense"]:
                raise UsageError(f"{_where(path, key)}: unknown method {method!r}")
            if method == "dense":
                cells.append((model, "dense", "unstructured", 0.0, _number(path, key, values, minimum=0)))
                continue
            if not isinstance(values, dict):
                raise UsageError(f"{_where(path, key)} must map a sparsity (0.5) or a pattern (\"2:4\") to a number")
            for setting, value in values.items():
                value = _number(path, f"{key}.{setting}", value, minimum=0)
                if isinstance(setting, str):
                    pattern = _pattern(path, key, setting)
                    n, m = (int(x) for x in pattern.split(":")) if ":" in pattern else (None, None)
                    if n is None:
                        raise UsageError(f"{_where(path, key)}: write unstructured settings as a sparsity such as 0.5")
                    cells.append((model, method, pattern, n / m, value))
                else:
                    cells.append((model, method, "unstructured", _sparsity(path, key, setting), value))
    return {"table": paper["table"].strip(), "source": paper["source"].strip(), "eval": source,
            "notes": paper.get("notes"), "cells": cells}


# ---- the results file ----------------------------------------------------------------------------

def read_results(path: Path) -> tuple[list[dict], int]:
    """(records, unreadable lines). A torn last line from a killed write is unreadable and ignored."""
    records, bad = [], 0
    if not path.exists():
        return records, bad
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


def append_record(path: Path, record: dict) -> None:
    """One line, appended, flushed and fsynced; starts on a fresh line if the last write was torn."""
    line = json.dumps(record, allow_nan=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        if handle.tell() > 0:
            with open(path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    handle.write(b"\n")
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


# ---- running -------------------------------------------------------------------------------------

def preflight(config: SweepConfig) -> list[str]:
    """Availability problems (models, data sources, device) found in seconds, one line each."""
    from calibration import SourceError, check_source
    from .models import ModelError, check_model_spec

    problems = []
    for model in config.models:
        try:
            check_model_spec(model)
        except ModelError as exc:
            problems.append(str(exc))
    checks = [(s, "evaluation") for s in config.eval_ppl]
    if any(r.uses_calibration for r in config.runs()):
        checks.insert(0, (config.calibration["source"], "calibration"))
    for source, role in checks:
        try:
            check_source(source, role)
        except SourceError as exc:
            problems.append(str(exc))
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"device {config.device} was asked for but no CUDA GPU is visible")
    for run in config.runs():  # every run's flags must parse as `oneshot prune` flags
        try:
            cli.build_parser().parse_args(run.argv("unused"))
        except UsageError as exc:
            problems.append(f"{run.label()}: `oneshot prune` does not accept these settings: {exc}")
            break
    return problems


def _error_line(captured: str, code) -> str:
    lines = [line.strip() for line in captured.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("oneshot: error:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"exit status {code}"


def _summary(record: dict) -> str:
    parts = [f"ppl {source} {value:.4g}" for source, value in (record.get("ppl") or {}).items()]
    mean_acc = (record.get("zeroshot") or {}).get("mean_acc") if isinstance(record.get("zeroshot"), dict) else None
    if isinstance(mean_acc, (int, float)):
        parts.append(f"zero-shot mean {mean_acc:.4f}")
    return ", ".join(parts) or "no metrics"


def run_one(run: Run, verbose: bool = False):
    """Run one grid point through `oneshot prune`; returns (record or None, one-line failure)."""
    workdir = tempfile.mkdtemp(prefix="oneshot-sweep-")
    captured = io.StringIO()
    try:
        output = os.path.join(workdir, "run")
        try:
            if verbose:
                code = cli.main(run.argv(output))
            else:
                with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                    code = cli.main(run.argv(output))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed run must not end the sweep
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            return None, f"exit {code}: {_error_line(captured.getvalue(), code)}"
        result = Path(output) / "result.json"
        if not result.is_file():
            return None, "finished without writing result.json"
        return json.loads(result.read_text()), ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_sweep(config: SweepConfig, results: Path | None = None, dry_run: bool = False, verbose: bool = False,
              reload: bool = False, out=None) -> int:
    out = out or sys.stdout
    results = Path(results) if results is not None else config.results
    runs = config.runs()
    records, bad = read_results(results)
    done = {r.get("run_key") for r in records}
    todo = [run for run in runs if run.run_key not in done]
    say = lambda message="", end="\n": print(message, end=end, file=out, flush=True)  # noqa: E731

    if bad:
        say(f"note: {results} has {bad} unreadable line(s) (an interrupted write?); they are ignored")
    if dry_run:
        problems = preflight(config)
        say(f"{config.path}: {len(runs)} runs, {len(runs) - len(todo)} already recorded in {results}, "
            f"{len(todo)} to run")
        for i, run in enumerate(runs, 1):
            status = "done" if run.run_key in done else "todo"
            say(f"  [{i:>{len(str(len(runs)))}}/{len(runs)}] {status}  {run.run_key}  {run.label()}")
        for problem in problems:
            say(f"note: not runnable here: {problem}")
        return 0

    problems = preflight(config)
    if problems:
        more = f" (and {len(problems) - 1} more; see --dry-run)" if len(problems) > 1 else ""
        raise UsageError(f"{config.path.name} cannot run here: {problems[0]}{more}")
    if not todo:
        say(f"{config.path}: all {len(runs)} runs are already recorded in {results}")
        _report(results, config, say)
        return 0
    say(f"{config.path}: {len(runs)} runs, {len(runs) - len(todo)} already recorded, {len(todo)} to run; "
        f"results: {results}")

    from .models import keep_loaded

    failed, finished, started = [], 0, time.perf_counter()
    width = len(str(len(todo)))
    keep_loaded(not reload)
    try:
        for i, run in enumerate(todo, 1):
            say(f"[{i:>{width}}/{len(todo)}] {run.label()} ... ", end="" if not verbose else "\n")
            began = time.perf_counter()
            record, problem = run_one(run, verbose)
            seconds = time.perf_counter() - began
            if record is None:
                failed.append(run)
                say(f"FAILED after {seconds:.0f} s: {problem}")
                continue
            record["run_key"] = run.run_key
            append_record(results, record)
            finished += 1
            say(f"{_summary(record)} ({seconds:.0f} s)")
    except KeyboardInterrupt:
        say("")
        say(f"interrupted: {finished} run(s) recorded this time in {results}; run the same command to resume")
        return 130
    finally:
        keep_loaded(False)
    total = time.perf_counter() - started
    say(f"finished {finished} run(s) in {total / 60:.1f} min, {len(failed)} failed")
    _report(results, config, say)
    if failed:
        say("failed (not recorded; rerun to retry): " + "; ".join(run.label() for run in failed))
        return 1
    return 0


def _report(results: Path, config: SweepConfig, say) -> None:
    """Print the sweep's table and write its report files next to the results."""
    from .report import make_report

    if results.exists():
        say("")
        written = make_report(results, paper=config.paper)
        say("report: " + ", ".join(str(path) for kind, path in written.items() if kind != "no_png"))


# ---- command line --------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="run a grid of prune runs from a YAML config (resumable)",
        description="Run every model x method x pattern x sparsity of CONFIG through `oneshot prune`, "
                    "appending one JSON line per finished run; rerunning skips runs already recorded.")
    p.add_argument("config", metavar="CONFIG.yaml", help="sweep config (see experiments/README.md)")
    p.add_argument("--results", default=None,
                   help="results JSONL (default: the config's `results`, relative to the config's directory)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are already recorded; run nothing")
    p.add_argument("--verbose", action="store_true", help="show each run's own output")
    p.add_argument("--reload", action="store_true",
                   help="load the model afresh for every run instead of keeping a copy in memory "
                        "(halves host memory for very large models; slower)")
    p.set_defaults(handler=command)
    return p


def command(args) -> int:
    config = load_config(args.config)
    return run_sweep(config, Path(args.results).expanduser() if args.results else None,
                     dry_run=args.dry_run, verbose=args.verbose,
                     reload=getattr(args, "reload", False))


def main(argv=None) -> int:
    """`python -m oneshot.sweep ...`, the same as `oneshot sweep ...`."""
    return cli.dispatch(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
