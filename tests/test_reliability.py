"""Faults: a killed run resumes to the same model, outputs are atomic, and numerics never fail silently."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from oneshot.checkpoint import Checkpoint, CheckpointError
from oneshot.engine import prune_model
from oneshot.methods import NumericsError, get_method, parse_pattern
from oneshot.models import build_random_model, decoder_blocks

PRESET = "tiny-gemma3"  # three blocks with mixed sliding/full attention


def _setup():
    model = build_random_model(PRESET, torch.float32, seed=5)
    ids = torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(1))
    return model, ids


RUN = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_reliability import _setup
    from oneshot.checkpoint import Checkpoint
    from oneshot.engine import prune_model
    from oneshot.methods import get_method, parse_pattern
    model, ids = _setup()
    kill_after = int(sys.argv[2])
    def done(index):
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    prune_model(model, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), ids, batch_size=4,
                progress=False, checkpoint=Checkpoint(sys.argv[1], {{"model": "test"}}), on_block_done=done)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], "final.pt"))
""")


@pytest.mark.parametrize("kill_after", [0, 1])
def test_killed_run_resumes_to_the_same_model(tmp_path, kill_after):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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
