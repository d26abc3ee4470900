"""`oneshot report RESULTS.jsonl [--paper CONFIG.yaml] [--out DIR]`: tables and a plot of a sweep.

Rows are model / method / pattern, columns are sparsity levels (the dense baseline is the one row at
sparsity 0, once per model; N:M rows sit in the N/M column; structured rows under their target
fraction of decoder-block parameters). One table per perplexity source, one for the zero-shot mean
accuracy when the records have it, and one for the fraction structured runs really removed.
Written next to the results (or to --out):

- `<stem>.md`: the markdown tables (also printed to stdout),
- `<stem>.csv`: the same cells, one row per model/method/pattern/metric,
- `<stem>.png`: perplexity vs sparsity per method and pattern, log y, dense as a horizontal line,
- `<stem>.paper.csv`: with paper numbers, paper | ours | difference per cell.

Paper numbers come from a sweep config's `paper` block: pass the config itself instead of the
results file (`oneshot report experiments/x.yaml` reads its results and its paper block), or
`--paper CONFIG.yaml`.
"""
from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_atomic
from ..errors import UsageError
from .store import numbered_records

METHOD_ORDER = ("dense", "magnitude", "wanda", "sparsegpt", "admm", "flap", "taylor", "gradient", "block-influence", "angular")
STRUCTURED_ORDER = ("layers", "heads", "channels", "width")
DENSE_PATTERN = "-"


# ---- reading -------------------------------------------------------------------------------------

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


def _is_baseline(method) -> bool:
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
    if not _is_baseline(record["method"]):
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


def method_label(record: dict) -> str:
    """The method as a row names it: with its allocation, calibration order and options when they are
    not the defaults ("sparsegpt (owl)", "admm (owl, sequential)"), so such runs get rows of their own."""
    method = str(record.get("method"))
    allocation = record.get("allocation")
    name = allocation.get("name") if isinstance(allocation, dict) else allocation
    extras = [str(name)] if name and name != "uniform" else []
    if record.get("sequential"):
        extras.append("sequential")
    options = record.get("options")
    if isinstance(options, dict):
        extras += [f"{k}={v}" for k, v in sorted(options.items())]
    return f"{method} ({', '.join(extras)})" if extras else method


def _row_key(record: dict) -> tuple:
    pattern = DENSE_PATTERN if _is_baseline(record.get("method")) else str(record.get("pattern", "unstructured"))
    return str(record.get("model")), method_label(record), pattern


def _sort_rows(rows):
    def key(row):
        model, method, pattern = row
        base = method.split(" ")[0]
        m = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
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
        if not _is_baseline(record.get("method")) and _is_number(prune_s):
            table.put(("prune_s", None), row, sparsity, float(prune_s))
        structure = record.get("structure")
        if isinstance(structure, dict) and structure.get("removed_fraction") is not None:
            table.put(("removed", None), row, sparsity, _float(structure["removed_fraction"]))
    return table


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ---- formatting ----------------------------------------------------------------------------------

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


def fmt_cell(metric, value) -> str:
    if metric[0] == "prune_s":
        return "" if value is None else f"{value:.1f}"
    return fmt(value, metric[0] != "ppl")


def fmt_sparsity(sparsity: float) -> str:
    return f"{sparsity:g}"


def _difference(ours, paper) -> str:
    if ours is None or paper is None or not math.isfinite(ours):
        return ""
    diff = ours - paper
    relative = f" ({diff / paper * 100:+.1f}%)" if paper else ""
    return f"{diff:+.2f}{relative}"


def _metric_title(metric, table: ReportCells) -> str:
    kind, source = metric
    if kind == "zeroshot":
        return "Zero-shot mean accuracy (higher is better)"
    if kind == "prune_s":
        return "Prune time in seconds (calibration statistics and pruning; loading and evaluation excluded)"
    if kind == "removed":
        return "Fraction of decoder-block parameters removed (structured runs; columns are the targets)"
    shapes = sorted(table.windows.get(source, ()))
    if len(shapes) == 1:
        detail = f"; {shapes[0][0]} windows x {shapes[0][1]} tokens"
    elif shapes:
        detail = "; window counts differ between runs"
    else:
        detail = ""
    return f"Perplexity on {source} (lower is better{detail})"


def _markdown_table(header, rows, right_from: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < right_from else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def metric_order(table: ReportCells) -> list:
    ppl = [m for m in table.metrics if m[0] == "ppl"]
    return ppl + [m for kind in ("zeroshot", "removed", "prune_s") for m in table.metrics if m[0] == kind]


def render_markdown(table: ReportCells, title: str, comparison=None) -> str:
    lines = [f"## {title}", ""]
    if not table.metrics:
        lines += ["No measurements in the records.", ""]
    for metric in metric_order(table):
        columns = table.columns(metric)
        header = ["model", "method", "pattern"] + [fmt_sparsity(s) for s in columns]
        rows = [[*row, *(fmt_cell(metric, table.get(metric, row, s)) for s in columns)]
                for row in table.rows(metric)]
        lines += [f"### {_metric_title(metric, table)}", "", *_markdown_table(header, rows, 3), ""]
    if table.collisions:
        lines += [f"Note: {table.collisions} cell(s) were measured more than once with different settings; "
                  "the latest is shown. Keep one configuration per results file to avoid this.", ""]
    if comparison is not None:
        paper, cells = comparison
        lines += [f"### Paper vs ours: {paper['table']}", "",
                  f"Paper numbers: {paper['source']}. Ours: perplexity on {paper['eval']}; "
                  "difference = ours - paper (blank where we have no run yet).", ""]
        if paper.get("notes"):
            lines += [str(paper["notes"]).strip(), ""]
        header = ["model", "method", "pattern", "sparsity", "paper", "ours", "ours - paper"]
        rows = [[model, method, pattern, fmt_sparsity(sparsity), fmt(paper_value), fmt(ours),
                 _difference(ours, paper_value)]
                for model, method, pattern, sparsity, paper_value, ours in cells]
        lines += _markdown_table(header, rows, 3) + [""]
    return "\n".join(lines)


def compare_with_paper(table: ReportCells, paper: dict) -> list[tuple]:
    """(model, method, pattern, sparsity, paper, ours) for every paper number."""
    metric = ("ppl", paper["eval"])
    cells = []
    for model, method, pattern, sparsity, value in paper["cells"]:
        row = (model, method, DENSE_PATTERN if _is_baseline(method) else pattern)
        cells.append((model, method, row[2], sparsity, value, table.get(metric, row, round(sparsity, 6))))
    return cells


def write_csv(table: ReportCells, path: Path) -> None:
    columns = table.columns()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "method", "pattern", "metric", *(fmt_sparsity(s) for s in columns)])
    for metric in metric_order(table):
        name = {"ppl": f"ppl:{metric[1]}", "zeroshot": "zeroshot_mean_acc", "removed": "removed_fraction",
                "prune_s": "prune_s"}[metric[0]]
        for row in table.rows(metric):
            values = [table.get(metric, row, s) for s in columns]
            writer.writerow([*row, name, *("" if v is None else repr(v) for v in values)])
    write_atomic(path, buffer.getvalue().encode())


def write_paper_csv(cells, paper: dict, path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "method", "pattern", "sparsity", "eval", "paper", "ours", "difference"])
    for model, method, pattern, sparsity, paper_value, ours in cells:
        diff = "" if ours is None or not math.isfinite(ours) else repr(ours - paper_value)
        writer.writerow([model, method, pattern, fmt_sparsity(sparsity), paper["eval"], repr(paper_value),
                         "" if ours is None else repr(ours), diff])
    write_atomic(path, buffer.getvalue().encode())


# ---- plot ----------------------------------------------------------------------------------------

def plot(table: ReportCells, path: Path, paper: dict | None = None) -> bool | None:
    """PNG of ppl vs sparsity: one panel per model and ppl source. False if there is no perplexity
    to plot, None if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state is touched
    except ImportError:
        return None
    sources = [m for m in metric_order(table) if m[0] == "ppl"]
    models = list(dict.fromkeys(row[0] for m in sources for row in table.rows(m)))
    if not sources or not models:
        return False
    figure = Figure(figsize=(6.4 * len(sources), 4.2 * len(models)), layout="constrained")
    axes = figure.subplots(len(models), len(sources), squeeze=False)
    colours = {}
    palette = [f"C{i}" for i in range(10)]
    for r, model in enumerate(models):
        for c, metric in enumerate(sources):
            ax = axes[r][c]
            rows = [row for row in table.rows(metric) if row[0] == model]
            if _one_setting(table, metric, rows):
                _grouped_bars(ax, table, metric, rows)
                ax.set_title(f"{model}: perplexity on {metric[1]}", fontsize=10)
                continue
            plotted = False
            for row in rows:
                cells = table.metrics[metric][row]
                points = sorted((s, v) for s, v in cells.items() if v is not None and math.isfinite(v) and v > 0)
                if not points:
                    continue
                plotted = True
                if row[2] == DENSE_PATTERN:  # the baseline's row
                    ax.axhline(points[0][1], color="0.4", linestyle="--", linewidth=1, label=row[1])
                    continue
                label = row[1] if row[2] == "unstructured" else f"{row[1]} {row[2]}"
                colour = colours.setdefault(row[1], palette[len(colours) % len(palette)])
                xs, ys = zip(*points)
                if row[2] == "unstructured":
                    ax.plot(xs, ys, marker="o", color=colour, label=label)
                elif row[2] in STRUCTURED_ORDER:  # x: the target fraction of block parameters
                    ax.plot(xs, ys, marker="o^sD"[STRUCTURED_ORDER.index(row[2])], color=colour, label=label)
                else:
                    ax.plot(xs, ys, linestyle="none", color=colour, label=label,
                            marker="s" if row[2].endswith(":4") else "^", markersize=8)
            if paper and paper["eval"] == metric[1]:
                first = True
                for p_model, method, pattern, sparsity, value in paper["cells"]:
                    if p_model != model or value <= 0:
                        continue
                    colour = "0.4" if _is_baseline(method) else colours.setdefault(method, palette[len(colours) % 10])
                    ax.plot([sparsity], [value], linestyle="none", marker="x", color=colour, markersize=8,
                            label="paper" if first else None)
                    first = False
                    plotted = True
            if plotted:
                ax.set_yscale("log")
                ax.legend(fontsize=8)
            ax.set_xlabel("sparsity")
            ax.set_ylabel(f"perplexity ({metric[1]})")
            ax.set_title(f"{model}: perplexity on {metric[1]}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return True


def _one_setting(table: ReportCells, metric, rows) -> bool:
    """Whether every pruned row sits at one sparsity (a comparison of methods, not a sweep of levels);
    N:M rows count at N/M."""
    levels = {s for row in rows if row[2] != DENSE_PATTERN for s, v in table.metrics[metric][row].items()
              if v is not None}
    return len(levels) == 1


def _grouped_bars(ax, table: ReportCells, metric, rows) -> None:
    """Methods along x, one bar per pattern within each, log y; the baseline as a dashed line."""
    methods = list(dict.fromkeys(row[1] for row in rows if row[2] != DENSE_PATTERN))
    patterns = list(dict.fromkeys(row[2] for row in rows if row[2] != DENSE_PATTERN))
    width = 0.8 / max(1, len(patterns))
    for i, pattern in enumerate(patterns):
        xs, ys = [], []
        for j, method in enumerate(methods):
            value = next((v for v in table.metrics[metric].get((rows[0][0], method, pattern), {}).values()
                          if v is not None), None)
            if value is not None and math.isfinite(value) and value > 0:
                xs.append(j + (i - (len(patterns) - 1) / 2) * width)
                ys.append(value)
        bars = ax.bar(xs, ys, width=width, color=f"C{i}", label=pattern)
        ax.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=7, padding=1)
    lowest = min(ys_all) if (ys_all := [v for row in rows for v in table.metrics[metric][row].values()
                                         if v is not None and math.isfinite(v) and v > 0]) else None
    for row in rows:
        if row[2] == DENSE_PATTERN:
            value = next((v for v in table.metrics[metric][row].values() if v is not None), None)
            if value is not None and value > 0:
                ax.axhline(value, color="0.4", linestyle="--", linewidth=1, label=f"{row[1]} {fmt(value)}")
    if lowest is not None:
        ax.set_ylim(bottom=lowest / 1.5)  # the baseline's line clear of the axis
    ax.set_xticks(range(len(methods)), methods)
    sparsity = next(iter({s for row in rows if row[2] != DENSE_PATTERN for s in table.metrics[metric][row]}), None)
    ax.set_xlabel("method" + (f" (sparsity {fmt_sparsity(sparsity)})" if sparsity is not None else ""))
    ax.set_ylabel(f"perplexity ({metric[1]})")
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)


# ---- command line --------------------------------------------------------------------------------

def make_report(results: Path, out_dir: str | Path | None = None, paper: dict | None = None, out=None) -> dict:
    """Write the report files; returns {kind: path}. Prints the markdown to `out` (stdout)."""
    out = out or sys.stdout
    records, notes = load_records(results)
    if not records:
        why = f" ({len(notes)} line(s) skipped: {notes[0]})" if notes else ""
        raise UsageError(f"results {results}: no usable records{why}; run `oneshot sweep` first")
    table = build_cells(records)
    comparison = (paper, compare_with_paper(table, paper)) if paper else None
    markdown = render_markdown(table, f"Results: {results.name} ({len(records)} runs)", comparison)
    if notes:
        markdown += (f"\nNote: {len(notes)} line(s) of {results.name} were skipped: " + "; ".join(notes[:5])
                     + ("; ..." if len(notes) > 5 else "") + "\n")
    from ..paths import output_dir

    out_dir = output_dir(str(results.parent if out_dir is None else out_dir), "--out", allow_existing=True)
    stem = results.stem
    written = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    for path in (*written.values(), out_dir / f"{stem}.png", out_dir / f"{stem}.paper.csv"):
        if path == results.resolve():
            raise UsageError(f"the report would overwrite its own results file {results}; rename it to .jsonl")
    write_atomic(written["markdown"], markdown.encode())
    write_csv(table, written["csv"])
    if comparison:
        written["paper_csv"] = out_dir / f"{stem}.paper.csv"
        write_paper_csv(comparison[1], paper, written["paper_csv"])
    png = out_dir / f"{stem}.png"
    plotted = plot(table, png, paper)
    if plotted:
        written["png"] = png
    elif plotted is None:
        written["no_png"] = "matplotlib is not installed (pip install 'oneshot[plot]'); no PNG written"
    print(markdown, file=out)
    return written
