"""A method of the user's own, in their own package (issue 27, item 5): examples/method-plugin is installed with
pip into a folder of its own and found through the `oneshot.methods` entry-point group, in a fresh process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oneshot import Calibration, Evaluation, RunSpec, run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "method-plugin"
FLAGS = ["--model", "random:tiny-llama", "--nsamples", "4", "--seqlen", "64", "--eval-samples", "2", "--quiet"]


def test_the_docs_show_the_example_as_it_is():
    docs = (ROOT / "docs" / "methods.md").read_text()
    for name in ("wanda_power.py", "pyproject.toml"):
        assert (EXAMPLE / name).read_text().rstrip() in docs, name


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(os.environ, PYTHONPATH=str(target))


@pytest.mark.system  # pip and fresh processes
def test_an_installed_plugin_method_runs_from_the_cli_a_config_and_a_sweep(installed, tmp_path):
    out = tmp_path / "o"
    done = subprocess.run([sys.executable, "-m", "oneshot", "prune", *FLAGS, "--method", "wanda-power",
                           "--option", "a=1", "--output", str(out)], env=installed, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "result.json").read_text())
    assert record["method"] == "wanda-power" and record["options"] == {"a": 1.0}
    assert record["versions"]["oneshot-wanda-power"] == "0.1.0"  # the plugin's package, beside torch's
    wanda = run(RunSpec(model="random:tiny-llama", method="wanda", calibration=Calibration(nsamples=4, seqlen=64),
                        eval=Evaluation(samples=2), progress=False))
    assert record["ppl"] == wanda.ppl and record["sparsity_per_layer"] == wanda.sparsity_per_layer  # a = 1: Wanda
    bad = subprocess.run([sys.executable, "-m", "oneshot", "prune", *FLAGS, "--method", "wanda-power",
                          "--option", "a=9"], env=installed, capture_output=True, text=True)
    assert bad.returncode == 2 and "a=9 is not valid" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "grid.yaml").write_text("models: [random:tiny-llama]\nmethods: [wanda, wanda-power]\n"
                                        "sparsities: [0.5]\noptions: {a: [0.5, 2]}\n"
                                        "calibration: {nsamples: 4, seqlen: 64}\neval: {ppl: [wiki-offline], samples: 2}\n")
    swept = subprocess.run([sys.executable, "-m", "oneshot", "sweep", str(tmp_path / "grid.yaml")], env=installed,
                           capture_output=True, text=True)
    assert swept.returncode == 0, swept.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "grid.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["options"].get("a")) for r in records) == [
        ("dense", None), ("wanda", None), ("wanda-power", 0.5), ("wanda-power", 2.0)]
    assert "wanda-power (a=0.5)" in (tmp_path / "grid.md").read_text()


@pytest.mark.system
def test_a_broken_plugin_is_named_when_asked_for_and_breaks_nothing_else(tmp_path):
    site = tmp_path / "site"
    (site / "broken_method").mkdir(parents=True)
    (site / "broken_method" / "__init__.py").write_text("raise ImportError('no such thing')\n")
    info = site / "broken_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[oneshot.methods]\nbroken = broken_method:METHOD\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    asked = subprocess.run([sys.executable, "-m", "oneshot", "prune", *FLAGS, "--method", "broken"], env=env,
                           capture_output=True, text=True)
    assert asked.returncode == 2 and "plugin that failed to load: ImportError: no such thing" in asked.stderr
    other = subprocess.run([sys.executable, "-m", "oneshot", "prune", *FLAGS, "--method", "magnitude"], env=env,
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr[-1000:]
