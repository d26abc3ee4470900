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
from pathlib import Path

from ..atomic import write_atomic
from ..errors import UsageError
from .cells import (DENSE_PATTERN, ReportCells, build_cells, fmt, fmt_sparsity, is_baseline_row, load_records,
                    metric_order)
from .plots import plot


# ---- formatting ----------------------------------------------------------------------------------


def fmt_cell(metric, value) -> str:
    if metric[0] == "prune_s":
        return "" if value is None else f"{value:.1f}"
    return fmt(value, metric[0] != "ppl")


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
        if metric[0] == "prune_s" and len(table.prune_threads) > 1:  # times compare only at one thread count
            order = sorted(table.prune_threads.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
            counts = ", ".join(f"{n} run(s) at {'unrecorded' if t is None else t} thread(s)" for t, n in order)
            lines += [f"Note: these times were taken at different thread counts ({counts}); compare them only "
                      "within one count.", ""]
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
        row = (model, method, DENSE_PATTERN if is_baseline_row(method) else pattern)
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
