"""A sweep config: a grid of models x methods x allocations x patterns x sparsities x option values,
expanded into RunSpecs. Every grid point is then checked by the one RunSpec validation.

    models: [smollm2-135m]
    methods: [magnitude, wanda, sparsegpt]
    patterns: [unstructured, "2:4"]            # N:M runs ignore sparsities (they prune N/M)
    sparsities: [0.1, 0.2, 0.3]
    allocations: [uniform]                     # optional
    options: {percdamp: [0.01, 0.1]}           # optional; each goes to the methods that declare it
    calibration: {source: wiki-offline, nsamples: 32, seqlen: 512, seed: 0}
    eval: {ppl: [wiki-offline], samples: 40}
    device: auto
    dtype: auto
    results: results.jsonl                     # relative to the config file's directory
    paper: {table: ..., source: ..., eval: ..., ppl: {...}}   # optional, used by `oneshot report`

Each run's `run_key` hashes the settings that determine its result; the dense baseline runs once per
model. See experiments/README.md for every key.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..spec import YAML_NAMES, Calibration, Evaluation, RunSpec, check_keys, resolve_path, resolve_source, source_list
from ..yamlio import read_yaml

TOP_KEYS = ("models", "methods", "patterns", "sparsities", "allocations", "options", "sequential", "calibration", "eval", "device",
            "dtype", "batch_size", "results", "paper")
CALIBRATION_KEYS = ("source", "nsamples", "seqlen", "seed")
EVAL_KEYS = ("ppl", "samples", "tasks", "limit")
PAPER_KEYS = ("table", "source", "eval", "ppl", "notes")
CALIBRATION_DEFAULTS = {"source": "wiki-offline", "nsamples": 128, "seqlen": 2048, "seed": 0}
# How a grid point's fields are named in the config, for messages.
SWEEP_NAMES = dict(YAML_NAMES, model="models", method="methods", sparsity="sparsities", pattern="patterns",
                   allocation="allocations")


def spec_sparsity(spec: RunSpec):
    """The sparsity a spec prunes to (N/M for N:M, 0 for dense), without validating it (a value that
    is not a number is returned as it is, for validation to refuse)."""
    from ..methods import PatternError, parse_pattern

    if spec.method == "dense":
        return 0.0
    try:
        pattern = parse_pattern(spec.pattern)
        if pattern.is_nm:
            return round(pattern.sparsity, 6)
    except PatternError:
        pass
    value = 0.5 if spec.sparsity is None else spec.sparsity
    return round(float(value), 6) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def uses_calibration(spec: RunSpec) -> bool:
    from ..allocation import ALLOCATIONS
    from ..methods import METHODS, PatternError, parse_pattern
    from ..structured import resolve_method

    try:  # a structured pattern names a criterion, whose options may also read calibration data
        method = resolve_method(spec.method, parse_pattern(spec.pattern), METHODS)
    except PatternError:
        method = METHODS.get(spec.method)
    allocation = ALLOCATIONS.get(spec.allocation)
    reads = getattr(method, "reads_calibration", None)
    method_reads = reads(spec.options) if reads else bool(method and method.statistic)
    return bool(method_reads or (allocation and allocation.statistic))


def key_config(spec: RunSpec) -> dict:
    """What determines a run's result. Runs that read no calibration text (dense, magnitude) key only
    on seqlen (the evaluation window) and seed. The same keys as 0.2.0 for the same settings."""
    calibration = {"seqlen": spec.calibration.seqlen, "seed": spec.seed}
    if uses_calibration(spec):
        calibration.update(source=spec.calibration.source, nsamples=spec.calibration.nsamples)
    evaluation = {"ppl": list(spec.eval.ppl), "samples": spec.eval.samples}
    if spec.eval.tasks not in ("", "none"):
        evaluation.update(tasks=spec.eval.tasks.split(","), limit=spec.eval.limit)
    key = {"model": spec.model, "method": spec.method, "pattern": spec.pattern,
           "sparsity": spec_sparsity(spec), "calibration": calibration, "eval": evaluation,
           "dtype": spec.dtype}
    if spec.options:
        key["options"] = dict(sorted(spec.options.items()))
    if spec.allocation != "uniform":
        key["allocation"] = spec.allocation
    if spec.sequential:
        key["sequential"] = True
    return key


def run_key(spec: RunSpec) -> str:
    text = json.dumps(key_config(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def label(spec: RunSpec) -> str:
    if spec.method == "dense":
        return f"{spec.model} dense"
    pattern = str(spec.pattern)
    if ":" in pattern:
        setting = pattern
    elif pattern == "unstructured":
        setting = f"{spec_sparsity(spec):g}"
    else:  # structured: "layers 0.2"
        setting = f"{pattern} {spec_sparsity(spec):g}"
    extra = "" if spec.allocation == "uniform" else f" {spec.allocation}"
    extra += " sequential" if spec.sequential else ""
    extra += "".join(f" {k}={v}" for k, v in spec.options.items())
    return f"{spec.model} {spec.method}{extra} {setting}"


@dataclass
class SweepConfig:
    path: Path
    models: list
    methods: list
    patterns: list
    sparsities: list
    allocations: list
    options: dict  # name -> list of values
    base: RunSpec  # what every run shares (calibration, evaluation, device, dtype, batch size)
    results: Path
    paper: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def runs(self) -> list[RunSpec]:
        """Per model: the dense baseline, then every pattern x method x allocation x option values
        (x sparsity when unstructured); duplicates removed."""
        from ..allocation import ALLOCATIONS
        from ..methods import METHODS, PatternError, parse_pattern
        from ..structured import resolve_method

        runs = []
        for model in self.models:
            runs.append(self.base.replace(model=model, method="dense", pattern="unstructured", sparsity=None,
                                          sequential=False))
            for pattern, method, allocation in itertools.product(self.patterns, self.methods, self.allocations):
                if method == "dense":
                    continue
                try:  # the pattern picks the registry (a structured one names a criterion)
                    resolved = resolve_method(method, parse_pattern(pattern), METHODS)
                except PatternError:
                    continue  # e.g. block-influence x heads: a grid of criteria x patterns keeps the pairs that apply
                if parse_pattern(pattern).is_nm and not getattr(ALLOCATIONS.get(allocation), "accepts_nm", True):
                    continue  # e.g. owl x 2:4: N:M fixes every layer's sparsity, so there is nothing to allocate
                options_for = getattr(resolved, "options_for", lambda _structure: resolved.options)
                declared = {o.name for o in options_for(pattern)}  # a structured one: those that apply to it
                declared |= {o.name for o in getattr(ALLOCATIONS.get(allocation), "options", ())}
                names = [name for name in self.options if name in declared]
                for values in itertools.product(*(self.options[name] for name in names)):
                    common = dict(model=model, method=method, pattern=pattern, allocation=allocation,
                                  options=dict(zip(names, values)))
                    if not parse_pattern(pattern).is_nm:  # unstructured and structured take the sparsities
                        runs += [self.base.replace(sparsity=s, **common) for s in self.sparsities]
                    else:
                        runs.append(self.base.replace(sparsity=None, **common))
        unique = {}
        for spec in runs:
            unique.setdefault(run_key(spec), spec)
        return list(unique.values())


def _as_list(where: str, value) -> list:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where} must be a non-empty list")
    return value


def _names(where: str, value) -> list[str]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",")]
    value = _as_list(where, value)
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise UsageError(f"{where}: {item!r} is not a name")
    return list(dict.fromkeys(item.strip() for item in value))


def load_config(path: str | Path) -> SweepConfig:
    """Read the config and check its shape; every grid point is validated by `check_runs`."""
    from ..methods import PatternError, parse_pattern

    path = Path(path).expanduser().resolve()
    where = f"config {path}"
    data = read_yaml(path)
    check_keys(data, TOP_KEYS, "", where)
    for required in ("models", "methods"):
        if data.get(required) is None:
            raise UsageError(f"{where}: missing required key {required!r}")
    models = _names(f"{where}: models", data["models"])
    methods = _names(f"{where}: methods", data["methods"])
    allocations = _names(f"{where}: allocations", data.get("allocations", "uniform"))
    patterns = []
    for value in _as_list(f"{where}: patterns", data.get("patterns", "unstructured")):
        if not isinstance(value, str):
            raise UsageError(f"{where}: patterns: pattern {value!r} is not 'unstructured' or 'N:M' (quote it: \"2:4\")")
        try:
            patterns.append(str(parse_pattern(value)))
        except PatternError as exc:
            raise UsageError(f"{where}: patterns: {exc}") from None
    patterns = list(dict.fromkeys(patterns))
    sparsities = []
    if data.get("sparsities") is not None:
        sparsities = list(dict.fromkeys(_as_list(f"{where}: sparsities", data["sparsities"])))
    elif any(m != "dense" for m in methods) and any(not parse_pattern(p).is_nm for p in patterns):
        raise UsageError(f"{where}: missing required key 'sparsities' (needed for unstructured and structured "
                         "patterns)")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where}: options must map option names to a value or a list of values")
    options = {name: list(dict.fromkeys(_as_list(f"{where}: options.{name}", v))) for name, v in options.items()}
    _check_options_are_declared(where, options, methods, allocations)

    raw_cal = data.get("calibration") or {}
    check_keys(raw_cal, CALIBRATION_KEYS, "calibration.", where)
    cal = dict(CALIBRATION_DEFAULTS, **{k: v for k, v in raw_cal.items() if v is not None})
    if not isinstance(cal["source"], str) or not cal["source"].strip():
        raise UsageError(f"{where}: calibration.source must be a source name")
    source = resolve_source(cal["source"], path.parent)
    nsamples = None if source.startswith("tokens:") and raw_cal.get("nsamples") is None else cal["nsamples"]
    raw_eval = data.get("eval") or {}
    check_keys(raw_eval, EVAL_KEYS, "eval.", where)
    ppl = [resolve_source(s, path.parent) for s in source_list(raw_eval.get("ppl", ["wiki-offline"]), f"{where}: eval.ppl")]
    tasks = raw_eval.get("tasks")
    tasks = ",".join(_names(f"{where}: eval.tasks", tasks)) if tasks is not None else "none"
    if not ppl and tasks.lower() == "none":
        raise UsageError(f"{where}: eval: nothing to measure; give eval.ppl sources or eval.tasks")
    # seqlen is explicit for every run (also the evaluation window), so all rows share one protocol
    base = RunSpec(calibration=Calibration(source, nsamples, cal["seqlen"]), seed=cal["seed"],
                   eval=Evaluation(tuple(ppl), raw_eval.get("samples"), tasks, raw_eval.get("limit")),
                   device=data.get("device", "auto"), dtype=data.get("dtype", "auto"),
                   batch_size=data.get("batch_size"), sequential=data.get("sequential", False), progress=False)
    results = data.get("results", f"{path.stem}.jsonl")
    if not isinstance(results, str) or not results.strip():
        raise UsageError(f"{where}: results must be a file path")
    config = SweepConfig(path, models, methods, patterns, sparsities, allocations, options, base,
                         Path(resolve_path(results, path.parent)), raw=data)
    if data.get("paper") is not None:
        config.paper = check_paper(path, data["paper"], config)
    return config


def _check_options_are_declared(where, options, methods, allocations) -> None:
    from ..allocation import ALLOCATIONS
    from ..methods import METHODS

    from ..structured import CRITERIA

    declared = set()
    for name in methods:
        declared |= {o.name for o in getattr(METHODS.get(name), "options", ())}
        declared |= {o.name for o in getattr(CRITERIA.get(name), "options", ())}
    for name in allocations:
        declared |= {o.name for o in getattr(ALLOCATIONS.get(name), "options", ())}
    for name in options:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise UsageError(f"{where}: options.{name}: no method or allocation of this sweep declares it; "
                             f"their options: {known}")


def check_runs(config: SweepConfig) -> None:
    """The one RunSpec validation, for the shape of every grid point (no model, data or device checks)."""
    from ..methods import METHODS
    from ..spec import validate_fields

    for spec in config.runs():
        try:
            validate_fields(spec, SWEEP_NAMES)
        except UsageError as exc:
            raise UsageError(f"config {config.path}: {exc}") from None
    from ..structured import CRITERIA

    unknown = [m for m in config.methods if m not in METHODS and m not in CRITERIA]
    if unknown:  # a method the grid keeps in no pair runs nowhere: name it here
        raise UsageError(f"config {config.path}: unknown method {unknown[0]!r}")


def _number(where: str, value, minimum=0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where} must be a finite number, not {value!r}")
    if value < minimum:
        raise UsageError(f"{where} must be at least {minimum} (got {value})")
    return float(value)


def check_paper(path: Path, paper, config: SweepConfig) -> dict:
    """paper: {table, source, eval, ppl: {model: {dense: x, method: {sparsity | "N:M": x}}}, notes}."""
    from ..methods import METHODS, PatternError, check_sparsity, parse_pattern

    where = f"config {path}"
    check_keys(paper, PAPER_KEYS, "paper.", where)
    for key in ("table", "source"):
        if not isinstance(paper.get(key), str) or not paper[key].strip():
            raise UsageError(f"{where}: paper.{key} must be given as text (which table, and where it came from)")
    eval_ppl = list(config.base.eval.ppl)
    source = paper.get("eval", eval_ppl[0] if eval_ppl else None)
    if isinstance(source, str):
        source = resolve_source(source, path.parent)
    if source not in eval_ppl:
        raise UsageError(f"{where}: paper.eval: {source!r} is not one of eval.ppl ({', '.join(eval_ppl)})")
    table = paper.get("ppl") or {}
    if not isinstance(table, dict):
        raise UsageError(f"{where}: paper.ppl must map model -> method -> numbers")
    cells = []  # (model, method, pattern, sparsity, value)
    for model, methods in table.items():
        if model not in config.models:
            raise UsageError(f"{where}: paper.ppl: model {model!r} is not in models ({', '.join(config.models)})")
        if not isinstance(methods, dict):
            raise UsageError(f"{where}: paper.ppl.{model} must map method -> numbers")
        for method, values in methods.items():
            key = f"{where}: paper.ppl.{model}.{method}"
            if method not in METHODS:
                raise UsageError(f"{key}: unknown method {method!r}")
            if method == "dense":
                cells.append((model, "dense", "unstructured", 0.0, _number(key, values)))
                continue
            if not isinstance(values, dict):
                raise UsageError(f"{key} must map a sparsity (0.5) or a pattern (\"2:4\") to a number")
            for setting, value in values.items():
                value = _number(f"{key}.{setting}", value)
                try:
                    if isinstance(setting, str):
                        pattern = parse_pattern(setting)
                        if not pattern.is_nm:
                            raise UsageError(f"{key}: write unstructured settings as a sparsity such as 0.5")
                        cells.append((model, method, str(pattern), pattern.sparsity, value))
                    else:
                        cells.append((model, method, "unstructured", check_sparsity(_number(key, setting)), value))
                except PatternError as exc:
                    raise UsageError(f"{key}: {exc}") from None
    return {"table": paper["table"].strip(), "source": paper["source"].strip(), "eval": source,
            "notes": paper.get("notes"), "cells": cells}
