"""Bad input over all four commands, as a demanding new user would give it: each case must end with a
non-zero exit, one line on stderr naming what to change, no traceback, nothing written and nothing
that existed modified. Then SIGTERM at random moments of a run that saves a model and a result."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from oneshot.cli import main

from helpers import TINY_ARGS, tiny_args

SMALL_ARGS = tiny_args(nsamples=2, seqlen=32, eval_samples=1)  # most cases stop before any work
SWEEP = ("models: [random:tiny-llama]\nmethods: [wanda]\nsparsities: [0.5]\n"
         "calibration: {source: wiki-offline, nsamples: 2, seqlen: 32}\neval: {ppl: [wiki-offline], samples: 1}\n")
GOOD_RECORD = {"model": "m", "method": "wanda", "pattern": "unstructured", "sparsity_target": 0.5,
               "ppl": {"wiki-offline": 12.5}, "run_key": "k1"}


def _setup(tmp: Path) -> None:
    """Files the cases point at; none of them may change."""
    (tmp / "a_file").write_text("x")
    (tmp / "full").mkdir()
    (tmp / "full" / "result.json").write_text("{}")
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "state.json").write_text("{}")
    (tmp / "empty").mkdir()
    (tmp / "data").mkdir()
    (tmp / "data" / "text.txt").write_text("Some calibration text. " * 50)
    torch.save(torch.randint(0, 100, (2, 3, 4)), tmp / "cube.pt")
    np.save(tmp / "neg.npy", -np.ones((2, 16), dtype=np.int64))
    (tmp / "notes.csv").write_text("a,b\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "no_config").mkdir()
    (tmp / "broken_config").mkdir()
    (tmp / "broken_config" / "config.json").write_text("{not json")
    (tmp / "no_tokenizer").mkdir()
    (tmp / "no_tokenizer" / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "broken_card").mkdir()
    (tmp / "broken_card" / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "broken_card" / "tokenizer.json").write_text("{}")
    (tmp / "broken_card" / "oneshot.json").write_text('{"method": "wanda", ')
    (tmp / "truncated").mkdir()
    (tmp / "truncated" / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "truncated" / "tokenizer.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(tmp / "truncated" / "model.safetensors"))
    data = (tmp / "truncated" / "model.safetensors").read_bytes()
    (tmp / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp / "dup.yaml").write_text("model: random:tiny-llama\nmethod: wanda\nmethod: sparsegpt\n")
    (tmp / "badkey.yaml").write_text("model: random:tiny-llama\ncolour: red\n")
    (tmp / "bad.yaml").write_text(SWEEP + "colour: red\n")
    (tmp / "ok.yaml").write_text(SWEEP + "results: out/r.jsonl\n")
    (tmp / "dup_sweep.yaml").write_text(SWEEP + "methods: [magnitude]\n")
    (tmp / "nanpaper.yaml").write_text(SWEEP + "paper: {table: t, source: s, ppl: {random:tiny-llama: {dense: .nan}}}\n")
    (tmp / "infpaper.yaml").write_text(SWEEP + "paper: {table: t, source: s, ppl: {random:tiny-llama: {wanda: {0.5: .inf}}}}\n")
    (tmp / "badopt.yaml").write_text(SWEEP + "options: {nope: [1]}\n")
    (tmp / "badseed.yaml").write_text(SWEEP.replace("seqlen: 32}", "seqlen: 32, seed: -1}"))
    (tmp / "badsparsity.yaml").write_text(SWEEP.replace("[0.5]", "[0.5, 1.5]"))
    (tmp / "results.jsonl").write_text(json.dumps(GOOD_RECORD) + "\n")
    (tmp / "garbage.jsonl").write_text(json.dumps(dict(GOOD_RECORD, ppl=[12.5])) + "\n"
                                       + json.dumps(dict(GOOD_RECORD, pattern="2:4x")) + "\nnot json\n")


CASES = [
    # prune: values
    (["prune", *SMALL_ARGS, "--sparsity", "1"], "a number in [0, 1)"),
    (["prune", *SMALL_ARGS, "--weights-on-disk", "--eval-tasks", "offline"], "lm-eval needs the whole model"),
    (["prune", *SMALL_ARGS, "--weights-on-disk", "--checkpoint-dir", "{tmp}/new_ckpt"], "cannot be used with --checkpoint-dir"),
    (["prune", *SMALL_ARGS, "--weights-on-disk", "--method", "magnitude", "--pattern", "layers", "--sparsity", "0.5"], "a structured --pattern"),
    (["prune", *SMALL_ARGS[2:], "--model", "smollm2-135m", "--weights-on-disk"], "only those can keep their weights on disk"),
    (["prune", *SMALL_ARGS, "--sparsity", "-0.1"], "a number in [0, 1)"),
    (["prune", *SMALL_ARGS, "--sparsity", "nan"], "a number in [0, 1)"),
    (["prune", *SMALL_ARGS, "--sparsity", "inf"], "a number in [0, 1)"),
    (["prune", *SMALL_ARGS, "--sparsity", "0.3", "--pattern", "2:4"], "leave --sparsity out"),
    (["prune", *SMALL_ARGS, "--pattern", "2:2"], "0 < N < M"),
    (["prune", *SMALL_ARGS, "--pattern", "two:four"], "N:M"),
    (["prune", *SMALL_ARGS, "--pattern", "3:7"], "multiple of 7"),
    (["prune", *SMALL_ARGS, "--method", "obs"], "unknown method 'obs'"),
    (["prune", *SMALL_ARGS, "--method", ""], "--method must be given as text"),
    (["prune", *SMALL_ARGS, "--nsamples", "0"], "--nsamples must be a positive whole number"),
    (["prune", *SMALL_ARGS, "--batch-size", "-2"], "--batch-size"),
    (["prune", *SMALL_ARGS, "--seqlen", "1"], "--seqlen"),
    (["prune", *SMALL_ARGS, "--seqlen", "100000"], "exceeds the model's"),
    (["prune", *SMALL_ARGS, "--seed", "-1"], "--seed must be a whole number from 0"),
    (["prune", *SMALL_ARGS, "--seed", "99999999999999999999999"], "--seed must be a whole number from 0"),
    (["prune", *SMALL_ARGS, "--eval-samples", "0"], "--eval-samples"),
    (["prune", *SMALL_ARGS, "--eval-limit", "0"], "--eval-limit"),
    (["prune", *SMALL_ARGS, "--eval-batch-size", "0"], "--eval-batch-size"),
    (["prune", *SMALL_ARGS, "--device", "cuda:7"], "cuda"),
    (["prune", *SMALL_ARGS, "--device", "tpu"], "unknown --device"),
    (["prune", *SMALL_ARGS, "--dtype", "float8"], "unknown --dtype"),
    (["prune", *SMALL_ARGS, "--frobnicate"], "unrecognized arguments"),
    (["prune", *SMALL_ARGS, "--option", "percdamp=-1"], "percdamp"),
    (["prune", *SMALL_ARGS, "--option", "nope=1"], "no option 'nope'"),
    (["prune", *SMALL_ARGS, "--option", "bare"], "NAME=VALUE"),
    (["prune", *SMALL_ARGS, "--allocation", "uneven"], "unknown allocation"),
    # prune: models
    (["prune", *SMALL_ARGS, "--model", ""], "--model must be given as text"),
    (["prune", *SMALL_ARGS, "--model", "random:nope"], "unknown preset"),
    (["prune", *SMALL_ARGS, "--model", "{tmp}/a_file"], "not a model directory"),
    (["prune", *SMALL_ARGS, "--model", "{tmp}/no_config"], "no config.json"),
    (["prune", *SMALL_ARGS, "--model", "{tmp}/missing.gguf"], "does not exist"),
    (["prune", *SMALL_ARGS, "--model", "{tmp}/broken_config"], "config.json is damaged"),
    (["prune", *SMALL_ARGS, "--model", "{tmp}/truncated"], "damaged or truncated"),
    # prune: data
    (["prune", *SMALL_ARGS, "--calibration", "tokens:{tmp}/cube.pt"], "2-D"),
    (["prune", *SMALL_ARGS, "--calibration", "tokens:{tmp}/neg.npy"], "negative"),
    (["prune", *SMALL_ARGS, "--calibration", "file:{tmp}/notes.csv"], ".csv"),
    (["prune", *SMALL_ARGS, "--calibration", "file:{tmp}/latin1.txt"], "line 1 is not UTF-8"),
    (["prune", *SMALL_ARGS, "--calibration", "file:{tmp}/bad.jsonl"], "line 2 is not valid JSON"),
    (["prune", *SMALL_ARGS, "--calibration", "file:{tmp}/nothing.txt"], "no such file"),
    (["prune", *SMALL_ARGS, "--calibration", "ptb"], "wiki-offline"),
    (["prune", *SMALL_ARGS, "--calibration", ""], "source"),
    (["prune", *SMALL_ARGS, "--eval-ppl", "c4"], "wiki-offline"),
    (["prune", *SMALL_ARGS, "--eval-ppl", "file:{tmp}/latin1.txt"], "not UTF-8"),
    # prune: where it writes
    (["prune", *SMALL_ARGS, "--output", "{tmp}/full"], "already exists"),
    (["prune", *SMALL_ARGS, "--output", "{tmp}/a_file"], "is a file, not a directory"),
    (["prune", *SMALL_ARGS, "--output", "{tmp}/a_file/sub"], "a_file is a file, not a directory"),
    (["prune", *SMALL_ARGS, "--output", ""], "--output must be a directory path"),
    (["prune", *SMALL_ARGS, "--save-model", "{tmp}/a_file/m"], "a_file is a file, not a directory"),
    (["prune", *SMALL_ARGS, "--save-model", ""], "--save-model must be a directory path"),
    (["prune", *SMALL_ARGS, "--output", "{tmp}/o", "--save-model", "{tmp}/o"], "different directories"),
    (["prune", *SMALL_ARGS, "--output", "{tmp}/m/o", "--save-model", "{tmp}/m"], "one inside the other"),
    (["prune", *SMALL_ARGS, "--save-model", "{tmp}/data", "--overwrite", "--calibration", "file:{tmp}/data/text.txt"],
     "which this run reads"),
    (["prune", *SMALL_ARGS, "--output", "{tmp}/data", "--overwrite", "--calibration", "file:{tmp}/data/result.json"],
     ".json"),
    (["prune", *SMALL_ARGS, "--checkpoint-dir", "{tmp}/a_file"], "is a file, not a directory"),
    (["prune", *SMALL_ARGS, "--checkpoint-dir", ""], "--checkpoint-dir must be a directory path"),
    (["prune", *SMALL_ARGS, "--resume"], "--checkpoint-dir"),
    (["prune", *SMALL_ARGS, "--checkpoint-dir", "{tmp}/ckpt"], "pass --resume"),
    (["prune", *SMALL_ARGS, "--checkpoint-dir", "{tmp}/empty", "--resume"], "no checkpoint"),
    # prune: quantisation and save formats (refused before any model is loaded)
    (["prune", *SMALL_ARGS, "--quantize", "int3"], "choose int8 or int4"),
    (["prune", *SMALL_ARGS, "--quantize", "int4", "--group-size", "48"], "does not divide the 64 inputs"),
    (["prune", *SMALL_ARGS, "--quantize", "int4", "--group-size", "0"], "--group-size must be a positive"),
    (["prune", *SMALL_ARGS, "--group-size", "32"], "add --quantize"),
    (["prune", *SMALL_ARGS, "--quantize", "int8", "--method", "wanda", "--quant-method", "joint"], "SparseGPT's sweep"),
    (["prune", *SMALL_ARGS, "--quantize", "int8", "--quant-method", "awq"], "unknown --quant-method"),
    (["prune", *SMALL_ARGS, "--quantize", "int8", "--pattern", "heads", "--method", "magnitude"], "structured"),
    (["prune", *SMALL_ARGS, "--quantize", "int8", "--checkpoint-dir", "{tmp}/ck"], "--checkpoint-dir"),
    (["prune", *SMALL_ARGS, "--format", "gguf"], "give --save-model"),
    (["prune", *SMALL_ARGS, "--format", "onnx", "--save-model", "{tmp}/m"], "unknown --format"),
    (["prune", *SMALL_ARGS, "--model", "random:tiny-opt", "--format", "gguf", "--save-model", "{tmp}/m"],
     "gguf writes the llama, mistral, qwen2, qwen3, gemma3_text families"),
    (["prune", *SMALL_ARGS, "--quantize", "int4", "--format", "gguf", "--save-model", "{tmp}/m"], "Q4_0"),
    (["prune", *SMALL_ARGS, "--format", "compressed-tensors", "--save-model", "{tmp}/m"], "stores quantised weights"),
    (["prune", *SMALL_ARGS, "--quantize", "int4", "--format", "compressed-tensors", "--save-model", "{tmp}/m"],
     "add --symmetric"),
    (["prune", *SMALL_ARGS, "--model", "random:tiny-gpt2", "--quantize", "int8", "--symmetric", "--format",
      "compressed-tensors", "--save-model", "{tmp}/m"], "nn.Linear"),
    # prune: configs
    (["prune", "--config", "{tmp}/missing.yaml"], "no such file"),
    (["prune", "--config", "{tmp}/dup.yaml"], "given twice"),
    (["prune", "--config", "{tmp}/badkey.yaml"], "unknown key 'colour'"),
    (["prune", "--config", "{tmp}/full"], "is a directory"),
    # eval
    (["eval", "--pruned", "{tmp}/missing"], "missing"),
    (["eval", "--pruned", "{tmp}/no_config"], "no config.json"),
    (["eval", "--pruned", "{tmp}/broken_card"], "oneshot.json is damaged"),
    (["eval", "--pruned", "{tmp}/truncated"], "damaged or truncated"),
    (["eval", "--pruned", "{tmp}/no_tokenizer"], "no tokenizer files"),
    (["eval", "--model", "random:tiny-llama", "--eval-ppl", "none"], "nothing to evaluate"),
    (["eval", "--model", "random:tiny-llama", "--output", "{tmp}/a_file"], "is a file"),
    (["eval", "--model", "random:tiny-llama", "--seqlen", "0"], "--seqlen"),
    (["eval", "--model", "random:tiny-llama", "--seed", "-5"], "--seed"),
    (["eval", "--model", "random:tiny-llama", "--eval-tasks", "offline"], "real tokenizer"),
    (["eval", "--model", "random:tiny-llama", "--pruned", "{tmp}/full"], "give --model or --pruned, not both"),
    # sweep
    (["sweep", "{tmp}/bad.yaml"], "unknown key 'colour'"),
    (["sweep", "{tmp}/missing.yaml"], "missing.yaml"),
    (["sweep", "{tmp}/dup_sweep.yaml"], "given twice"),
    (["sweep", "{tmp}/ok.yaml", "--results", "{tmp}/notes.csv"], "not a sweep results file"),
    (["sweep", "{tmp}/ok.yaml", "--results", "{tmp}/a_file/r.jsonl"], "a_file is a file"),
    (["sweep", "{tmp}/ok.yaml", "--results", ""], "--results must be a file path"),
    (["sweep", "{tmp}/ok.yaml", "--results", "{tmp}/full"], "is a directory"),
    (["sweep", "{tmp}/nanpaper.yaml"], "finite number"),
    (["sweep", "{tmp}/infpaper.yaml"], "finite number"),
    (["sweep", "{tmp}/badopt.yaml"], "options.nope"),
    (["sweep", "{tmp}/badseed.yaml"], "seed must be a whole number from 0"),
    (["sweep", "{tmp}/badsparsity.yaml"], "a number in [0, 1)"),
    (["sweep", "{tmp}/ok.yaml", "--executor", "dask"], "choose one of local, ray, slurm"),
    (["sweep", "{tmp}/ok.yaml", "--ray-address", "auto"], "--ray-address applies to --executor ray"),
    (["sweep", "{tmp}/ok.yaml", "--executor", "ray", "--partition", "gpu"], "--partition applies to --executor slurm"),
    (["sweep", "{tmp}/ok.yaml", "--cpus-per-run", "2"], "local runs use this process"),
    (["sweep", "{tmp}/ok.yaml", "--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be zero or more"),
    (["sweep", "{tmp}/ok.yaml", "--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be more than"),
    (["sweep", "{tmp}/ok.yaml", "--max-retries", "-1"], "--max-retries must be zero or more"),
    (["sweep", "{tmp}/ok.yaml", "--executor", "ray", "--time", "1:00"], "--time applies to --executor slurm"),
    (["sweep", "{tmp}/ok.yaml", "--executor", "slurm", "--time", "soon"], "--time 'soon'"),
    (["sweep", "{tmp}/ok.yaml", "--executor", "slurm", "--cpus-per-run", "1.5"], "whole CPUs"),
    # report
    (["report", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["report", "{tmp}/garbage.jsonl"], "line 1: ppl"),
    (["report", "{tmp}/results.jsonl", "--out", "{tmp}/a_file"], "is a file"),
    (["report", "{tmp}/results.jsonl", "--out", ""], "--out must be a directory path"),
    (["report", "{tmp}/full"], "is not a file"),
    (["report", "{tmp}/bad.yaml"], "unknown key 'colour'"),
    (["frobnicate"], "invalid choice"),
    ([], "give a command"),
]


def _snapshot(root: Path) -> dict:
    """Every path under root with its kind, mode and content digest."""
    found = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path.relative_to(root))] = (digest, stat.st_mode)
    return found


def test_the_table_is_large_and_covers_every_command():
    commands = {argv[0] if argv else "" for argv, _ in CASES}
    assert len(CASES) >= 60 and {"prune", "eval", "sweep", "report"} <= commands


def _case_id(argv: list[str]) -> str:
    """The case's words, less the SMALL_ARGS every prune case starts with."""
    if argv[:1] == ["prune"] and argv[1:len(SMALL_ARGS) + 1] == SMALL_ARGS:
        argv = argv[:1] + argv[len(SMALL_ARGS) + 1:]
    return " ".join(argv)


@pytest.mark.parametrize("argv,fragment", CASES, ids=[_case_id(a) for a, _ in CASES])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(argv, fragment, tmp_path, capsys, monkeypatch):
    _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("oneshot: error:")]
    assert code != 0, captured.err
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert _snapshot(tmp_path) == before  # nothing written, nothing that existed modified


def test_a_report_skips_malformed_lines_with_a_note(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(GOOD_RECORD) + "\n" + json.dumps(dict(GOOD_RECORD, ppl=[12.5], run_key="k2"))
                       + "\n" + json.dumps(dict(GOOD_RECORD, pattern="2:4x", run_key="k3")) + "\n")
    assert main(["report", str(results)]) == 0
    out = capsys.readouterr().out
    assert "12.50" in out and "2 line(s) of r.jsonl were skipped: line 2: ppl" in out and "line 3: pattern" in out


def test_saved_models_respect_the_umask_and_random_presets_reload(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["prune", *SMALL_ARGS, "--method", "magnitude", "--save-model", str(tmp_path / "m")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "m").iterdir())
    capsys.readouterr()
    assert main(["eval", "--pruned", str(tmp_path / "m"), "--seqlen", "32", "--eval-samples", "1", "--quiet",
                 "--output", str(tmp_path / "e")]) == 0
    again = json.loads((tmp_path / "e" / "result.json").read_text())
    assert again["method"] == "magnitude" and again["ppl"]["wiki-offline"] > 0


RUN = [sys.executable, "-m", "oneshot", "prune", *TINY_ARGS, "--method", "sparsegpt"]


def _leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("."))


@pytest.mark.system  # signals to `python -m oneshot` in fresh processes
def test_a_signal_at_any_moment_leaves_nothing_partial(tmp_path):
    """Signals at spread-out moments of a run (startup, import, pruning, evaluation, saving): each
    either finishes whole or stops with one line, exit 143/130, no traceback, and no partial file."""
    start = time.perf_counter()
    subprocess.run(RUN + ["--save-model", str(tmp_path / "whole_m"), "--output", str(tmp_path / "whole_o")],
                   check=True, capture_output=True)
    duration = time.perf_counter() - start
    rng = random.Random(0)
    delays = sorted([0.05] + [rng.uniform(0.2, duration * 1.1) for _ in range(6)])
    outcomes = []
    for i, delay in enumerate(delays):
        signum = (signal.SIGTERM, signal.SIGINT)[i % 2]
        model, output = tmp_path / f"m{i}", tmp_path / f"o{i}"
        proc = subprocess.Popen(RUN + ["--save-model", str(model), "--output", str(output)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        err = err.decode()
        assert _leftovers(tmp_path) == [], _leftovers(tmp_path)  # no hidden temporary model or file
        if "<frozen site>" in err:  # Python itself was still starting (site-packages): no code of ours ran
            assert not model.exists() and not output.exists()
            outcomes.append("python starting")
            continue
        assert "Traceback" not in err, err
        if proc.returncode == 0:
            outcomes.append("finished")
            assert (output / "result.json").is_file() and (model / "oneshot.json").is_file()
            continue
        expected = 143 if signum == signal.SIGTERM else 130
        assert proc.returncode in (expected, -signum), (proc.returncode, err)
        if proc.returncode == expected:
            assert err.strip().splitlines()[-1].startswith("oneshot: "), err
        assert not output.exists() or (output / "result.json").is_file()
        if model.exists():  # saved whole before the signal: every file of the checkpoint is there
            assert {"config.json", "model.safetensors", "oneshot.json"} <= {p.name for p in model.iterdir()}
        outcomes.append(f"stopped {proc.returncode}")
    assert any(o.startswith("stopped") for o in outcomes), outcomes
