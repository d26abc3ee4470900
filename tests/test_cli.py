"""The `oneshot prune` command: outputs, saved models, and one-line errors for bad input."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import TINY_ARGS, run_cli


def test_prune_writes_result_and_loadable_model(tmp_path, capsys):
    out, saved = tmp_path / "run", tmp_path / "model"
    code, stdout, _ = run_cli(["prune", *TINY_ARGS, "--method", "sparsegpt", "--pattern", "2:4",
                               "--output", str(out), "--save-model", str(saved)], capsys)
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("model", "method", "pattern", "sparsity_target", "sparsity_measured", "sparsity_per_layer", "ppl",
                "calibration", "timings", "peak_memory_gib", "device", "dtype", "versions"):
        assert key in result, key
    assert result["pattern"] == "2:4" and result["sparsity_target"] == 0.5
    assert result["sparsity_measured"] == pytest.approx(0.5)
    assert set(result["timings"]) >= {"load_s", "prune_s", "eval_s"}
    assert result["calibration"] == {"source": "wiki-offline", "nsamples": 4, "seqlen": 64, "seed": 0}
    assert np.isfinite(result["ppl"]["wiki-offline"])
    assert "sparsegpt" in stdout and "2:4" in stdout  # the printed table

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    zeros = sum(int((p == 0).sum()) for n, p in reloaded.named_parameters() if "proj" in n)
    total = sum(p.numel() for n, p in reloaded.named_parameters() if "proj" in n)
    assert zeros / total == pytest.approx(0.5)
    lineage = json.loads((saved / "oneshot.json").read_text())
    assert lineage["method"] == "sparsegpt" and lineage["calibration"]["seed"] == 0
    assert "sparsegpt" in (saved / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_dense_evaluates_without_pruning(tmp_path, capsys):
    code, stdout, _ = run_cli(["prune", *TINY_ARGS, "--method", "dense", "--output", str(tmp_path / "d")], capsys)
    assert code == 0
    result = json.loads((tmp_path / "d" / "result.json").read_text())
    assert result["sparsity_measured"] < 0.01 and result["calibration"] is None


def test_tokens_source_is_used_as_is(tmp_path, capsys):
    calib = torch.randint(3, 256, (3, 32))
    torch.save(calib, tmp_path / "c.pt")
    np.save(tmp_path / "e.npy", torch.randint(3, 256, (2, 32)).numpy())
    code, _, _ = run_cli(["prune", "--model", "random:tiny-opt", "--method", "wanda", "--quiet",
                          "--calibration", f"tokens:{tmp_path / 'c.pt'}", "--eval-ppl",
                          f"tokens:{tmp_path / 'e.npy'}", "--output", str(tmp_path / "o")], capsys)
    assert code == 0
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["calibration"]["nsamples"] == 3 and result["calibration"]["seqlen"] == 32
    assert result["eval"]["windows"][f"tokens:{tmp_path / 'e.npy'}"] == [2, 32]


def _bad_tokens(tmp_path):
    torch.save(torch.randint(0, 100, (64,)), tmp_path / "flat.pt")
    torch.save(torch.rand(2, 16), tmp_path / "float.pt")


BAD = [
    (["--sparsity", "1.0"], "a number in [0, 1)"),
    (["--sparsity", "-0.1"], "a number in [0, 1)"),
    (["--pattern", "2x4"], "N:M"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--pattern", "3:5"], "multiple of 5"),  # tiny-llama's widths are 64 and 128
    (["--pattern", "2:4", "--sparsity", "0.7"], "conflicts with pattern 2:4"),
    (["--method", "obs"], "unknown method"),
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "random:llama-99b"], "unknown preset"),
    (["--model", "some-org/some-model"], "unreachable"),
    (["--calibration", "tokens:{tmp}/flat.pt"], "2-D"),
    (["--calibration", "tokens:{tmp}/float.pt"], "integer"),
    (["--calibration", "tokens:{tmp}/missing.pt"], "no such file"),
    (["--calibration", "c4"], "wiki-offline"),
    (["--eval-ppl", "wikitext2"], "wiki-offline"),
    (["--calibration", "mystery"], "unknown"),
    (["--nsamples", "0"], "--nsamples"),
    (["--seqlen", "100000"], "--seqlen"),
    (["--device", "tpu"], "unknown --device"),
    (["--dtype", "float8"], "unknown --dtype"),
    (["--nsamples", "many"], "invalid int"),
]


@pytest.mark.parametrize("extra,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(extra, fragment, tmp_path, capsys):
    _bad_tokens(tmp_path)
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out = tmp_path / "out"
    started = time.perf_counter()
    code, stdout, stderr = run_cli(["prune", *TINY_ARGS, "--method", "wanda", *extra, "--output", str(out)], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()  # progress lines ("loading ...") may come first
    errors = [line for line in lines if line.startswith("oneshot: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert fragment in errors[0]
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()
    assert time.perf_counter() - started < 60  # offline Hub sources must not hang on retries


def test_existing_output_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")
    code, _, stderr = run_cli(["prune", *TINY_ARGS, "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "already exists" in stderr
    assert (tmp_path / "out" / "result.json").read_text() == "{}"


def test_command_line_errors_have_no_traceback(tmp_path):
    """The real console entry point, in a fresh process: one line, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "oneshot", "prune", "--model", "random:tiny-gpt2",
                           "--sparsity", "2", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "a number in [0, 1)" in proc.stderr and not (tmp_path / "o").exists()


def test_versions_name_the_source_commit_of_a_checkout():
    """Records from a git checkout carry its commit, so a number can be traced to the exact code."""
    import subprocess
    from pathlib import Path

    from oneshot.record import versions

    root = Path(__file__).resolve().parent.parent
    found = versions()
    assert found["oneshot"] and found["torch"]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert found["oneshot_commit"].split("+")[0] == head
