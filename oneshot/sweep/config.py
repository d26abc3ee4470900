"""A sweep config: a grid of runs, expanded into RunSpecs. Its keys come from the settings table
(oneshot/spec.py): the grid keys in the plural (models, methods, patterns, sparsities, allocations),
`options` (NAME: value or [values]), and every other key of a run config, shared by all runs or, given a
list of values, a grid axis of its own (`sequential: [false, true]`, `recover: {steps: [50, 100]}`).

    models: [smollm2-135m]
    methods: [magnitude, wanda, sparsegpt]
    patterns: [unstructured, "2:4"]            # N:M runs ignore sparsities (they prune N/M)
    sparsities: [0.1, 0.2, 0.3]
    options: {percdamp: [0.01, 0.1]}           # optional; each goes to the methods that declare it
    calibration: {source: wiki-offline, nsamples: 32, seqlen: 512, seed: 0}
    eval: {ppl: [wiki-offline], samples: 40}
    results: results.jsonl                     # relative to the config file's directory
    paper: {table: ..., source: ..., eval: ..., ppl: {...}}   # optional, used by `oneshot report`

Every grid point is then checked by the run's own checks (plan.check_fields). Each run's `run_key`
hashes the settings that decide its result; the dense baseline runs once per model. docs/cli.md lists
every key.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..settings import (
    Spelling,
    check_keys,
    entry,
    flatten,
    parts,
    resolve_path,
    shape,
    table,
    with_values,
)
from ..spec import RunSpec
from ..yamlio import read_yaml

SWEEP_ONLY = ("results", "paper")
PER_RUN = ("output", "save_model", "checkpoint_dir", "resume", "overwrite")  # what one run writes: not in a grid
PAPER_KEYS = ("table", "source", "eval", "ppl", "notes")
# Every run of a sweep states its calibration and evaluation window, so all rows share one protocol.
CALIBRATION_DEFAULTS = {"calibration.source": "wiki-offline", "calibration.nsamples": 128, "calibration.seqlen": 2048,
                        "seed": 0}
# The run key's shape for these is fixed (0.2.0's keys stay valid); every other keyed setting that
# differs from its default joins the key under its own name.
KEY_CORE = ("model", "method", "pattern", "sparsity", "calibration.source", "calibration.nsamples",
            "calibration.seqlen", "seed", "eval.ppl", "eval.samples", "eval.tasks", "eval.limit", "dtype")
SWEEP_NAMES = Spelling("sweep")


def grid_keys() -> dict[str, str]:
    """Plural grid key -> the setting's path (models -> model)."""
    return {e.setting.sweep: e.path for e in table() if e.setting.sweep}


def config_keys() -> list[str]:
    """The top-level keys a sweep config takes, in the table's order."""
    keys = []
    for e in table():
        if not e.setting.yaml or e.path in PER_RUN:
            continue
        key = e.setting.sweep or e.path.split(".")[0]
        if key not in keys:
            keys.append(key)
    return keys + list(SWEEP_ONLY)


def is_baseline(spec: RunSpec) -> bool:
    from ..methods import is_baseline as baseline_method

    return baseline_method(spec.method)


def spec_sparsity(spec: RunSpec):
    """The sparsity a spec prunes to (N/M for N:M, 0 for the baseline), without validating it (a value
    that is not a number is returned as it is, for validation to refuse)."""
    from ..methods import PatternError, parse_pattern

    if is_baseline(spec):
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
    from ..plan import reads_calibration
    from ..structured import resolve_method

    try:  # a structured pattern names a criterion, whose options may also read calibration data
        method = resolve_method(spec.method, parse_pattern(spec.pattern), METHODS)
    except PatternError:
        method = METHODS.get(spec.method)
    allocation = ALLOCATIONS.get(spec.allocation)
    if method is None or allocation is None:
        return False
    return reads_calibration(method, spec.options, allocation)


def _extras(spec: RunSpec) -> list[tuple[str, object]]:
    """The keyed settings outside the key's fixed core that differ from their defaults."""
    from ..settings import get

    found = []
    for e in table():
        if not e.setting.keyed or e.path in KEY_CORE or (e.part and getattr(spec, e.part) is None):
            continue
        value = get(spec, e.path)
        if value != e.default:
            found.append((e.path, value))
    return found


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
           "sparsity": spec_sparsity(spec), "calibration": calibration, "eval": evaluation, "dtype": spec.dtype}
    for path, value in _extras(spec):
        key[path] = dict(sorted(value.items())) if isinstance(value, dict) else \
            list(value) if isinstance(value, tuple) else value
    return key


def run_key(spec: RunSpec) -> str:
    text = json.dumps(key_config(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def label(spec: RunSpec) -> str:
    pattern = str(spec.pattern)
    if ":" in pattern:
        setting = pattern
    elif pattern == "unstructured":
        setting = f"{spec_sparsity(spec):g}"
    else:  # structured: "layers 0.2"
        setting = f"{pattern} {spec_sparsity(spec):g}"
    extra = ""
    for path, value in _extras(spec):
        e = entry(path)
        if isinstance(value, dict):
            extra += "".join(f" {k}={v}" for k, v in value.items())
        elif e.type is bool:
            extra += f" {e.name}" if value else f" no-{e.name}"
        elif e.setting.sweep:  # a grid key's value speaks for itself: "owl"
            extra += f" {value}"
        else:
            extra += f" {path}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
    return f"{spec.model} {spec.method}{extra}" + ("" if is_baseline(spec) else f" {setting}")


@dataclass
class SweepConfig:
    path: Path
    models: list
    methods: list
    patterns: list
    sparsities: list
    allocations: list
    options: dict  # name -> list of values
    base: RunSpec  # what every run shares (calibration, evaluation, device, dtype, ...)
    results: Path
    axes: dict = field(default_factory=dict)  # setting path -> list of values: grid axes beyond the plural keys
    paper: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def runs(self) -> list[RunSpec]:
        """Per model: the dense baseline, then every pattern x method x allocation x option values x other
        axes (x sparsity when not N:M); duplicates removed."""
        return self._expand()[0]

    def skipped(self) -> list[str]:
        """The method x pattern (x allocation) pairs the grid leaves out because they cannot run, one line each."""
        return self._expand()[1]

    def _expand(self) -> tuple[list[RunSpec], list[str]]:
        from ..allocation import ALLOCATIONS
        from ..methods import METHODS, PatternError, parse_pattern
        from ..methods import is_baseline as baseline_method
        from ..structured import resolve_method

        runs, skipped = [], []
        optional = {name for name, info in parts().items() if info["optional"]}  # the baseline has no recovery
        baseline_changes = {e.path: e.default for e in table() if not e.setting.baseline and e.part is None}
        axes = [[(path, value) for value in values] for path, values in self.axes.items()]
        for model in self.models:
            baselines = [m for m in METHODS if baseline_method(m)]
            for values in itertools.product(*axes):
                shared = {p: v for p, v in values if entry(p).setting.baseline and entry(p).part not in optional}
                runs.append(with_values(self.base.replace(model=model, method=baselines[0], recover=None,
                                                          **baseline_changes), shared))
            for pattern, method, allocation in itertools.product(self.patterns, self.methods, self.allocations):
                if baseline_method(method):
                    continue
                try:  # the pattern picks the registry (a structured one names a criterion)
                    resolved = resolve_method(method, parse_pattern(pattern), METHODS, "methods", "patterns")
                except PatternError as exc:
                    skipped.append(f"{method} x {pattern}: {exc}")
                    continue  # e.g. block-influence x heads: a grid of criteria x patterns keeps the pairs that apply
                declared_allocation = ALLOCATIONS.get(allocation)
                if parse_pattern(pattern).is_nm and not getattr(declared_allocation, "accepts_nm", True):
                    skipped.append(f"{method} x {pattern} x {allocation}: N:M fixes every layer's sparsity, so "
                                   "there is nothing to allocate")
                    continue
                if parse_pattern(pattern).is_structured and not getattr(declared_allocation, "accepts_structured",
                                                                        True):
                    skipped.append(f"{method} x {pattern} x {allocation}: a structured pattern removes the same "
                                   "units from every block")
                    continue
                options_for = getattr(resolved, "options_for", lambda _structure: resolved.options)
                declared = {o.name for o in options_for(pattern)}  # a structured one: those that apply to it
                declared |= {o.name for o in getattr(ALLOCATIONS.get(allocation), "options", ())}
                names = [name for name in self.options if name in declared]
                for option_values in itertools.product(*(self.options[name] for name in names)):
                    for values in itertools.product(*axes):
                        common = self.base.replace(model=model, method=method, pattern=pattern, allocation=allocation,
                                                   options=dict(zip(names, option_values)))
                        common = with_values(common, dict(values))
                        if not parse_pattern(pattern).is_nm:  # unstructured and structured take the sparsities
                            runs += [common.replace(sparsity=s) for s in self.sparsities]
                        else:
                            runs.append(common.replace(sparsity=None))
        unique = {}
        for spec in runs:
            unique.setdefault(run_key(spec), spec)
        return list(unique.values()), list(dict.fromkeys(skipped))


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
    """Read the config and check its shape; every grid point is checked by `check_runs`."""
    from ..methods import PatternError, parse_pattern
    from ..methods import is_baseline as baseline_method

    path = Path(path).expanduser().resolve()
    where = f"config {path}"
    data = read_yaml(path)
    check_keys(data, config_keys(), "", where)
    for required in ("models", "methods"):
        if data.get(required) is None:
            raise UsageError(f"{where}: missing required key {required!r}")
    plural = grid_keys()
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
    elif any(not baseline_method(m) for m in methods) and any(not parse_pattern(p).is_nm for p in patterns):
        raise UsageError(f"{where}: missing required key 'sparsities' (needed for unstructured and structured "
                         "patterns)")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise UsageError(f"{where}: options must map option names to a value or a list of values")
    # an option may be a switch: a lone true/false is one value, as a lone number or name is
    options = {name: list(dict.fromkeys(_as_list(f"{where}: options.{name}", [v] if isinstance(v, bool) else v)))
               for name, v in options.items()}
    _check_options_are_declared(where, options, methods, allocations)

    shared = flatten({k: v for k, v in data.items() if k not in plural and k not in ("options", *SWEEP_ONLY)},
                     where, exclude=PER_RUN)
    values, axes = dict(CALIBRATION_DEFAULTS), {}
    for setting_path, value in shared.items():
        e = entry(setting_path)
        if value is None:
            continue
        if isinstance(value, list) and e.type not in (tuple, dict) and not e.setting.joins:
            axes[setting_path] = [shape(e, v, f"{where}: {setting_path}", path.parent) for v in
                                  dict.fromkeys(_as_list(f"{where}: {setting_path}", value))]
        else:
            values[setting_path] = shape(e, value, f"{where}: {setting_path}", path.parent)
    if values["calibration.source"].startswith("tokens:") and shared.get("calibration.nsamples") is None:
        values["calibration.nsamples"] = None  # every row of the file
    base = with_values(RunSpec(progress=False), values)
    if not base.eval.ppl and base.eval.tasks.lower() == "none":
        raise UsageError(f"{where}: eval: nothing to measure; give eval.ppl sources or eval.tasks")
    results = data.get("results", f"{path.stem}.jsonl")
    if not isinstance(results, str) or not results.strip():
        raise UsageError(f"{where}: results must be a file path")
    config = SweepConfig(path, models, methods, patterns, sparsities, allocations, options, base,
                         Path(resolve_path(results, path.parent)), axes=axes, raw=data)
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
    """The run's own checks of its values, for every grid point (no model, data or device is looked at)."""
    from ..methods import METHODS
    from ..plan import check_fields
    from ..structured import CRITERIA

    with Spelling("sweep", where=str(config.path)).active():
        for spec in config.runs():
            try:
                check_fields(spec)
            except UsageError as exc:
                raise UsageError(f"config {config.path}: {exc}") from None
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
    from ..methods import is_baseline as baseline_method
    from ..settings import resolve_source

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
    table_ = paper.get("ppl") or {}
    if not isinstance(table_, dict):
        raise UsageError(f"{where}: paper.ppl must map model -> method -> numbers")
    cells = []  # (model, method, pattern, sparsity, value)
    for model, methods in table_.items():
        if model not in config.models:
            raise UsageError(f"{where}: paper.ppl: model {model!r} is not in models ({', '.join(config.models)})")
        if not isinstance(methods, dict):
            raise UsageError(f"{where}: paper.ppl.{model} must map method -> numbers")
        for method, values in methods.items():
            key = f"{where}: paper.ppl.{model}.{method}"
            if method not in METHODS:
                raise UsageError(f"{key}: unknown method {method!r}")
            if baseline_method(method):
                cells.append((model, method, "unstructured", 0.0, _number(key, values)))
                continue
            if not isinstance(values, dict):
                raise UsageError(f"{key} must map a sparsity (0.5) or a pattern (\"2:4\") to a number")
            for setting_value, value in values.items():
                value = _number(f"{key}.{setting_value}", value)
                try:
                    if isinstance(setting_value, str):
                        pattern = parse_pattern(setting_value)
                        if not pattern.is_nm:
                            raise UsageError(f"{key}: write unstructured settings as a sparsity such as 0.5")
                        cells.append((model, method, str(pattern), pattern.sparsity, value))
                    else:
                        cells.append((model, method, "unstructured", check_sparsity(_number(key, setting_value)),
                                      value))
                except PatternError as exc:
                    raise UsageError(f"{key}: {exc}") from None
    return {"table": paper["table"].strip(), "source": paper["source"].strip(), "eval": source,
            "notes": paper.get("notes"), "cells": cells}
