"""The report's plot (`oneshot report`, `<stem>.png`): perplexity against sparsity per method and pattern,
log y, the dense baseline as a dashed line, paper numbers as crosses; a comparison at one sparsity (the
quick start's) as grouped bars, method along x and one bar per pattern.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from ..atomic import write_atomic
from .cells import (
    DENSE_PATTERN,
    STRUCTURED_ORDER,
    ReportCells,
    fmt,
    fmt_sparsity,
    is_baseline_row,
    metric_order,
)


def plot(table: ReportCells, path: Path, paper: dict | None = None) -> bool | None:
    """PNG of ppl vs sparsity: one panel per model and ppl source. False if there is no perplexity
    to plot, None if matplotlib is missing."""
    try:
        from matplotlib.figure import (
            Figure,  # no pyplot: no global backend state is touched
        )
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
                    colour = "0.4" if is_baseline_row(method) else colours.setdefault(method, palette[len(colours) % 10])
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
