"""`oneshot sweep` and `oneshot report`: grids, resuming after a kill, tables, plots, bad configs."""
import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from oneshot import cli
from oneshot.cli.sweep import sweep_command
from oneshot.errors import UsageError
from oneshot.sweep import label, load_config, run_key, runner

from helpers import TINY_SWEEP


def sweep_main(argv):
    return cli.main(["sweep", *argv])


def report_main(argv):
    return cli.main(["report", *argv])


def write_config(tmp_path, methods="[wanda]", patterns="[unstructured]", sparsities="[0.3, 0.6]", extra=""):
    path = tmp_path / "sweep.yaml"
    path.write_text(TINY_SWEEP.format(methods=methods, patterns=patterns, sparsities=sparsities) + extra)
    return path


def lines(path):
    return path.read_bytes().splitlines()


def test_two_point_sweep_writes_results_report_csv_and_png(tmp_path, capsys):
    config = write_config(tmp_path, extra=(
        "paper:\n  table: 'a made-up table'\n  source: 'this test'\n"
        "  ppl:\n    random:tiny-llama: {dense: 500.0, wanda: {0.3: 510.0}}\n"))
    assert sweep_main([str(config)]) == 0
    out = capsys.readouterr().out
    results = tmp_path / "out" / "results.jsonl"
    records = [json.loads(line) for line in lines(results)]
    assert [(r["method"], r["sparsity_target"]) for r in records] == [("dense", 0.0), ("wanda", 0.3), ("wanda", 0.6)]
    for record in records:  # the result.json record of `oneshot prune`, plus its run_key
        assert {"model", "pattern", "sparsity_measured", "sparsity_per_layer", "ppl", "calibration", "timings",
                "versions", "run_key"} <= set(record)
    assert records[1]["sparsity_measured"] == pytest.approx(0.3, abs=0.01)
    assert records[1]["calibration"] == {"source": "wiki-offline", "nsamples": 4, "seqlen": 64, "seed": 0}
    assert out.count("ppl wiki-offline") == 3  # one progress line per run

    assert sweep_main([str(config)]) == 0  # everything recorded: nothing runs again
    assert "all 3 runs are already recorded" in capsys.readouterr().out
    assert len(lines(results)) == 3

    assert report_main([str(config)]) == 0  # a config: its results file and its paper block
    printed = capsys.readouterr().out
    assert "| model | method | pattern | 0 | 0.3 | 0.6 |" in printed
    assert "Paper vs ours: a made-up table" in printed
    ours = records[1]["ppl"]["wiki-offline"]
    assert f"{ours - 510.0:+.2f}" in printed

    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["method"], r["pattern"], r["metric"]) for r in rows] == [
        ("dense", "-", "ppl:wiki-offline"), ("wanda", "unstructured", "ppl:wiki-offline"),
        ("wanda", "unstructured", "prune_s")]  # the dense baseline prunes nothing: no time row
    assert float(rows[1]["0.6"]) == pytest.approx(records[2]["ppl"]["wiki-offline"])
    assert float(rows[2]["0.3"]) == pytest.approx(records[1]["timings"]["prune_s"])
    assert "### Prune time in seconds" in printed
    assert rows[0]["metric"] == "ppl:wiki-offline" and rows[0]["0.3"] == ""
    paper = list(csv.DictReader((tmp_path / "out" / "results.paper.csv").open()))
    assert float(paper[1]["difference"]) == pytest.approx(ours - 510.0)
    assert (tmp_path / "out" / "results.md").read_text().startswith("## Results")

    image = pytest.importorskip("matplotlib.image")
    pixels = image.imread(tmp_path / "out" / "results.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


KILLED_RUN = """
import sys, time
from oneshot.sweep import runner
from oneshot.cli import main
real, calls = runner.run, []
def slow_after_first(spec, **kwargs):  # the second run hangs, so the kill lands after exactly one finished run
    if calls:
        time.sleep(120)
    calls.append(spec)
    return real(spec, **kwargs)
runner.run = slow_after_first
sys.exit(main(["sweep", sys.argv[1]]))
"""


@pytest.mark.system  # SIGKILL to a sweep in a fresh Python process
def test_killed_sweep_resumes_without_repeating_or_losing_runs(tmp_path, capsys):
    config = write_config(tmp_path, methods="[magnitude, wanda]", sparsities="[0.5]")
    results = tmp_path / "out" / "results.jsonl"
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not (results.exists() and len(lines(results)) >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    first = lines(results)
    assert len(first) == 1

    assert sweep_main([str(config)]) == 0
    assert "1 already recorded, 2 to run" in capsys.readouterr().out
    final = lines(results)
    assert final[0] == first[0]  # the finished line is untouched
    keys = [json.loads(line)["run_key"] for line in final]
    expected = [run_key(run) for run in load_config(config).runs()]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == 3


def test_torn_last_line_is_ignored_and_the_run_redone(tmp_path, capsys):
    config = write_config(tmp_path, sparsities="[0.5]")
    assert sweep_main([str(config)]) == 0
    results = tmp_path / "out" / "results.jsonl"
    good = lines(results)
    results.write_bytes(good[0] + b"\n" + good[1][:40])  # killed in the middle of writing line 2
    capsys.readouterr()
    assert sweep_main([str(config)]) == 0
    assert "1 unreadable line" in capsys.readouterr().out
    final = lines(results)
    assert final[0] == good[0] and final[1] == good[1][:40]
    assert json.loads(final[2])["run_key"] == json.loads(good[1])["run_key"]


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, methods="[magnitude, sparsegpt]", patterns="[unstructured, 2:4]")
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("a dry run must not run anything"))
    assert sweep_main([str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "7 runs, 0 already recorded" in out  # dense + 2 methods x (2 sparsities + 2:4)
    assert out.count(" todo ") == 7 and "sparsegpt 2:4" in out
    assert not (tmp_path / "out").exists()


def test_failed_run_records_nothing_and_the_sweep_goes_on(tmp_path, capsys):
    config = write_config(tmp_path, methods="[magnitude]", patterns="[3:5, unstructured]", sparsities="[0.5]")
    assert sweep_main([str(config)]) == 1  # tiny-llama's widths are not multiples of 5
    out = capsys.readouterr().out
    assert "magnitude 3:5 ... FAILED" in out and "multiple of 5" in out
    records = [json.loads(line) for line in lines(tmp_path / "out" / "results.jsonl")]
    assert [(r["method"], r["pattern"]) for r in records] == [("dense", "unstructured"), ("magnitude", "unstructured")]


def test_run_keys_follow_what_determines_the_result(tmp_path):
    base = {label(run): run_key(run) for run in load_config(write_config(tmp_path, methods="[magnitude, wanda]")).runs()}
    other_device = write_config(tmp_path, methods="[magnitude, wanda]").read_text().replace("device: cpu", "device: auto")
    (tmp_path / "sweep.yaml").write_text(other_device)
    assert {label(r): run_key(r) for r in load_config(tmp_path / "sweep.yaml").runs()} == base
    (tmp_path / "sweep.yaml").write_text(other_device.replace("nsamples: 4", "nsamples: 8"))
    changed = {label(r): run_key(r) for r in load_config(tmp_path / "sweep.yaml").runs()}
    assert changed["random:tiny-llama magnitude 0.3"] == base["random:tiny-llama magnitude 0.3"]  # no calibration
    assert changed["random:tiny-llama dense"] == base["random:tiny-llama dense"]
    assert changed["random:tiny-llama wanda 0.3"] != base["random:tiny-llama wanda 0.3"]


def test_a_lone_switch_in_options_is_one_value_as_a_lone_number_is(tmp_path):
    config = write_config(tmp_path, methods="[flap]", patterns="[channels]", sparsities="[0.2]",
                          extra="options: {bias_compensation: false}\n")
    runs = [r for r in load_config(config).runs() if r.method == "flap"]
    assert [r.options for r in runs] == [{"bias_compensation": False}]
    switched = write_config(tmp_path, methods="[flap]", patterns="[channels]", sparsities="[0.2]",
                            extra="options: {bias_compensation: [true, false]}\n")
    assert sorted(r.options["bias_compensation"] for r in load_config(switched).runs() if r.method == "flap") == [
        False, True]


def test_unquoted_nm_patterns_are_patterns_not_base_60_numbers(tmp_path):
    config = load_config(write_config(tmp_path, patterns="[unstructured, 2:4, 4:8]", sparsities="[1e-1]"))
    assert config.patterns == ["unstructured", "2:4", "4:8"] and config.sparsities == [0.1]


BAD = [
    ("sparsities: [0.3]\nfoo: 1\n", "unknown key 'foo'; allowed keys: models, methods"),
    ("calibration: {source: wiki-offline, nsample: 4}\n", "unknown key 'calibration.nsample'"),
    ("sparsities: [0.5, 1.2]\n", "a number in [0, 1)"),
    ("sparsities: [half]\n", "sparsities must be a number"),
    ("methods: [wanda, obs]\n", "unknown method 'obs'"),
    ("patterns: [2x4]\n", "N:M"),
    ("patterns: [4:2]\n", "0 < N < M"),
    ("models: []\n", "models must be a non-empty list"),
    ("models:\n", "missing required key 'models'"),
    ("eval: {ppl: [mystery], samples: 2}\n", "source 'mystery'"),
    ("eval: {ppl: [wiki-offline], samples: 0}\n", "eval.samples must be a positive whole number"),
    ("dtype: float8\n", "unknown dtype"),
    ("paper: {table: t, source: s, ppl: {other-model: {dense: 5.0}}}\n", "'other-model' is not in models"),
    ("paper: {table: t, ppl: {}}\n", "paper.source"),
    ("models: [no-such-model]\n", "unknown model"),  # the schema is fine; the pre-flight check catches it
    ("models: [random:tiny-llama\n", "not valid YAML"),
]


@pytest.mark.parametrize("override,fragment", BAD, ids=[fragment for _, fragment in BAD])
def test_bad_config_is_one_line_before_any_run(override, fragment, tmp_path, capsys, monkeypatch):
    text = TINY_SWEEP.format(methods="[wanda]", patterns="[unstructured]", sparsities="[0.3]")
    for line in override.splitlines(keepends=True):  # replace the key's line, or add it
        key = line.split(":")[0]
        kept = [old for old in text.splitlines(keepends=True) if not old.startswith(key + ":")]
        text = "".join(kept) + line
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("no run may start with a bad config"))
    assert sweep_main([str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("oneshot: error: ") and fragment in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError):  # what `oneshot sweep` sees once wired in
        sweep_command(argparse.Namespace(config=str(config), results=None, dry_run=False, verbose=False, reload=False))


def test_zero_shot_tasks_are_passed_on_and_reported(tmp_path, capsys):
    """--eval-tasks is wired by another change; here only the flag and the report's reading of it."""
    config = load_config(write_config(tmp_path))
    (tmp_path / "t.yaml").write_text((tmp_path / "sweep.yaml").read_text().replace(
        "eval: {ppl: [wiki-offline], samples: 2}", "eval: {ppl: [wiki-offline], samples: 2, tasks: [boolq, rte], limit: 20}"))
    with_tasks = load_config(tmp_path / "t.yaml").runs()[1]
    assert with_tasks.eval.tasks == "boolq,rte" and with_tasks.eval.limit == 20
    assert run_key(with_tasks) != run_key(config.runs()[1])
    results = tmp_path / "z.jsonl"
    results.write_text("".join(json.dumps(
        {"model": "m", "method": method, "pattern": "unstructured", "sparsity_target": s, "run_key": method,
         "ppl": {"wiki-offline": ppl}, "zeroshot": {"mean_acc": acc}}) + "\n"
        for method, s, ppl, acc in [("dense", 0.0, 10.0, 0.61), ("wanda", 0.5, 12.5, 0.57)]))
    assert report_main([str(results)]) == 0
    assert "Zero-shot mean accuracy" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "z.csv").open()))
    assert [(r["method"], r["metric"]) for r in rows][-1] == ("wanda", "zeroshot_mean_acc")
    assert float(rows[-1]["0.5"]) == 0.57


def test_grid_keeps_only_allocations_that_apply_to_the_pattern(tmp_path):
    """owl x 2:4 is left out of a grid (N:M fixes every layer's sparsity); owl x unstructured stays."""
    config = write_config(tmp_path, methods="[wanda]", patterns='[unstructured, "2:4"]', sparsities="[0.6]",
                          extra="allocations: [uniform, owl]\n")
    got = {(r.method, r.pattern, r.allocation) for r in load_config(config).runs()}
    assert got == {("dense", "unstructured", "uniform"), ("wanda", "unstructured", "uniform"),
                   ("wanda", "unstructured", "owl"), ("wanda", "2:4", "uniform")}


def test_report_gives_allocations_orders_and_options_rows_of_their_own(tmp_path):
    """OWL, --sequential and option values are other methods in a table, never a collision with the plain one."""
    from oneshot.sweep.cells import build_cells, method_label

    base = {"model": "m", "method": "wanda", "pattern": "unstructured", "sparsity_target": 0.6, "ppl": {"w": 30.0},
            "timings": {"prune_s": 2.0}}
    records = [base, {**base, "allocation": {"name": "owl", "options": {}}, "ppl": {"w": 25.0}},
               {**base, "method": "admm", "allocation": {"name": "owl"}, "sequential": True,
                "options": {"iterations": 20}, "ppl": {"w": 20.0}},
               {**base, "allocation": {"name": "uniform"}, "sequential": False, "options": {}, "run_key": "x"}]
    assert [method_label(r) for r in records] == ["wanda", "wanda (owl)", "admm (owl, sequential, iterations=20)",
                                                  "wanda"]
    table = build_cells(records[:3])
    assert table.collisions == 0
    assert [row[1] for row in table.rows(("ppl", "w"))] == ["wanda", "wanda (owl)", "admm (owl, sequential, iterations=20)"]
    assert table.get(("prune_s", None), ("m", "wanda (owl)", "unstructured"), 0.6) == 2.0


def test_prune_times_taken_at_different_thread_counts_are_flagged_in_the_report():
    """float32 work splits over torch's threads, so times (and the last bits) follow the count: a table mixing
    counts says so, and one count says nothing."""
    from oneshot.sweep.cells import build_cells
    from oneshot.sweep.report import render_markdown

    base = {"model": "m", "method": "wanda", "pattern": "unstructured", "ppl": {"w": 30.0},
            "timings": {"prune_s": 2.0}}
    same = [dict(base, sparsity_target=0.5, threads=2), dict(base, sparsity_target=0.6, threads=2)]
    assert "thread counts" not in render_markdown(build_cells(same), "t")
    mixed = same + [dict(base, sparsity_target=0.7)]
    assert "(2 run(s) at 2 thread(s), 1 run(s) at unrecorded thread(s))" in render_markdown(build_cells(mixed), "t")


def test_labels_tell_sequential_runs_apart(tmp_path):
    config = write_config(tmp_path, methods="[sparsegpt]", sparsities="[0.6]", extra="sequential: true\n")
    assert [label(r) for r in load_config(config).runs()] == ["random:tiny-llama dense",
                                                              "random:tiny-llama sparsegpt sequential 0.6"]


def test_a_one_sparsity_comparison_is_plotted_as_grouped_bars(tmp_path):
    """The quick start's shape (methods x patterns at one sparsity): bars per method and pattern, the
    baseline as a line; a sweep over sparsity levels stays a line plot."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from oneshot.sweep.cells import build_cells
    from oneshot.sweep.plots import _grouped_bars, _one_setting

    base = {"model": "m", "ppl": {"w": 1.0}, "timings": {}}
    records = [dict(base, method="dense", pattern="unstructured", sparsity_target=0.0, ppl={"w": 15.0})]
    records += [dict(base, method=m, pattern=p, sparsity_target=0.5, ppl={"w": v}, run_key=f"{m}{p}")
                for (m, p), v in {("wanda", "unstructured"): 36.0, ("wanda", "2:4"): 138.0,
                                  ("sparsegpt", "unstructured"): 34.0, ("sparsegpt", "2:4"): 71.0}.items()]
    table = build_cells(records)
    metric = ("ppl", "w")
    rows = table.rows(metric)
    assert _one_setting(table, metric, rows)
    ax = Figure().subplots()
    _grouped_bars(ax, table, metric, rows)
    assert [len(c) for c in ax.containers] == [2, 2]  # two patterns, each a bar per method
    assert [t.get_text() for t in ax.get_xticklabels()] == ["wanda", "sparsegpt"]
    assert ax.get_yscale() == "log" and any(line.get_linestyle() == "--" for line in ax.get_lines())
    records.append(dict(base, method="wanda", pattern="unstructured", sparsity_target=0.6, ppl={"w": 60.0}))
    assert not _one_setting(build_cells(records), metric, build_cells(records).rows(metric))


def test_a_hand_set_bos_protocol_gets_a_row_of_its_own():
    """eval.bos set in a config (experiments/eval_bos.yaml) splits rows; left to the family, it does not."""
    from oneshot.sweep.cells import method_label

    def record(bos):
        return {"method": "dense", "settings": {"eval": {"bos": bos}}}

    assert method_label(record(True)) == "dense (BOS per window)"
    assert method_label(record(False)) == "dense (no BOS)"
    assert method_label(record(None)) == "dense"


def test_a_leaderboard_is_plotted_with_an_n_m_panel_and_one_legend_entry_per_row():
    """Many rows over sparsity levels plus 2:4/4:8: the N:M points get a panel of their own (at N/M they
    would stack on the 50% column), variants of one method share its colour and differ in style, and the
    figure has one legend, an entry per row, in the tables' order."""
    pytest.importorskip("matplotlib")
    from oneshot.sweep.cells import build_cells
    from oneshot.sweep.plots import draw

    base = {"model": "m", "timings": {}}
    records = [dict(base, method="dense", pattern="unstructured", sparsity_target=0.0, ppl={"w": 14.0})]
    for method, extra in (("wanda", {}), ("wanda", {"sequential": True}), ("alps", {}),
                          ("alps", {"allocation": {"name": "owl"}})):
        for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)):
            records.append(dict(base, method=method, pattern=pattern, sparsity_target=sparsity, **extra,
                                ppl={"w": 20.0 + 100 * sparsity + len(extra)}, run_key=f"{method}{extra}{pattern}{sparsity}"))
    figure = draw(build_cells(records))
    levels, n_m = figure.axes
    assert [t.get_text() for t in n_m.get_xticklabels()] == ["2:4", "4:8"]
    assert levels.get_ylim() == n_m.get_ylim()
    lines = {line.get_label(): line for line in levels.get_lines() if not line.get_label().startswith("_")}
    assert lines["wanda"].get_color() == lines["wanda (sequential)"].get_color() != lines["alps"].get_color()
    assert lines["wanda"].get_linestyle() != lines["wanda (sequential)"].get_linestyle()
    assert all(len(line.get_xdata()) == 2 for label, line in lines.items() if label != "dense")  # 50% and 70%
    [legend] = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["dense", "wanda", "wanda (sequential)", "alps",
                                                          "alps (owl)"]


def test_zero_shot_accuracy_is_plotted_beside_perplexity_on_a_linear_axis():
    """A results file of zero-shot runs only (the leaderboard's zero-shot columns) gets a plot too: mean
    accuracy against sparsity, linear y, N:M in its own panel; with perplexity as well, one panel each."""
    pytest.importorskip("matplotlib")
    from oneshot.sweep.cells import build_cells
    from oneshot.sweep.plots import draw

    base = {"model": "m", "timings": {}}
    records = [dict(base, method="dense", pattern="unstructured", sparsity_target=0.0, zeroshot={"mean_acc": 0.6})]
    for method, accuracy in (("wanda", 0.5), ("alps", 0.55)):
        for pattern, sparsity in (("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)):
            records.append(dict(base, method=method, pattern=pattern, sparsity_target=sparsity,
                                zeroshot={"mean_acc": accuracy - sparsity / 4}, run_key=f"{method}{pattern}{sparsity}"))
    levels, n_m = draw(build_cells(records)).axes
    assert levels.get_yscale() == n_m.get_yscale() == "linear" and "accuracy" in levels.get_ylabel()
    assert levels.get_ylim() == n_m.get_ylim()
    lines = {line.get_label(): line for line in levels.get_lines() if not line.get_label().startswith("_")}
    assert list(lines["alps"].get_ydata()) == [0.55 - 0.5 / 4, 0.55 - 0.7 / 4]
    both = [dict(r, ppl={"w": 10.0 + 100 * r["sparsity_target"]}) for r in records]
    axes = draw(build_cells(both)).axes
    assert [ax.get_yscale() for ax in axes] == ["log", "log", "linear", "linear"]
