"""The report's cells: a results file's records read and checked, and arranged as rows (model / method /
pattern) by columns (sparsity) per metric, with the formatting the tables and the plot share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..settings import entry
from ..spec import STRUCTURED_PATTERNS as STRUCTURED_ORDER
from .store import numbered_records


def method_order() -> list[str]:
    """Rows follow the registries' order: the weight-pruning methods, then the structured criteria."""
    from ..methods import METHODS
    from ..structured import CRITERIA

    return list(dict.fromkeys([*METHODS, *CRITERIA]))


DENSE_PATTERN = "-"


def load_records(path: Path) -> tuple[list[dict], list[str]]:
    """Records of a results JSONL, the last one per run_key; and one note per line skipped
    (unreadable, or a record whose fields a table cannot use)."""
    if not path.is_file():
        raise UsageError(f"results {path}: no such file" if not path.exists() else f"results {path} is not a file")
    numbered, bad = numbered_records(path)
    notes = [(number, "not a JSON record (an interrupted write?)") for number in bad]
    latest = {}
    for number, record in numbered:
        problem = record_problem(record)
        if problem:
            notes.append((number, problem))
            continue
        latest[record.get("run_key") or f"line-{number}"] = record
    return list(latest.values()), [f"line {number}: {problem}" for number, problem in sorted(notes)]


def is_baseline_row(method) -> bool:
    """Whether a record's (or a paper cell's) method is the unpruned baseline. methods is imported here, not at
    the top, so that importing the sweep package stays free of torch."""
    from ..methods import is_baseline

    return is_baseline(method)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: dict) -> str | None:
    """Why a record cannot go into a table (one phrase), or None: every field the tables read is checked."""
    from ..methods import PatternError, parse_pattern

    for key in ("model", "method"):
        if not isinstance(record.get(key), str):
            return f"{key} is {record.get(key)!r}, not text"
    pattern = record.get("pattern", "unstructured")
    if not is_baseline_row(record["method"]):
        try:
            if not isinstance(pattern, str):
                raise PatternError(pattern)
            parse_pattern(pattern)
        except PatternError:
            return f"pattern {pattern!r} is not a pattern"
    if record.get("sparsity_target") is not None and not _is_number(record["sparsity_target"]):
        return f"sparsity_target {record['sparsity_target']!r} is not a number"
    ppl = record.get("ppl") or {}
    if not isinstance(ppl, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in ppl.items()):
        return f"ppl {ppl!r} is not a mapping of source to number"
    windows = (record.get("eval") or {}).get("windows") if isinstance(record.get("eval") or {}, dict) else None
    if windows is not None and not (isinstance(windows, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) for v in windows.values())):
        return f"eval.windows {windows!r} is not a mapping of source to [windows, seqlen]"
    zeroshot = record.get("zeroshot")
    if zeroshot is not None and not (isinstance(zeroshot, dict) and (
            zeroshot.get("mean_acc") is None or _is_number(zeroshot.get("mean_acc")))):
        return "zeroshot.mean_acc is not a number"
    return None


REFIT_LR = entry("refit_lr").default


def method_label(record: dict) -> str:
    """The method as a row names it: with its allocation, calibration order and options when they are
    not the defaults ("sparsegpt (owl)", "admm (owl, sequential)"), so such runs get rows of their own."""
    method = str(record.get("method"))
    allocation = record.get("allocation")
    name = allocation.get("name") if isinstance(allocation, dict) else allocation
    extras = [str(name)] if name and name != "uniform" else []
    if record.get("sequential"):
        extras.append("sequential")
    if record.get("asymmetric"):
        extras.append("asymmetric")
    settings = record.get("settings") or {}
    if settings.get("refit"):
        extras.append(f"refit {settings['refit']}")
        if settings.get("refit_lr", REFIT_LR) != REFIT_LR:
            extras.append(f"refit lr {settings['refit_lr']:g}")
    bos = (settings.get("eval") or {}).get("bos")
    if bos is not None:  # set by hand, not left to the family: say which way (experiments/eval_bos.yaml)
        extras.append("BOS per window" if bos else "no BOS")
    options = record.get("options")
    if isinstance(options, dict):
        extras += [f"{k}={v}" for k, v in sorted(options.items())]
    return f"{method} ({', '.join(extras)})" if extras else method


def _row_key(record: dict) -> tuple:
    pattern = DENSE_PATTERN if is_baseline_row(record.get("method")) else str(record.get("pattern", "unstructured"))
    return str(record.get("model")), method_label(record), pattern


def _sort_rows(rows):
    order = method_order()

    def key(row):
        model, method, pattern = row
        base = method.split(" ")[0]
        m = order.index(base) if base in order else len(order)
        if pattern in (DENSE_PATTERN, "unstructured"):
            p = (0, 0, 0)
        elif pattern in STRUCTURED_ORDER:
            p = (2, STRUCTURED_ORDER.index(pattern), 0)
        else:
            n, mm = (int(x) for x in pattern.split(":"))
            p = (1, mm, n)
        return (m, method, p)

    models = list(dict.fromkeys(row[0] for row in rows))
    return sorted(rows, key=lambda row: (models.index(row[0]), key(row)))


@dataclass
class ReportCells:
    """The report's cells per metric: metric -> {(model, method, pattern): {sparsity: value}}."""

    metrics: dict = field(default_factory=dict)
    windows: dict = field(default_factory=dict)  # ppl source -> set of (n, seqlen)
    collisions: int = 0
    prune_threads: dict = field(default_factory=dict)  # torch threads (None: not recorded) -> runs timed with them

    def put(self, metric, row, sparsity, value):
        cells = self.metrics.setdefault(metric, {}).setdefault(row, {})
        if sparsity in cells:
            self.collisions += 1
        cells[sparsity] = value

    def get(self, metric, row, sparsity):
        return self.metrics.get(metric, {}).get(row, {}).get(sparsity)

    def rows(self, metric):
        return _sort_rows(list(self.metrics.get(metric, {})))

    def columns(self, metric=None):
        metrics = [metric] if metric else list(self.metrics)
        found = {s for m in metrics for cells in self.metrics.get(m, {}).values() for s in cells}
        return sorted(found)


def build_cells(records: list[dict]) -> ReportCells:
    """The cells of every table: each record's measurements under its row and sparsity column."""
    table = ReportCells()
    for record in records:
        row = _row_key(record)
        sparsity = round(float(record.get("sparsity_target") or 0.0), 6)
        for source, value in (record.get("ppl") or {}).items():
            table.put(("ppl", source), row, sparsity, _float(value))
            shape = ((record.get("eval") or {}).get("windows") or {}).get(source)
            if shape:
                table.windows.setdefault(source, set()).add(tuple(shape))
        zeroshot = record.get("zeroshot")
        if isinstance(zeroshot, dict) and zeroshot.get("mean_acc") is not None:
            table.put(("zeroshot", None), row, sparsity, _float(zeroshot["mean_acc"]))
        prune_s = (record.get("timings") or {}).get("prune_s") if isinstance(record.get("timings"), dict) else None
        if not is_baseline_row(record.get("method")) and _is_number(prune_s):
            table.put(("prune_s", None), row, sparsity, float(prune_s))
            threads = record.get("threads")
            table.prune_threads[threads] = table.prune_threads.get(threads, 0) + 1
        structure = record.get("structure")
        if isinstance(structure, dict) and structure.get("removed_fraction") is not None:
            table.put(("removed", None), row, sparsity, _float(structure["removed_fraction"]))
    return table


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def fmt(value, accuracy: bool = False) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    if accuracy:
        return f"{value:.4f}"
    if abs(value) >= 1e4:
        return f"{value:.3g}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}"


def fmt_sparsity(sparsity: float) -> str:
    return f"{sparsity:g}"


def metric_order(table: ReportCells) -> list:
    ppl = [m for m in table.metrics if m[0] == "ppl"]
    return ppl + [m for kind in ("zeroshot", "removed", "prune_s") for m in table.metrics if m[0] == kind]
