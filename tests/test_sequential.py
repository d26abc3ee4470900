"""Sublayer-sequential calibration against a hand-written sequential reference (whole-model forwards,
one sequence at a time, one group of layers after another)."""
import copy

import pytest
import torch

from oneshot.engine import SEQUENTIAL_STAGES, prune_model
from oneshot.methods import get_method, parse_pattern
from oneshot.models import build_random_model, decoder_blocks, get_weight, prunable_layers, set_weight

from helpers import random_ids

GROUPS = {  # forward order; layers in one group read the same tensor
    "tiny-llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                   ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "tiny-opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"],
                 ["fc2"]],
    "tiny-gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    # Gemma 3: sliding and global layers, q/k norms and four norms per block between the groups
    "tiny-gemma3": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                    ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
}


@torch.no_grad()
def _sequential_reference(model, method, sparsity, pattern, ids, groups):
    for index, block in enumerate(decoder_blocks(model)):
        layers = prunable_layers(block)
        for group in groups:
            stat = method.statistic(get_weight(layers[group[0]]).shape[1], "cpu", torch.float64)
            handle = layers[group[0]].register_forward_hook(lambda m, inp, out: stat.add(inp[0]))
            for row in ids:
                model(input_ids=row[None], use_cache=False)
            handle.remove()
            value = stat.value()
            prepared = method.prepare(value) if method.prepare else value
            for name in group:
                set_weight(layers[name], method.prune(get_weight(layers[name]), prepared, sparsity, pattern).weight)


@pytest.mark.parametrize("preset", list(GROUPS))
@pytest.mark.parametrize("method_name,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_sublayer_sequential_equals_a_hand_written_reference(preset, method_name, pattern):
    method, pattern = get_method(method_name), parse_pattern(pattern)
    model = build_random_model(preset, torch.float64)
    reference = copy.deepcopy(model)
    ids = random_ids(5, 16)
    prune_model(model, method, 0.5, pattern, ids, batch_size=2, progress=False, stages=SEQUENTIAL_STAGES)
    _sequential_reference(reference, method, 0.5, pattern, ids, GROUPS[preset])
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a == 0, b == 0), name  # identical masks
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=name)


def test_sequential_differs_from_the_default_order_and_keeps_patterns():
    ids = random_ids(6, 24, seed=1)
    default, sequential = (build_random_model("tiny-llama", torch.float64) for _ in range(2))
    prune_model(default, get_method("sparsegpt"), 0.5, parse_pattern("2:4"), ids, progress=False)
    prune_model(sequential, get_method("sparsegpt"), 0.5, parse_pattern("2:4"), ids, progress=False,
                stages=SEQUENTIAL_STAGES)
    assert any(not torch.equal(a, b) for a, b in zip(default.parameters(), sequential.parameters()))
    for block in decoder_blocks(sequential):
        for layer in prunable_layers(block).values():
            groups = (get_weight(layer) == 0).reshape(get_weight(layer).shape[0], -1, 4).sum(-1)
            assert bool((groups == 2).all())


def test_groups_are_found_once_per_kind_of_block(monkeypatch):
    """The grouping forward runs once per block class and layer set, and every block gets the same groups."""
    from oneshot.engine import sequential

    found = []
    real = sequential._find_groups
    monkeypatch.setattr(sequential, "_GROUPS_BY_BLOCK_KIND", {})
    monkeypatch.setattr(sequential, "_find_groups", lambda visit: found.append(visit.index) or real(visit))
    seen, prune_layers = [], sequential.prune_layers
    monkeypatch.setattr(sequential, "prune_layers", lambda visit, group: seen.append(list(group)) or prune_layers(visit, group))
    model = build_random_model("tiny-llama", torch.float64)
    ids = random_ids(4, 16, seed=2)
    prune_model(model, get_method("wanda"), 0.5, parse_pattern("unstructured"), ids, batch_size=2, progress=False,
                stages=SEQUENTIAL_STAGES)
    blocks = len(decoder_blocks(model))
    assert blocks > 1 and found == [0]
    assert seen == GROUPS["tiny-llama"] * blocks
