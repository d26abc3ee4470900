"""Asymmetric calibration (--asymmetric): the target weight's maths, the engine's dense stream, the record,
and the refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import TINY_ARGS, run_cli
from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.methods.statistics import InputGap, Hessian, asymmetric_weight
from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers


def _inputs(seed=0, tokens=256, features=16):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(2, tokens // 2, features, generator=g, dtype=torch.float64)
    pruned = dense + 0.3 * torch.randn(dense.shape, generator=g, dtype=torch.float64)
    weight = torch.randn(8, features, generator=g, dtype=torch.float64)
    hessian, cross = Hessian(features, "cpu", torch.float64), InputGap(features, "cpu", torch.float64)
    hessian.add(pruned, 2)
    cross.add(dense, pruned, 2)
    return weight, dense.reshape(-1, features).t(), pruned.reshape(-1, features).t(), hessian.value(), cross.value()


def test_the_target_is_the_least_squares_fit_of_the_dense_output():
    weight, dense, pruned, hessian, cross = _inputs()
    target = asymmetric_weight(weight, hessian, cross, percdamp=0.0)
    expected = torch.linalg.lstsq(pruned.t(), (weight @ dense).t()).solution.t()  # argmin ||W Xd - V X||
    torch.testing.assert_close(target, expected, rtol=1e-9, atol=1e-9)


def test_the_objective_splits_into_the_fit_and_the_methods_own_term():
    weight, dense, pruned, hessian, cross = _inputs(1)
    target = asymmetric_weight(weight, hessian, cross, percdamp=0.0)
    other = target * (torch.rand(target.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) > 0.5)
    n = 2  # sequences: H and C are (2/N) sums
    whole = (weight @ dense - other @ pruned).pow(2).sum() * 2 / n
    fit = (weight @ dense - target @ pruned).pow(2).sum() * 2 / n
    own = torch.trace((target - other) @ hessian @ (target - other).t())
    torch.testing.assert_close(whole, fit + own, rtol=1e-9, atol=1e-9)


def test_the_same_inputs_leave_the_weight_as_it_is():
    weight, _, pruned, hessian, _ = _inputs(3)
    same = InputGap(pruned.shape[0], "cpu", torch.float64)
    same.add(pruned.t()[None], pruned.t()[None], 1)
    h = Hessian(pruned.shape[0], "cpu", torch.float64)
    h.add(pruned.t()[None], 1)
    assert torch.equal(asymmetric_weight(weight, h.value(), same.value()), weight)


def _pruned(base, method, sparsity, asymmetric, ids_path):
    loaded = type(base)(copy.deepcopy(base.model), base.tokenizer, base.name, base.source)
    record = run(RunSpec(model="random:tiny-llama", method=method, sparsity=sparsity,
                         calibration=Calibration(f"tokens:{ids_path}"), eval=Evaluation(()), progress=False,
                         sequential=True, asymmetric=asymmetric, device="cpu", dtype="float32"), loaded=loaded)
    return loaded.model, record


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "alps"])
def test_the_pruned_model_is_closer_to_the_dense_one(tmp_path, method):
    ids = torch.randint(3, 500, (8, 64), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    base = load_model("random:tiny-llama", dtype=torch.float32, seed=0)
    with torch.no_grad():
        dense = base.model(ids).logits
    errors, models = {}, {}
    for asymmetric in (False, True):
        models[asymmetric], record = _pruned(base, method, 0.7, asymmetric, tmp_path / "ids.pt")
        assert record.asymmetric is asymmetric and abs(record.sparsity_measured - 0.7) < 0.01
        with torch.no_grad():
            errors[asymmetric] = float((models[asymmetric](ids).logits - dense).pow(2).mean())
    assert errors[True] < 0.95 * errors[False]
    # Block 0's first group (q/k/v) reads the same inputs in both models, so it is pruned exactly as without
    # the option; every later group reconstructs another target.
    layers = [(name, a, b) for name, a, b in zip(prunable_layers(decoder_blocks(models[False])[0]),
                                                 prunable_layers(decoder_blocks(models[False])[0]).values(),
                                                 prunable_layers(decoder_blocks(models[True])[0]).values())]
    for name, a, b in layers:
        same = torch.equal(get_weight(a), get_weight(b))
        assert same == (name.split(".")[-1] in ("q_proj", "k_proj", "v_proj")), name


def test_the_cli_records_it(tmp_path, capsys):
    code, _, err = run_cli(["prune", *TINY_ARGS, "--method", "sparsegpt", "--sequential", "--asymmetric", "--output",
                            str(tmp_path / "o")], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "o" / "result.json").read_text())
    assert record["asymmetric"] is True and "--asymmetric" in record["command"]


@pytest.mark.parametrize("extra, says", [
    (["--method", "wanda", "--sequential"], "sparsegpt, admm, alps"),
    (["--method", "sparsegpt"], "--sequential"),
    (["--method", "sparsegpt", "--sequential", "--checkpoint-dir", "CKPT"], "--checkpoint-dir"),
    (["--method", "block-influence", "--pattern", "layers", "--sparsity", "0.2"], "structured"),
])
def test_what_it_cannot_do_is_refused_in_one_line(tmp_path, capsys, extra, says):
    extra = [str(tmp_path / "ckpt") if e == "CKPT" else e for e in extra]
    code, _, err = run_cli(["prune", *TINY_ARGS, "--asymmetric", *extra, "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and err.count("\n") == 1 and says in err and "--asymmetric" in err
    assert not (tmp_path / "o").exists()
