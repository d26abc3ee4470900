"""Mixture-of-experts models: every expert pruned as its own layers, routers untouched, honest sparsity."""
import dataclasses
import logging

import pytest
import torch
from torch import nn

from oneshot import RunSpec, run
from oneshot.engine import measure_coverage, prune_model, stream_statistics
from oneshot.engine.stages import NO_TOKENS_NOTE
from oneshot.methods import ActSqNorm, Hessian, get_method, magnitude_prune, parse_pattern
from oneshot.models import (TINY_MOE_PRESETS, TINY_PRESETS, ExpertProjection, block_weight_roles, build_random_model,
                            decoder_blocks, get_weight, load_model, prunable_layers)
from oneshot.spec import Calibration, Evaluation

from helpers import random_ids

MOE = sorted(TINY_MOE_PRESETS)
CALIBRATION, NO_PPL = Calibration(nsamples=4, seqlen=32), Evaluation(ppl=())


def _fused_experts(model):
    """(block index, qualified name, module) of every fused experts module."""
    return [(i, name, m) for i, block in enumerate(decoder_blocks(model)) for name, m in block.named_modules()
            if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts")]


def _expert_weights(module, e):
    """Expert e's [outputs, inputs] weights, read straight from the fused tensors (these families store
    gate_up_proj as [gate; up] rows, not transposed)."""
    gate, up = module.gate_up_proj[e].chunk(2, dim=0)
    return {"gate_proj": gate, "up_proj": up, "down_proj": module.down_proj[e]}


def _router_weights(model):
    """The routers, named independently of the adapter: each MoE block's `mlp.gate`, and Qwen2-MoE's
    one-row `mlp.shared_expert_gate`."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))}


@pytest.mark.parametrize("preset", MOE)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_expert_is_pruned_to_the_target_and_routers_are_untouched(preset, method):
    model = build_random_model(preset, torch.float32)
    routers = _router_weights(model)
    assert routers  # every MoE preset has a router per MoE block
    report = prune_model(model, get_method(method), 0.5, parse_pattern("unstructured"), random_ids(6, 16), batch_size=4,
                         progress=False)
    experts = _fused_experts(model)
    assert experts
    for index, name, module in experts:
        for e in range(module.num_experts):
            for projection, weight in _expert_weights(module, e).items():
                key = f"{index}.{name}.{e}.{projection}"
                assert key in report.layer_sparsity, key
                rows, cols = weight.shape
                zeros = int((weight == 0).sum())
                if method == "wanda":  # floor(cols * p) per output row
                    assert bool(((weight == 0).sum(1) == cols // 2).all()), key
                else:  # one inclusive threshold over the matrix (SparseGPT: one block, as cols <= 128)
                    assert zeros == rows * cols // 2 + 1, key
                assert report.layer_sparsity[key] == zeros / weight.numel()
    for key, after in _router_weights(model).items():
        assert torch.equal(after, routers[key]), key  # bitwise
    assert not any(key.endswith(("mlp.gate", "shared_expert_gate")) for key in report.layer_sparsity)
    roles = {role for block in decoder_blocks(model) for _, role in block_weight_roles(block).values()}
    assert roles == {"pruned", "router"}
    assert not report.layer_info  # every expert received tokens here: no fallback notes


@pytest.mark.parametrize("preset", MOE)
def test_an_experts_statistic_comes_from_exactly_the_tokens_routed_to_it(preset):
    """The engine's per-expert statistics equal a hand-written loop over a whole-model forward."""
    model = build_random_model(preset, torch.float64)
    ids = random_ids(6, 16)
    seen = {}
    handles = [module.register_forward_pre_hook(
        lambda m, args, key=(index, name): seen.__setitem__(key, (args[0], args[1])))
        for index, name, module in _fused_experts(model)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()

    n = ids.shape[0]
    engine = {}
    for statistic in (ActSqNorm, Hessian):  # batch 4 over 6 sequences: ragged chunks
        for index, _layers, values in stream_statistics(model, statistic, ids, batch_size=4, progress=False):
            engine.update({(statistic, f"{index}.{name}"): value for name, value in values.items()})
    for index, name, module in _fused_experts(model):
        hidden, top_k_index = seen[(index, name)]
        for e in range(module.num_experts):
            routed = (top_k_index == e).any(dim=-1)
            x = hidden[routed]  # the tokens the router sent to expert e
            gate, up = (x @ module.gate_up_proj[e].t()).chunk(2, dim=-1)
            h = module.act_fn(gate) * up  # what down_proj reads
            for projection, inputs in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
                key = f"{index}.{name}.{e}.{projection}"
                torch.testing.assert_close(engine[(ActSqNorm, key)], (inputs ** 2).sum(0) / n, rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(engine[(Hessian, key)], 2 * inputs.t() @ inputs / n, rtol=1e-9,
                                           atol=1e-12)


def _gpt_oss():
    """A tiny gpt-oss: experts stored transposed, gate and up rows interleaved, with biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_oss", vocab_size=512, hidden_size=64, intermediate_size=32, head_dim=16,
                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                  sliding_window=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe", "gpt-oss"])
def test_expert_by_expert_layers_compute_what_the_fused_kernel_computes(preset):
    """The per-expert layers read (and, after pruning, write) exactly their expert's rows of the fused
    tensors, whatever the layout: the expert-by-expert forward equals transformers' own, before and after."""
    from oneshot.models import routed_through_projections

    model = _gpt_oss() if preset == "gpt-oss" else build_random_model(preset, torch.float32)
    hidden = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    index = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))[:2] for i in range(40)])
    weights = torch.rand(40, 2, generator=torch.Generator().manual_seed(2))

    def compare():
        for block in decoder_blocks(model):
            experts = block.mlp.experts
            with torch.no_grad():
                fused = experts(hidden, index, weights)
                with routed_through_projections(prunable_layers(block).values()):
                    routed = experts(hidden, index, weights)
            torch.testing.assert_close(routed, fused, rtol=1e-5, atol=1e-6)

    compare()
    prune_model(model, get_method("wanda"), 0.5, parse_pattern("2:4"), random_ids(6, 16), batch_size=4, progress=False)
    compare()
    for block in decoder_blocks(model):
        layers = [layer for layer in prunable_layers(block).values() if isinstance(layer, ExpertProjection)]
        assert len(layers) == 3 * block.mlp.experts.num_experts
        fused = block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj
        assert sum(int((get_weight(layer) == 0).sum()) for layer in layers) == sum(int((p == 0).sum()) for p in fused)
        assert sum(int((p == 0).sum()) for p in fused) == sum(p.numel() for p in fused) // 2


def _never_choose(model, expert):
    """Make every router avoid `expert`: its slot goes to the lowest expert the token has not chosen."""
    def hook(_module, _args, output):
        logits, weights, index = output
        index = index.clone()
        for slot in range(index.shape[1]):
            taken = torch.cat([index[:, :slot], index[:, slot + 1:]], dim=1)
            substitute = torch.zeros_like(index[:, slot])
            while bool((clash := (taken == substitute[:, None]).any(dim=1)).any()):
                substitute[clash] += 1
            index[:, slot] = torch.where(index[:, slot] == expert, substitute, index[:, slot])
        return logits, weights, index

    return [block.mlp.gate.register_forward_hook(hook) for block in decoder_blocks(model)]


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_an_expert_that_receives_no_tokens_is_pruned_by_magnitude_and_noted(method, pattern):
    model = build_random_model("tiny-mixtral", torch.float32)
    handles = _never_choose(model, expert=7)
    originals = {i: {k: w.clone() for k, w in _expert_weights(m, 7).items()} for i, _, m in _fused_experts(model)}
    pattern, base = parse_pattern(pattern), get_method(method)
    created = []

    class Counting(base.statistic):
        def __init__(self, *args):
            super().__init__(*args)
            created.append(self)

    method = dataclasses.replace(base, statistic=Counting)
    report = prune_model(model, method, 0.5, pattern, random_ids(6, 16), batch_size=4, progress=False)
    for handle in handles:
        handle.remove()
    # Every accumulator, the unused expert's included, counts all 6 sequences (N is the calibration set's).
    assert all(stat.sequences == 6 for stat in created)
    assert sorted(stat.tokens for stat in created).count(0) == 2 * len(_fused_experts(model))
    for index, name, module in _fused_experts(model):
        for projection, weight in _expert_weights(module, 7).items():
            key = f"{index}.{name}.7.{projection}"
            assert report.layer_info[key] == NO_TOKENS_NOTE
            expected = magnitude_prune(originals[index][projection], 0.5, pattern).weight
            assert torch.equal(weight, expected), key
    assert all(".7." in key for key in report.layer_info)  # the experts that got tokens use the method


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-deepseek-v3"])
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "4:8"), ("magnitude", "2:4")])
def test_n_m_holds_in_every_group_of_every_expert(preset, method, pattern):
    model = build_random_model(preset, torch.float32)
    pattern = parse_pattern(pattern)
    report = prune_model(model, get_method(method), 0.5, pattern, random_ids(6, 16), batch_size=4, progress=False)
    checked = 0
    for block in decoder_blocks(model):
        for name, layer in prunable_layers(block).items():
            weight = get_weight(layer)
            groups = (weight == 0).reshape(weight.shape[0], -1, pattern.m).sum(-1)  # along the inputs
            assert bool((groups == pattern.n).all()), name
            checked += isinstance(layer, ExpertProjection)
    assert checked == sum(3 * m.num_experts for _, _, m in _fused_experts(model))
    assert report.sparsity == 0.5


def _counted(model):
    """(zeros, numel) over every >= 2-D non-bias parameter inside the blocks, and over all parameters."""
    blocks = tuple(f"model.layers.{i}." for i in range(len(decoder_blocks(model))))
    block = [p for n, p in model.named_parameters() if n.startswith(blocks) and p.dim() >= 2 and not n.endswith("bias")]
    every = list(model.parameters())
    count = lambda ps: (sum(int((p == 0).sum()) for p in ps), sum(p.numel() for p in ps))  # noqa: E731
    return count(block), count(every)


def test_run_reports_sparsity_over_all_block_weights_and_the_whole_model(tmp_path):
    loaded = load_model("random:tiny-qwen2-moe")
    spec = RunSpec(model="random:tiny-qwen2-moe", method="wanda", calibration=CALIBRATION,
                   eval=NO_PPL, progress=False, output=str(tmp_path / "out"))
    record = run(spec, loaded=loaded)
    (block_zeros, block_numel), (model_zeros, model_numel) = _counted(loaded.model)
    assert record.sparsity_block_weights == block_zeros / block_numel
    assert record.sparsity_model == model_zeros / model_numel
    routers = sum(p.numel() for b in decoder_blocks(loaded.model) for p, role in block_weight_roles(b).values()
                  if role == "router")
    assert record.block_weights_in_pruned_layers == pytest.approx(1 - routers / block_numel)
    assert record.unpruned_block_weights == {} and record.sparsity_measured == 0.5
    assert record.sparsity_block_weights < 0.5 and record.sparsity_model < record.sparsity_block_weights
    assert "0.mlp.shared_expert_gate" not in record.sparsity_per_layer  # a one-output gate is a router
    assert "0.mlp.experts.7.down_proj" in record.sparsity_per_layer


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class _OpaqueExperts(nn.Module):
    """Experts in 3-D tensors under a layout oneshot does not know (not transformers' experts contract)."""

    def __init__(self, experts):
        super().__init__()
        self.w_in, self.w_out, self.act = experts.gate_up_proj, experts.down_proj, experts.act_fn

    def forward(self, hidden, index, weights):
        out = torch.zeros_like(hidden)
        for e in range(self.w_in.shape[0]):
            token, slot = torch.where(index == e)
            gate, up = (hidden[token] @ self.w_in[e].t()).chunk(2, dim=-1)
            out.index_add_(0, token, (self.act(gate) * up) @ self.w_out[e].t() * weights[token, slot, None])
        return out


def test_block_weights_the_engine_cannot_prune_are_named_one_line_per_kind():
    """The issue's case: experts the engine cannot read stay dense, and the run says so honestly."""
    loaded = load_model("random:tiny-mixtral")
    for block in decoder_blocks(loaded.model):
        block.mlp.experts = _OpaqueExperts(block.mlp.experts)
    logger, capture = logging.getLogger("oneshot"), _Capture()
    logger.addHandler(capture)
    try:
        record = run(RunSpec(model="random:tiny-mixtral", method="wanda", calibration=CALIBRATION,
                             eval=NO_PPL, progress=False), loaded=loaded)
    finally:
        logger.removeHandler(capture)
    assert record.sparsity_measured == 0.5  # the attention layers it did prune
    (block_zeros, block_numel), _ = _counted(loaded.model)
    assert record.sparsity_block_weights == block_zeros / block_numel < 0.1
    assert set(record.unpruned_block_weights) == {"mlp.experts.w_in", "mlp.experts.w_out"}
    warned = [line for line in capture.lines if "left unpruned" in line]
    assert len(warned) == 2 and {line.split(":")[0] for line in warned} == set(record.unpruned_block_weights)


@pytest.mark.parametrize("preset", ["tiny-qwen2-moe", "tiny-deepseek-v3"])
def test_the_saved_model_reloads_and_gives_the_in_memory_logits(tmp_path, preset):
    from transformers import AutoModelForCausalLM

    loaded = load_model(f"random:{preset}")
    saved = tmp_path / "model"
    record = run(RunSpec(model=f"random:{preset}", method="sparsegpt", calibration=CALIBRATION,
                         eval=NO_PPL, progress=False, save_model=str(saved)), loaded=loaded)
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    ids = random_ids(2, 24, seed=5)
    with torch.no_grad():
        expected = loaded.model(input_ids=ids, use_cache=False).logits
        got = reloaded(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, expected)
    assert measure_coverage(reloaded).sparsity_block_weights == record.sparsity_block_weights


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_dense_families_prune_the_same_layers_as_before(preset):
    """Dense blocks: the prunable layers are exactly their linear layers (the rule before MoE support),
    and those hold every block weight, so masks and figures cannot change."""
    model = build_random_model(preset, torch.float32)
    for block in decoder_blocks(model):
        linear = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
        assert list(prunable_layers(block)) == linear
        assert {role for _, role in block_weight_roles(block).values()} == {"pruned"}
    assert measure_coverage(model).prunable_share == 1.0


def test_an_interrupted_moe_run_resumes_to_the_same_model(tmp_path):
    """Checkpoints hold the fused expert tensors; a resumed run ends bitwise equal to an uninterrupted one."""
    from oneshot.checkpoint import Checkpoint

    method, pattern, ids = get_method("sparsegpt"), parse_pattern("unstructured"), random_ids(6, 16)
    whole = build_random_model("tiny-deepseek-v3", torch.float32)
    prune_model(whole, method, 0.5, pattern, ids, batch_size=4, progress=False)

    class Killed(Exception):
        pass

    def kill_after_block_1(index):
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        prune_model(build_random_model("tiny-deepseek-v3", torch.float32), method, 0.5, pattern, ids, batch_size=4,
                    progress=False, checkpoint=Checkpoint(tmp_path, {}), on_block_done=kill_after_block_1)
    resumed = build_random_model("tiny-deepseek-v3", torch.float32)
    prune_model(resumed, method, 0.5, pattern, ids, batch_size=4, progress=False, checkpoint=Checkpoint(tmp_path, {}))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_the_printed_table_shows_all_three_sparsity_figures(capsys):
    from oneshot.cli.runs import print_table

    print_table({"method": "wanda", "pattern": "unstructured", "sparsity_measured": 0.5,
                 "sparsity_block_weights": 0.0612, "sparsity_model": 0.0423, "ppl": {}, "timings": {}})
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["method", "pattern", "sparsity", "block", "weights", "whole", "model"]
    assert row.split() == ["wanda", "unstructured", "0.5000", "0.0612", "0.0423"]
    print_table({"method": "wanda", "pattern": "unstructured", "sparsity_measured": 0.5, "ppl": {}, "timings": {}})
    assert capsys.readouterr().out.splitlines()[0].split() == ["method", "pattern", "sparsity"]  # older records
