"""The field's methods (RIA, DSnoT, ALPS; Wanda++ has its own in test_wandapp.py) through every way a run
happens: the CLI with --option, a YAML run config and a sweep; each record names the method and the options
given, and a sweep gives each option value its own run key."""
from __future__ import annotations

import json

import pytest

from helpers import TINY_ARGS, TINY_SWEEP, run_cli

# One non-default option per method: (method, option as NAME=VALUE, its typed value).
CASES = [("ria", "a", "0.25", 0.25), ("dsnot", "base", "sparsegpt", "sparsegpt"), ("alps", "max_iter", "20", 20)]


@pytest.mark.parametrize("method, name, text, value", CASES, ids=[c[0] for c in CASES])
def test_cli_yaml_and_sweep_run_the_method_and_record_its_options(tmp_path, capsys, method, name, text, value):
    code, _, err = run_cli(["prune", *TINY_ARGS, "--method", method, "--sparsity", "0.5", "--option",
                            f"{name}={text}", "--output", str(tmp_path / "cli")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "cli" / "result.json").read_text())
    assert record["method"] == method and record["options"] == {name: value}
    assert abs(record["sparsity_measured"] - 0.5) < 0.02

    config = tmp_path / "run.yaml"
    config.write_text(f"model: random:tiny-llama\nmethod: {method}\nsparsity: 0.5\noptions: {{{name}: {text}}}\n"
                      "calibration: {nsamples: 4, seqlen: 64}\neval: {samples: 2}\n")
    code, _, err = run_cli(["prune", "--config", str(config), "--quiet", "--output", str(tmp_path / "yaml")], capsys)
    assert code == 0, err
    from_yaml = json.loads((tmp_path / "yaml" / "result.json").read_text())
    assert from_yaml["method"] == method and from_yaml["options"] == {name: value}
    assert from_yaml["ppl"] == pytest.approx(record["ppl"])  # the same run, however it was asked for

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(TINY_SWEEP.format(methods=f"[{method}]", patterns="[unstructured]", sparsities="[0.5]")
                     + f"options: {{{name}: [{text}]}}\n")
    code, _, err = run_cli(["sweep", str(sweep)], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    pruned = [r for r in lines if r["method"] == method]
    assert len(pruned) == 1 and pruned[0]["options"] == {name: value} and pruned[0]["run_key"]

    code, out, _ = run_cli(["sweep", str(sweep), "--dry-run"], capsys)  # recorded: nothing left to run
    assert code == 0 and "todo" not in out


def test_an_unknown_option_is_refused_in_one_line_naming_the_declared_ones(capsys):
    code, _, err = run_cli(["prune", *TINY_ARGS, "--method", "ria", "--option", "alpha=1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "per_outneuron" in err
