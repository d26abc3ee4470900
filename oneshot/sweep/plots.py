"""The report's plot (`oneshot report`, `<stem>.png`): perplexity (log y) and zero-shot mean accuracy (linear
y) against sparsity per method and pattern, the dense baseline as a dashed line, paper numbers as crosses; a
comparison at one sparsity (the quick start's) as grouped bars, method along x and one bar per pattern.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, NamedTuple

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


LEGEND_WIDTH = 2.6  # inches beside the panels for the figure's legend


class _Kind(NamedTuple):
    """How one kind of metric is drawn; '{}' in the texts is the metric's source (the ppl dataset)."""
    title: str
    axis: str
    log: bool  # perplexities span decades; accuracies lie in [0, 1]
    value: Callable[[float], str]


_KINDS = {"ppl": _Kind("perplexity on {}", "perplexity ({})", True, fmt),
         "zeroshot": _Kind("zero-shot mean accuracy", "zero-shot mean accuracy (higher is better)", False,
                           "{:.3f}".format)}


def plot(table: ReportCells, path: Path, paper: dict | None = None) -> bool | None:
    """The figure below as a PNG at `path`. False if there is neither perplexity nor zero-shot accuracy to
    plot, None if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    figure = draw(table, paper)
    if figure is None:
        return False
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return True


def draw(table: ReportCells, paper: dict | None = None):
    """Each metric vs sparsity: one panel per model and metric (each ppl source, then zero-shot mean accuracy),
    and beside it a panel for the N:M patterns when there are any (they would all stack at N/M on the sparsity
    axis). A row's colour is its method's and its line style and marker its variant's (owl, sequential, ...),
    with one legend for the figure. None if there is nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    sources = [m for m in metric_order(table) if m[0] in _KINDS]
    models = list(dict.fromkeys(row[0] for m in sources for row in table.rows(m)))
    if not sources or not models:
        return None
    n_m = any(_is_n_m(row[2]) for m in sources for row in table.rows(m))
    labels = {row[1] for m in sources for row in table.rows(m) if row[2] != DENSE_PATTERN}
    panels = 2 if n_m else 1
    figure = Figure(figsize=(6.4 * len(sources) + 3.2 * len(sources) * (panels - 1) + LEGEND_WIDTH,
                             max(4.2 * len(models), 0.9 + 0.16 * len(labels))), layout="constrained")
    axes = figure.subplots(len(models), len(sources) * panels, squeeze=False,
                           width_ratios=[2, 1] * len(sources) if n_m else None)
    style = _Styles()
    for r, model in enumerate(models):
        for c, metric in enumerate(sources):
            ax = axes[r][c * panels]
            rows = [row for row in table.rows(metric) if row[0] == model]
            kind = _KINDS[metric[0]]
            title = f"{model}: {kind.title.format(metric[1])}"
            if _one_setting(table, metric, rows):
                _grouped_bars(ax, table, metric, rows)
                ax.set_title(title, fontsize=10)
                if n_m:
                    axes[r][c * panels + 1].set_visible(False)
                continue
            plotted = _levels(ax, table, metric, rows, style)
            if kind.log and paper and paper["eval"] == metric[1]:
                first = True
                for p_model, method, pattern, sparsity, value in paper["cells"]:
                    if p_model != model or value <= 0:
                        continue
                    colour = "0.4" if is_baseline_row(method) else style.colour(method)
                    ax.plot([sparsity], [value], linestyle="none", marker="x", color=colour, markersize=8,
                            label="paper" if first else None)
                    first = False
                    plotted = True
            if plotted and kind.log:
                ax.set_yscale("log")
            ax.set_xlabel("sparsity")
            ax.set_ylabel(kind.axis.format(metric[1]))
            ax.set_title(title if not n_m else f"{title}, unstructured", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if n_m:
                _n_m_panel(axes[r][c * panels + 1], table, metric, rows, style, share=ax)
    handles = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles and not all(ax.get_legend() for ax in figure.axes if ax.get_visible()):
        order = [_label(row) for m in sources for row in table.rows(m)]  # the tables' row order
        labels = sorted(handles, key=lambda label: order.index(label) if label in order else len(order))
        figure.legend([handles[label] for label in labels], labels, loc="outside right upper", fontsize=7,
                      frameon=False)
    else:  # each panel has its own legend: no room kept for the figure's
        width, height = figure.get_size_inches()
        figure.set_size_inches(width - LEGEND_WIDTH, height)
    return figure


def _label(row) -> str:
    """A row's legend entry: its method label, with the pattern for a structured one (N:M rows share their
    method's entry, drawn in the N:M panel)."""
    return row[1] if row[2] in ("unstructured", DENSE_PATTERN) or _is_n_m(row[2]) else f"{row[1]} {row[2]}"


def _is_n_m(pattern: str) -> bool:
    return ":" in pattern and pattern not in STRUCTURED_ORDER


class _Styles:
    """A colour per method (the label's first word, so every variant and structured pattern of a method
    shares it) and a line style and marker per variant within that method, the same in every panel."""
    LINES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2)))
    MARKERS = "os^Dv<>PXph*"

    def __init__(self):
        self.colours: dict[str, str] = {}
        self.variants: dict[str, list[str]] = {}

    def baseline(self, label: str) -> dict:
        """A dense baseline: grey, dashed; a second one (another protocol, experiments/eval_bos.yaml) dotted."""
        seen = self.variants.setdefault("", [])
        if label not in seen:
            seen.append(label)
        return dict(color="0.4", linestyle=("--", ":", "-.", (0, (5, 1)))[seen.index(label) % 4], label=label)

    def colour(self, label: str) -> str:
        return self.colours.setdefault(label.split(" ")[0], f"C{len(self.colours) % 10}")

    def __call__(self, label: str, index: int | None = None) -> dict:
        """`index` fixes the style (a structured pattern's place in STRUCTURED_ORDER: heads look alike in
        every method)."""
        variants = self.variants.setdefault(label.split(" ")[0], [])
        if label not in variants:
            variants.append(label)
        i = variants.index(label) if index is None else index
        return dict(color=self.colour(label), linestyle=self.LINES[i % len(self.LINES)],
                    marker=self.MARKERS[i % len(self.MARKERS)], label=label)


def _points(table: ReportCells, metric, row) -> list[tuple]:
    cells = table.metrics[metric][row]
    return sorted((s, v) for s, v in cells.items() if v is not None and math.isfinite(v) and v > 0)


def _levels(ax, table: ReportCells, metric, rows, style: _Styles) -> bool:
    """Each unstructured or structured row as a line over its sparsity levels (a structured pattern's x is its
    target fraction of block parameters; its label names the pattern); N:M rows go to their own panel."""
    plotted = False
    for row in rows:
        points = _points(table, metric, row)
        if not points:
            continue
        plotted = True
        if row[2] == DENSE_PATTERN:  # the baseline's row
            ax.axhline(points[0][1], linewidth=1, **style.baseline(row[1]))
            continue
        if _is_n_m(row[2]):
            continue
        xs, ys = zip(*points)
        structure = STRUCTURED_ORDER.index(row[2]) if row[2] in STRUCTURED_ORDER else None
        ax.plot(xs, ys, markersize=5, **style(_label(row), structure))
    return plotted


def _n_m_panel(ax, table: ReportCells, metric, rows, style: _Styles, share) -> None:
    """The N:M patterns along x (2:4, 4:8, ...), each row's values joined in its style, on one y range with the
    unstructured panel so that the two read together."""
    patterns = sorted({row[2] for row in rows if _is_n_m(row[2])}, key=lambda p: tuple(int(x) for x in p.split(":")))
    for label in dict.fromkeys(row[1] for row in rows if _is_n_m(row[2])):
        values = {row[2]: _points(table, metric, row) for row in rows if row[1] == label and _is_n_m(row[2])}
        xs = [i for i, pattern in enumerate(patterns) if values.get(pattern)]
        ys = [values[patterns[i]][0][1] for i in xs]
        if xs:
            ax.plot(xs, ys, markersize=5, **style(label))
    for row in rows:
        points = _points(table, metric, row)
        if row[2] == DENSE_PATTERN and points:
            ax.axhline(points[0][1], linewidth=1, **style.baseline(row[1]))
    ax.set_xticks(range(len(patterns)), patterns)
    ax.set_xlim(-0.5, len(patterns) - 0.5)
    if _KINDS[metric[0]].log:
        ax.set_yscale("log")
    low, high = zip(ax.get_ylim(), share.get_ylim())
    for each in (ax, share):  # one y range for both panels
        each.set_ylim(min(low), max(high))
    ax.set_xlabel("pattern (N of every M pruned)")
    ax.set_title("N:M", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _one_setting(table: ReportCells, metric, rows) -> bool:
    """Whether every pruned row sits at one sparsity (a comparison of methods, not a sweep of levels);
    N:M rows count at N/M."""
    levels = {s for row in rows if row[2] != DENSE_PATTERN for s, v in table.metrics[metric][row].items()
              if v is not None}
    return len(levels) == 1


def _grouped_bars(ax, table: ReportCells, metric, rows) -> None:
    """Methods along x, one bar per pattern within each (log y for perplexity); the baseline as a dashed
    line."""
    kind = _KINDS[metric[0]]
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
        ax.bar_label(bars, labels=[kind.value(y) for y in ys], fontsize=7, padding=1)
    lowest = min(ys_all) if (ys_all := [v for row in rows for v in table.metrics[metric][row].values()
                                         if v is not None and math.isfinite(v) and v > 0]) else None
    for row in rows:
        if row[2] == DENSE_PATTERN:
            value = next((v for v in table.metrics[metric][row].values() if v is not None), None)
            if value is not None and value > 0:
                ax.axhline(value, color="0.4", linestyle="--", linewidth=1, label=f"{row[1]} {kind.value(value)}")
    if lowest is not None and kind.log:
        ax.set_ylim(bottom=lowest / 1.5)  # the baseline's line clear of the axis
    ax.set_xticks(range(len(methods)), methods)
    sparsity = next(iter({s for row in rows if row[2] != DENSE_PATTERN for s in table.metrics[metric][row]}), None)
    ax.set_xlabel("method" + (f" (sparsity {fmt_sparsity(sparsity)})" if sparsity is not None else ""))
    ax.set_ylabel(kind.axis.format(metric[1]))
    if kind.log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
