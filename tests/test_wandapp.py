"""Wanda++ (oneshot/methods/wandapp.py): the regional gradient against autograd by hand, Wanda's masks at
alpha = 0 without optimisation, the regional optimisation's effect and its zeros, N:M validity, runs
through oneshot.run, the CLI, run configs and sweeps, and one-line refusals. Tiny models, a few seconds."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from helpers import TINY_ARGS, TINY_SPEC, random_ids, run_cli
from oneshot import run
from oneshot.engine import capture_block_inputs, prune_model
from oneshot.engine.capture import forward_block
from oneshot.engine.stages import propagate
from oneshot.errors import UsageError
from oneshot.methods import get_method, parse_pattern, wandapp
from oneshot.methods.wandapp import (RegionalInputs, draw_orders, regional_gradients, regional_optimise, rgs_scores,
                                     wandapp_prune)
from oneshot.models import build_random_model, decoder_blocks, get_weight, prunable_layers


class TinyBlock(nn.Module):
    """A residual MLP: enough of a decoder block for the pure functions."""

    def __init__(self, width=16, hidden=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def samples(n=6, tokens=8, width=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, width, generator=g, dtype=dtype) for _ in range(n)]


# ---- the maths ----------------------------------------------------------------------------------------

def test_regional_gradient_is_the_rms_of_autograds_gradients_of_the_output_norm():
    block = TinyBlock().double()
    params = [block.fc1.weight, block.fc2.weight]
    xs = samples()
    by_hand = []
    for x in xs:  # d ||block(x)||_2 / dW, one sequence at a time, plain autograd
        block.zero_grad()
        torch.linalg.vector_norm(block(x)).backward()
        by_hand.append([p.grad.clone() for p in params])
    got = regional_gradients(block, xs, params)
    for k, p in enumerate(params):
        expected = torch.stack([g[k] for g in by_hand]).pow(2).mean(0).sqrt()
        torch.testing.assert_close(got[k], expected, rtol=1e-12, atol=1e-15)
    one = regional_gradients(block, xs[:1], params)  # one sequence: |gradient|
    torch.testing.assert_close(one[0], by_hand[0][0].abs(), rtol=1e-12, atol=1e-15)


def test_rgs_score_by_hand_and_alpha_zero_is_wanda():
    g = torch.Generator().manual_seed(0)
    w, s, grad = torch.randn(4, 8, generator=g), torch.rand(8, generator=g), torch.rand(4, 8, generator=g)
    score = rgs_scores(w, s, grad, 100.0)
    for i in range(4):
        for j in range(8):
            assert score[i, j].item() == pytest.approx(abs(w[i, j].item()) * (s[j].item() ** 0.5 + 100 * grad[i, j].item()),
                                                       rel=1e-6)
    wanda = get_method("wanda").prune(w, s, 0.5, parse_pattern("unstructured"))
    ours = wandapp_prune(w, RegionalInputs(s, grad), 0.5, parse_pattern("unstructured"), alpha=0.0)
    assert torch.equal(ours.mask, wanda.mask) and torch.equal(ours.weight, wanda.weight)
    with pytest.raises(ValueError, match="regional gradients"):
        wandapp_prune(w, s, 0.5, parse_pattern("unstructured"), alpha=100.0)  # no G: only alpha = 0 works


@pytest.mark.parametrize("update", ["kept", "all"])
def test_regional_optimisation_lowers_the_block_error_and_keeps_zeros(update):
    dense, block = TinyBlock().double(), TinyBlock().double()
    params = [block.fc1.weight, block.fc2.weight]
    masks = []
    with torch.no_grad():
        for p in params:  # half of each row pruned by magnitude
            k = p.shape[1] // 2
            mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.abs().argsort(1)[:, :k], True)
            p.masked_fill_(mask, 0)
            masks.append(mask)
    for p in block.parameters():
        p.requires_grad_(any(p is q for q in params))
    xs = samples(8)
    with torch.no_grad():
        targets = [dense(x) for x in xs]

    def error():
        with torch.no_grad():
            return sum(float((block(x) - y).pow(2).mean()) for x, y in zip(xs, targets)) / len(xs)

    before = error()
    optimiser = torch.optim.RMSprop(params, lr=1e-3)
    losses = []
    for _ in range(5):
        losses += regional_optimise(block, zip(xs, targets), params, masks, optimiser, update)
    after = error()
    assert len(losses) == 40 and after < 0.5 * before
    if update == "kept":  # every pruned weight exactly 0, throughout
        assert all(bool((p[m] == 0).all()) for p, m in zip(params, masks))
    else:  # every weight moved; the caller prunes again
        assert any(bool((p[m] != 0).any()) for p, m in zip(params, masks))


def test_sample_draws_are_seeded_and_without_replacement():
    a = draw_orders(10, 3, 4, seed=0, block=2)
    assert a == draw_orders(10, 3, 4, seed=0, block=2)
    assert a != draw_orders(10, 3, 4, seed=1, block=2) and a != draw_orders(10, 3, 4, seed=0, block=3)
    assert all(len(order) == len(set(order)) == 4 for order in a)
    assert draw_orders(3, 2, 32, seed=0, block=0)[0] and sorted(draw_orders(3, 2, 32, 0, 0)[1]) == [0, 1, 2]


# ---- through the engine -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt"])
def test_gradient_stage_matches_autograd_per_sequence_on_a_real_block(preset):
    """The stage slices each engine chunk (here 2 sequences) into sequences; by hand, each sequence is
    captured alone and its gradient taken with plain autograd."""
    model = build_random_model(preset, torch.float64)
    reference = copy.deepcopy(model)
    ids = random_ids(4, 16)
    kept = {}

    def keep(visit):
        if visit.index == 0:
            kept.update({k: v.clone() for k, v in visit.scratch[wandapp._GRADIENTS].items()})

    prune_model(model, get_method("wanda++"), 0.5, parse_pattern("unstructured"), ids, batch_size=2,
                progress=False, stages=(wandapp.regional_gradient_pass, keep, propagate))
    block = decoder_blocks(reference)[0]
    layers = prunable_layers(block)
    weights = [layer.weight for layer in layers.values()]
    squares = [torch.zeros_like(get_weight(layer)) for layer in layers.values()]
    for n in range(ids.shape[0]):
        inputs = capture_block_inputs(reference, ids[n:n + 1], torch.device("cpu"), 1, offload=False)
        with torch.enable_grad():
            out = forward_block(block, inputs.hidden[0], inputs.calls[0][0], torch.device("cpu"))
            grads = torch.autograd.grad(torch.linalg.vector_norm(out), weights)
        for total, layer, grad in zip(squares, layers.values(), grads):
            total += (grad.t() if type(layer).__name__ == "Conv1D" else grad).pow(2)
    assert set(kept) == set(layers)
    for (name, layer), total in zip(layers.items(), squares):
        torch.testing.assert_close(kept[name], (total / ids.shape[0]).sqrt(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alpha_zero_without_optimisation_gives_exactly_wandas_masks(pattern):
    wanda, ours = build_random_model("tiny-llama", torch.float32), build_random_model("tiny-llama", torch.float32)
    ids = random_ids(4, 32)
    prune_model(wanda, get_method("wanda"), 0.5, parse_pattern(pattern), ids, batch_size=2, progress=False)
    prune_model(ours, get_method("wanda++"), 0.5, parse_pattern(pattern), ids, batch_size=2, progress=False,
                options={"alpha": 0.0, "rounds": 0})
    for (name, a), b in zip(wanda.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


def block_error(dense, pruned, ids) -> float:
    """Mean squared error of block 0's output against the dense block's, on the calibration sequences."""
    inputs = capture_block_inputs(dense, ids, torch.device("cpu"), ids.shape[0], offload=False)
    with torch.no_grad():
        h, call = inputs.hidden[0], inputs.calls[0][0]
        a = forward_block(decoder_blocks(dense)[0], h, call, torch.device("cpu"))
        b = forward_block(decoder_blocks(pruned)[0], h, call, torch.device("cpu"))
    return float((a - b).pow(2).mean())


def test_regional_optimisation_in_the_engine_lowers_the_block_error_and_keeps_the_pattern():
    dense = build_random_model("tiny-llama", torch.float32)
    ids = random_ids(4, 32)
    results = {}
    for rounds in (0, 5):
        model = copy.deepcopy(dense)
        prune_model(model, get_method("wanda++"), 0.5, parse_pattern("unstructured"), ids, batch_size=2,
                    progress=False, options={"rounds": rounds, "ro_lr": 1e-4})
        results[rounds] = (block_error(dense, model, ids), model)
    assert results[5][0] < 0.8 * results[0][0]
    for layer in prunable_layers(decoder_blocks(results[5][1])[0]).values():
        zeros = (get_weight(layer) == 0).sum(1)
        assert bool((zeros == get_weight(layer).shape[1] // 2).all())  # per row, as Wanda


@pytest.mark.parametrize("pattern,update", [("2:4", "kept"), ("4:8", "all")])
def test_nm_groups_are_valid(pattern, update):
    model = build_random_model("tiny-llama", torch.bfloat16)
    nm = parse_pattern(pattern)
    report = prune_model(model, get_method("wanda++"), 0.5, nm, random_ids(4, 32), batch_size=2, progress=False,
                         options={"ro_lr": 1e-4, "ro_samples": 2, "ro_update": update})
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    for block in decoder_blocks(model):
        for layer in prunable_layers(block).values():
            weight = get_weight(layer)
            assert weight.dtype == torch.bfloat16  # cast back after the fp32 optimisation
            groups = (weight == 0).reshape(weight.shape[0], -1, nm.m).sum(-1)
            assert bool((groups >= nm.n).all())


# ---- the run API, CLI, configs and refusals ---------------------------------------------------------------

@pytest.mark.parametrize("pattern,options", [("unstructured", {}), ("2:4", {"rounds": 2, "ro_samples": 2})])
def test_run_api(pattern, options):
    record = run(replace(TINY_SPEC, method="wanda++", sparsity=0.5 if pattern == "unstructured" else None,
                         pattern=pattern, options=options))
    assert record.method == "wanda++" and record.pattern == pattern
    assert record.sparsity_measured == pytest.approx(0.5)
    assert all(s == pytest.approx(0.5) for s in record.sparsity_per_layer.values())
    assert record.options == options


@pytest.mark.parametrize("options,words", [
    ({"alpha": -1}, "alpha"), ({"rounds": 1.5}, "rounds"), ({"ro_update": "some"}, "ro_update"),
    ({"ro_lr": 0}, "ro_lr"), ({"ro_samples": 0}, "ro_samples"), ({"steps": 3}, "no option 'steps'"),
])
def test_bad_options_are_refused_in_one_line(options, words):
    with pytest.raises(UsageError) as caught:
        run(replace(TINY_SPEC, method="wanda++", options=options))
    message = str(caught.value)
    assert "\n" not in message and words in message and "wanda++" in message


def test_sequential_is_refused_in_one_line():
    with pytest.raises(UsageError) as caught:
        run(replace(TINY_SPEC, method="wanda++", sequential=True))
    assert "\n" not in str(caught.value) and "wanda++" in str(caught.value)


def test_the_name_works_in_the_cli_run_configs_and_sweeps(tmp_path, capsys):
    import json

    from oneshot.sweep.config import label, load_config, run_key

    code, stdout, _ = run_cli(["prune", *TINY_ARGS, "--method", "wanda++", "--option", "rounds=1",
                               "--option", "ro_samples=2", "--output", str(tmp_path / "o")], capsys)
    assert code == 0 and "wanda++" in stdout
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["method"] == "wanda++" and result["options"] == {"rounds": 1, "ro_samples": 2}

    config = tmp_path / "run.yaml"
    config.write_text("model: random:tiny-llama\nmethod: wanda++\noptions: {rounds: 0}\n"
                      "calibration: {nsamples: 2, seqlen: 32}\neval: {samples: 1}\n")
    code, _, _ = run_cli(["prune", "--config", str(config), "--quiet", "--output", str(tmp_path / "c")], capsys)
    assert code == 0 and json.loads((tmp_path / "c" / "result.json").read_text())["method"] == "wanda++"

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("models: [random:tiny-llama]\nmethods: [wanda, wanda++]\npatterns: [unstructured, 2:4]\n"
                     "sparsities: [0.5]\noptions: {alpha: [0, 100]}\ncalibration: {nsamples: 2, seqlen: 32}\n")
    runs = [spec for spec in load_config(sweep).runs() if spec.method == "wanda++"]
    assert len(runs) == 4 and all("wanda++" in label(spec) for spec in runs)
    assert len({run_key(spec) for spec in runs}) == 4
