"""The leaderboard's scripts: benchmarks/prune_time.py reads variant names as the table's rows name them, and
benchmarks/leaderboard_table.py takes ratios within one process and holds one configuration to the goal."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


prune_time = _script("prune_time")
leaderboard_table = _script("leaderboard_table")
ARGS = SimpleNamespace(model="random:tiny-llama", pattern="unstructured", sparsity=0.7, nsamples=2, seqlen=16,
                       seed=0, device="cpu")


@pytest.mark.parametrize("variant, method, settings", [
    ("wanda++", "wanda++", dict(allocation="uniform", sequential=False)),
    ("wanda+++owl", "wanda++", dict(allocation="owl", sequential=False)),
    ("dsnot[base=sparsegpt]", "dsnot", dict(options={"base": "sparsegpt"})),
    ("alps+sequential+asymmetric+refit 2", "alps", dict(sequential=True, asymmetric=True, refit=2)),
    ("alps+sequential+refit 1+refit lr 1e-05", "alps", dict(refit=1, refit_lr=1e-5)),
])
def test_a_variant_names_its_method_and_settings(variant, method, settings):
    spec = prune_time.variant_spec(variant, ARGS)
    assert spec.method == method
    assert {name: getattr(spec, name) for name in settings} == settings


@pytest.mark.parametrize("variant, message", [("wanda+ow", r"unknown method 'wanda\+ow'"),
                                              ("wanda+sequential+fast", "unknown part"),
                                              ("alps+refit x", "invalid literal")])
def test_an_unknown_part_of_a_variant_is_refused(variant, message):
    with pytest.raises((SystemExit, ValueError), match=message):
        prune_time.variant_spec(variant, ARGS)


def _line(date, variant, seconds, **extra):
    return json.dumps({"benchmark": "prune_time", "setting": "0.7", "seqlen": 1024, "command": "python x",
                       "date": date, "variant": variant, "prune_s": seconds, **extra})


def test_ratios_come_from_one_process_and_the_newest_wins(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join([
        _line("2026-01-01", "sparsegpt", [100.0, 120.0, 110.0]), _line("2026-01-01", "wanda", [50.0, 60.0, 55.0]),
        _line("2026-01-01", "admm", [300.0]),
        # a newer process, a line per run as it ends: two rounds of each
        _line("2026-02-01", "sparsegpt", [200.0], round=1), _line("2026-02-01", "wanda", [50.0], round=1),
        _line("2026-02-01", "sparsegpt", [200.0], round=2), _line("2026-02-01", "wanda", [70.0], round=2),
        # a process that never timed SparseGPT gives no ratios
        _line("2026-03-01", "wanda", [1.0]),
    ]) + "\n")
    ratios = leaderboard_table.prune_ratios(path)
    assert ratios["sparsegpt"] == 1.0
    assert ratios["wanda"] == pytest.approx(70.0 / 200.0)  # the upper median of 50 and 70, over 200
    assert ratios["admm"] == pytest.approx(300.0 / 110.0)  # only the older process timed it


def _summary(ours, other, recorded=10, expected=10):
    return {"recorded": recorded, "expected": expected,
            "goal": {"60%": (ours, 40.0, ours / 40.0 - 1)},
            "versus": {"60%": (ours, other, "alps (sequential)")}}


def test_the_goal_lines_say_met_or_not_and_whether_the_grid_is_complete():
    text = "\n".join(leaderboard_table.goal_lines(_summary(30.0, 35.0)))
    assert "- 60%: 30.00 against ALPS 40.00: -25.0% (met)" in text
    assert "against alps (sequential)'s 35.00: -14.3% (holds)" in text
    text = "\n".join(leaderboard_table.goal_lines(_summary(39.0, 35.0, recorded=9)))
    assert "(not met)" in text and "(does not hold so far: not every run is recorded)" in text


def test_the_best_configuration_closes_the_table_whatever_the_registry_order(tmp_path):
    # RIA comes after ALPS in the method registry; the best configuration's row must still be the table's last
    wanted = {"ria", "alps", leaderboard_table.BEST_CONFIG}
    lines = [line for line in (ROOT / "experiments/results/leaderboard.jsonl").read_text().splitlines()
             if line.strip() and leaderboard_table._row(json.loads(line)) in wanted]
    results = tmp_path / "leaderboard.jsonl"
    results.write_text("\n".join(lines) + "\n")
    text, _ = leaderboard_table.build(results, tmp_path / "none.jsonl", ROOT / "benchmarks/results.jsonl",
                                      ROOT / "benchmarks/parity_runs/parity.jsonl")
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")][1:]
    assert set(rows) == wanted
    assert rows[-1] == leaderboard_table.BEST_CONFIG and rows.index("alps") < rows.index("ria")


def test_the_made_by_commands_run_every_config_and_time_every_grid_row():
    rows = leaderboard_table.grid_rows()
    text = leaderboard_table.commands(rows)
    for name in (*leaderboard_table.CONFIGS, *leaderboard_table.ZEROSHOT_CONFIGS):
        assert f" {name}" in text
    # the variant list as bash builds it from the doc's lines, then as prune_time.py reads it
    script = "\n".join(line.strip() for line in text.splitlines() if line.strip().startswith("v=")) + '\nprintf %s "$v"'
    variants = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split(",")
    assert variants[0] == "sparsegpt" and len(variants) == len(set(variants)) == len(rows)
    assert set(variants) == {leaderboard_table.variant_of(row) for row in rows}
    assert {"dsnot[base=sparsegpt]", "wanda++", "alps+sequential+asymmetric+refit 2"} <= set(variants)
    for variant in variants:
        prune_time.variant_spec(variant, ARGS)


def test_the_committed_doc_holds_the_table_its_results_make():
    # docs/leaderboard.md is committed with each new record; a record or a script change without it fails here
    assert leaderboard_table.main(["--check"]) == 0, "run python benchmarks/leaderboard_table.py"
