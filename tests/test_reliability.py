"""Faults: a killed run resumes to the same model, outputs are atomic, and numerics never fail silently."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from oneshot.checkpoint import Checkpoint, CheckpointError
from oneshot.cli import main
from oneshot.engine import prune_model
from oneshot.methods import NumericsError, get_method, parse_pattern
from oneshot.models import build_random_model, decoder_blocks

from helpers import TINY_ARGS, random_ids, run_cli

PRESET = "tiny-gemma3"  # three blocks with mixed sliding/full attention
SETUP = dict(preset=PRESET, model_seed=5, n=6, seqlen=32, ids_seed=1)


def _setup():
    model = build_random_model(PRESET, torch.float32, seed=SETUP["model_seed"])
    return model, random_ids(SETUP["n"], SETUP["seqlen"], seed=SETUP["ids_seed"])


RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from oneshot.checkpoint import Checkpoint
    from oneshot.engine import prune_model
    from oneshot.methods import get_method, parse_pattern
    from oneshot.models import build_random_model
    model = build_random_model({preset!r}, torch.float32, seed={model_seed})  # what _setup() builds
    ids = torch.randint(3, 512, ({n}, {seqlen}), generator=torch.Generator().manual_seed({ids_seed}))
    kill_after = int(sys.argv[2])
    def done(index):
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    prune_model(model, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), ids, batch_size=4,
                progress=False, checkpoint=Checkpoint(sys.argv[1], {{"model": "test"}}), on_block_done=done)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], "final.pt"))
""")


@pytest.mark.system  # SIGKILL to a fresh Python process
@pytest.mark.parametrize("kill_after", [0, 1])
def test_killed_run_resumes_to_the_same_model(tmp_path, kill_after):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(**SETUP))
    ckpt = tmp_path / "ckpt"
    killed = subprocess.run([sys.executable, str(script), str(ckpt), str(kill_after)], capture_output=True)
    assert killed.returncode == -9  # SIGKILL, after block `kill_after` was checkpointed
    assert json.loads((ckpt / "state.json").read_text())["next_block"] == kill_after + 1
    resumed = subprocess.run([sys.executable, str(script), str(ckpt), "-1"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    resumed_state = torch.load(ckpt / "final.pt")

    model, ids = _setup()
    prune_model(model, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), ids, batch_size=4, progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed_state[name]), name  # bitwise on CPU
    assert not list(ckpt.glob(".*.tmp"))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    model, ids = _setup()
    prune_model(model, get_method("wanda"), 0.5, parse_pattern("unstructured"), ids, progress=False,
                checkpoint=Checkpoint(tmp_path, {"model": "test"}))
    model, ids = _setup()
    with pytest.raises(CheckpointError, match="sparsity"):
        prune_model(model, get_method("wanda"), 0.6, parse_pattern("unstructured"), ids, progress=False,
                    checkpoint=Checkpoint(tmp_path, {"model": "test"}))


def test_resuming_a_finished_checkpoint_redoes_nothing(tmp_path):
    model, ids = _setup()
    first = prune_model(model, get_method("wanda"), 0.5, parse_pattern("2:4"), ids, progress=False,
                        checkpoint=Checkpoint(tmp_path, {"model": "test"}))
    fresh, ids = _setup()
    calls = []
    again = prune_model(fresh, get_method("wanda"), 0.5, parse_pattern("2:4"), ids, progress=False,
                        checkpoint=Checkpoint(tmp_path, {"model": "test"}), on_block_done=calls.append)
    assert calls == [] and again.layer_sparsity == first.layer_sparsity
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_nan_weights_are_reported_with_block_and_layer():
    model, ids = _setup()
    decoder_blocks(model)[1].self_attn.v_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(NumericsError, match=r"block 1, layer self_attn.o_proj"):
        prune_model(model, get_method("wanda"), 0.5, parse_pattern("unstructured"), ids, progress=False)


def test_nan_inputs_are_caught_before_pruning():
    model, ids = _setup()
    model.get_input_embeddings().weight.data[:] = float("inf")
    with pytest.raises(NumericsError, match="inputs of block 0"):
        prune_model(model, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), ids, progress=False)


def test_indefinite_hessian_escalates_damping_and_is_recorded(monkeypatch):
    """Force every Hessian indefinite: the run completes, warns, and notes the damping per layer."""
    from oneshot.methods import statistics

    real_value = statistics.Hessian.value

    def indefinite(self):  # shift the spectrum down by more than the default 1% damping adds back
        h = real_value(self)
        shift = float(torch.linalg.eigvalsh(h).min()) + 0.05 * float(h.diagonal().mean())
        return h - shift * torch.eye(h.shape[0])

    monkeypatch.setattr(statistics.Hessian, "value", indefinite)
    model, ids = _setup()
    with pytest.warns(UserWarning, match="damping"):
        report = prune_model(model, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), ids, progress=False)
    assert report.layer_info and all(note["percdamp"] > 0.01 for note in report.layer_info.values())
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


# ---- the command line ------------------------------------------------------------------------

def test_cli_checkpoint_resume_gives_the_same_result(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = ["prune", *TINY_ARGS, "--method", "sparsegpt", "--checkpoint-dir", str(ckpt)]
    assert run_cli([*args, "--output", str(tmp_path / "a")], capsys)[0] == 0
    code, _, err = run_cli([*args, "--output", str(tmp_path / "b")], capsys)
    assert code == 2 and "pass --resume" in err
    assert run_cli([*args, "--resume", "--output", str(tmp_path / "b")], capsys)[0] == 0
    first = json.loads((tmp_path / "a" / "result.json").read_text())
    again = json.loads((tmp_path / "b" / "result.json").read_text())
    assert first["sparsity_per_layer"] == again["sparsity_per_layer"] and first["ppl"] == again["ppl"]
    code, _, err = run_cli(["prune", *TINY_ARGS, "--method", "wanda", "--checkpoint-dir", str(ckpt), "--resume"],
                           capsys)
    assert code == 1 and "belongs to another run" in err  # a different method's checkpoint


def test_failed_save_leaves_no_partial_model(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def broken_save(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(OSError):
        main(["prune", *TINY_ARGS, "--method", "magnitude", "--save-model", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_interrupted_json_write_keeps_the_old_file(tmp_path, monkeypatch):
    from oneshot import atomic

    target = tmp_path / "result.json"
    target.write_text('{"old": true}')

    def interrupted(_fd):  # the new content is written but not yet renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(target, b'{"new": true}')
    assert json.loads(target.read_text()) == {"old": True} and list(tmp_path.iterdir()) == [target]


def test_interrupted_write_removes_the_folders_it_created(tmp_path, monkeypatch):
    """A signal between creating the output folder and the rename leaves no empty folder behind."""
    from oneshot import atomic

    (tmp_path / "kept").mkdir()
    monkeypatch.setattr(atomic.os, "fsync", lambda _fd: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(tmp_path / "out" / "nested" / "result.json", b"{}")
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(tmp_path / "kept" / "result.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def _fork(child) -> int:
    """Fork; the child runs `child()` and exits 0, or 1 if it raised; never returns to pytest."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_status(pid: int, within: float):
    """The child's wait status once it has ended, or None if it is still running after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped already
            return 0
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def test_a_forked_child_of_the_cli_ends_at_sigterm_as_the_kernel_ends_it():
    """lm-eval's bootstrap Pool forks workers and ends them with SIGTERM. With the CLI's Python handler
    inherited, a worker could miss it and hang the run (benchmarks/pool_terminate.py reproduces it)."""
    from oneshot.cli import _interrupted

    lock = multiprocessing.Lock()
    lock.acquire()
    read, write = os.pipe()

    def wait_on_the_lock():
        os.write(write, b"default" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else b"python!")
        lock.acquire()  # a pool worker's wait for its next task; the parent holds the lock

    def handler_still_set():  # as when the signal comes before the at-fork reset has run
        signal.signal(signal.SIGTERM, _interrupted)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {signum: signal.signal(signum, _interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        waiting = _fork(wait_on_the_lock)
        handled = _fork(handler_still_set)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    try:
        assert os.read(read, 7) == b"default"
        os.kill(waiting, signal.SIGTERM)
        for pid in (waiting, handled):
            status = _exit_status(pid, within=60)
            assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        for pid in (waiting, handled):  # none left behind, whatever failed
            if _exit_status(pid, within=0) is None:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def test_run_too_large_for_memory_stops_before_any_work(tmp_path, capsys):
    code, _, err = run_cli(["prune", "--model", "random:tiny-llama", "--nsamples", "2000000", "--seqlen", "256",
                            "--quiet", "--output", str(tmp_path / "o")], capsys)
    assert code == 1 and "lower --nsamples or --seqlen" in err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_an_existing_output(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "result.json").write_text("{}")
    code, _, _ = run_cli(["prune", *TINY_ARGS, "--method", "magnitude", "--output", str(tmp_path / "o"),
                          "--overwrite"], capsys)
    assert code == 0 and json.loads((tmp_path / "o" / "result.json").read_text())["method"] == "magnitude"


def _files(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "result.json").write_text("{}")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.json").write_text("{}")
    torch.save(torch.randint(0, 100, (2, 3, 4)), tmp_path / "cube.pt")
    torch.save(torch.randint(0, 100, (2, 16)), tmp_path / "short.pt")
    np.save(tmp_path / "neg.npy", -np.ones((2, 16), dtype=np.int64))
    (tmp_path / "bad.yaml").write_text("models: [random:tiny-llama]\nmethods: [wanda]\nsparsities: [0.5]\ncolour: red\n")
    (tmp_path / "notes.csv").write_text("a,b\n")


BAD_INVOCATIONS = [
    (["prune", "--sparsity", "1"], "a number in [0, 1)"),
    (["prune", "--sparsity", "nan"], "a number in [0, 1)"),
    (["prune", "--pattern", "2:2"], "0 < N < M"),
    (["prune", "--pattern", "two:four"], "N:M"),
    (["prune", "--pattern", "3:7"], "multiple of 7"),
    (["prune", "--method", "random"], "unknown method"),
    (["prune", "--model", "random:nope"], "unknown preset"),
    (["prune", "--model", "{tmp}/a_file"], "not a model directory"),
    (["prune", "--model", "{tmp}/missing.gguf"], "does not exist"),
    (["prune", "--calibration", "tokens:{tmp}/cube.pt"], "2-D"),
    (["prune", "--calibration", "tokens:{tmp}/short.pt", "--seqlen", "64"], "--seqlen"),
    (["prune", "--calibration", "tokens:{tmp}/neg.npy"], "negative"),
    (["prune", "--calibration", "file:{tmp}/notes.csv"], ".csv"),
    (["prune", "--calibration", "ptb"], "wiki-offline"),
    (["prune", "--eval-ppl", "c4"], "wiki-offline"),
    (["prune", "--eval-samples", "0"], "--eval-samples"),
    (["prune", "--batch-size", "-2"], "--batch-size"),
    (["prune", "--seqlen", "1"], "--seqlen"),
    (["prune", "--device", "cuda:7"], "cuda"),
    (["prune", "--output", "{tmp}/full"], "already exists"),
    (["prune", "--output", "{tmp}/a_file"], "not a directory"),
    (["prune", "--output", "{tmp}/o", "--save-model", "{tmp}/o"], "different directories"),
    (["prune", "--resume"], "--checkpoint-dir"),
    (["prune", "--checkpoint-dir", "{tmp}/ckpt"], "pass --resume"),
    (["prune", "--checkpoint-dir", "{tmp}/empty", "--resume"], "no checkpoint"),
    (["prune", "--model", "smollm2-135m", "--eval-tasks", "no_such_task"], "no_such_task"),
    (["eval", "--pruned", "{tmp}/missing"], "missing"),
    (["sweep", "{tmp}/bad.yaml"], "colour"),
    (["sweep", "{tmp}/missing.yaml"], "missing.yaml"),
    (["report", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,fragment", [
    pytest.param(argv, fragment, id=" ".join(argv),  # the SmolLM2 case loads its tokenizer and lm-eval's task index
                 marks=pytest.mark.system if "smollm2-135m" in argv else ())
    for argv, fragment in BAD_INVOCATIONS])
def test_bad_invocation_is_one_line_and_writes_nothing(argv, fragment, tmp_path, capsys):
    _files(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "prune":
        argv = [argv[0], *TINY_ARGS[:6], *argv[1:]] if "--model" not in argv else argv
    code, stdout, stderr = run_cli(argv, capsys)
    assert code == 2, stderr
    errors = [line for line in stderr.strip().splitlines() if line.startswith("oneshot: error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
