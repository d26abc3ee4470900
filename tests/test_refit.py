"""Block refit (--refit): the kept weights of each pruned block fitted to its target output, the mask left as
pruned; the target with and without --asymmetric, the seeded order, the record, the checkpoint's
fingerprint and the refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import TINY_ARGS, run_cli
from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.engine import Refit, sequential_stages
from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers
from oneshot.sweep.cells import method_label


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refit")
    ids = torch.randint(3, 500, (8, 64), generator=torch.Generator().manual_seed(1))
    torch.save(ids, folder / "ids.pt")
    held_out = torch.randint(3, 500, (8, 64), generator=torch.Generator().manual_seed(2))
    base = load_model("random:tiny-llama", dtype=torch.float32, seed=0)
    with torch.no_grad():
        dense = base.model(held_out).logits
    return folder / "ids.pt", held_out, base, dense


def _pruned(data, method="sparsegpt", **settings):
    ids_path, held_out, base, dense = data
    loaded = type(base)(copy.deepcopy(base.model), base.tokenizer, base.name, base.source)
    record = run(RunSpec(model="random:tiny-llama", method=method, sparsity=0.7, calibration=Calibration(f"tokens:{ids_path}"),
                         eval=Evaluation(()), progress=False, sequential=True, device="cpu", dtype="float32",
                         **settings), loaded=loaded)
    with torch.no_grad():
        error = float((loaded.model(held_out).logits - dense).pow(2).mean())
    return loaded.model, record, error


def _weights(model, block=0):
    return {name: get_weight(layer).clone() for name, layer in prunable_layers(decoder_blocks(model)[block]).items()}


@pytest.mark.parametrize("method, asymmetric", [("sparsegpt", False), ("sparsegpt", True), ("wanda", False)])
def test_the_refit_brings_the_model_closer_to_the_dense_one_on_held_out_tokens(data, method, asymmetric):
    _, plain, before = _pruned(data, method, asymmetric=asymmetric)
    model, record, after = _pruned(data, method, asymmetric=asymmetric, refit=4, refit_lr=1e-3)
    assert after < 0.95 * before
    assert record.settings["refit"] == 4 and abs(record.sparsity_measured - plain.sparsity_measured) < 1e-9


def test_the_mask_stays_as_pruned_and_the_kept_weights_move(data):
    plain, _, _ = _pruned(data)
    refitted, _, _ = _pruned(data, refit=2, refit_lr=1e-3)
    # Block 0 reads the same inputs in both runs, so it is pruned to the same mask; the refit then moves
    # its kept weights only.
    for name, weight in _weights(plain).items():
        other = _weights(refitted)[name]
        assert torch.equal(weight == 0, other == 0), name
        assert not torch.equal(weight, other), name


def test_a_rerun_gives_the_same_weights(data):
    first, _, _ = _pruned(data, refit=1, refit_lr=1e-3)
    second, _, _ = _pruned(data, refit=1, refit_lr=1e-3)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_the_stage_name_keeps_the_refit_settings():
    (plain,) = sequential_stages()
    (refitting,) = sequential_stages(asymmetric=True, refit=Refit(3, 2e-5, 7))
    assert plain.__name__ == "sublayer_sequential"
    assert refitting.__name__ == "asymmetric_sequential+refit(epochs=3,lr=2e-05,seed=7)"
    assert sequential_stages(refit=Refit(0, 1e-5)) == (plain,)


def test_the_cli_records_it_and_a_report_row_names_it(tmp_path, capsys):
    code, _, err = run_cli(["prune", *TINY_ARGS, "--method", "sparsegpt", "--sequential", "--refit", "2",
                            "--refit-lr", "3e-5", "--output", str(tmp_path / "o")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "result.json").read_text())
    assert record["settings"]["refit"] == 2 and record["settings"]["refit_lr"] == 3e-5
    assert "--refit" in record["command"]
    assert method_label(record) == "sparsegpt (sequential, refit 2, refit lr 3e-05)"


@pytest.mark.parametrize("extra, says", [
    (["--refit", "2"], "--sequential"),
    (["--refit-lr", "1e-4"], "--refit"),
    (["--refit", "2", "--sequential", "--quantize", "int4"], "--quantize"),
    (["--refit", "-1", "--sequential"], "--refit"),
])
def test_what_it_cannot_do_is_refused_in_one_line(tmp_path, capsys, extra, says):
    code, _, err = run_cli(["prune", *TINY_ARGS, "--method", "sparsegpt", *extra, "--output", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--refit", "1"], ["--asymmetric"], ["--refit", "1", "--asymmetric"]])
def test_a_mixture_of_experts_model_is_refused_in_one_line_before_loading(tmp_path, capsys, extra):
    args = [a if a != "random:tiny-llama" else "random:tiny-mixtral" for a in TINY_ARGS]
    code, _, err = run_cli(["prune", *args, "--method", "sparsegpt", "--sequential", *extra,
                            "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and "experts" in err and "model.layers.0.mlp" in err, err
    assert not (tmp_path / "o").exists()
