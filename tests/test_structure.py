"""The structure map against the models themselves: removing a unit must equal silencing it.

Tiny random models of every family, in float64, with every weight, bias and norm re-drawn so that
no parameter is a neutral 0 or 1 (a bias the map forgot to slice would show). Heads and channels are
checked by behaviour (removal == zeroing the unit's output-projection columns), by permuting units
(the logits cannot change when every member agrees on the partition) and against hand-written rows.
"""
import copy
import types

import pytest
import torch
from torch import nn

from oneshot.models import (COLS, ROWS, TINY_PRESETS, ModelError, build_random_model, decoder_blocks, get_weight,
                            prunable_layers, remove_blocks, remove_units, rewrite_config, structure_map,
                            update_model_config)

from helpers import random_ids

PRESETS = list(TINY_PRESETS)
FIXED_HEADS = ["tiny-opt", "tiny-gpt2", "tiny-gpt-neox"]  # configs derive head_dim from hidden_size
ONE_KV_GROUP = ["tiny-gemma3-1kv"]  # every query head shares one key/value head: no head can go
REMOVABLE_HEADS = [p for p in PRESETS if p not in FIXED_HEADS + ONE_KV_GROUP]
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices gain nothing from threads, and on a shared machine a starved OpenMP team makes
    # every small matmul wait (hundreds of ms per forward instead of a few).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.dim() >= 2:
                param.copy_(noise * (0.5 if "emb" in name or name.endswith(("wte.weight", "wpe.weight")) else 0.15))
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:  # norm scales
                param.copy_(1 + 0.2 * noise)
    return model


def _model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    return _randomize(build_random_model(preset, dtype, seed), seed)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = random_ids(2, 24, seed=1) if ids is None else ids  # longer than the presets' sliding window (16)
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def _rebuild(model: nn.Module, config) -> nn.Module:
    """What a user gets after save_pretrained + from_pretrained: a fresh model from the (serialised)
    config, with the shrunk weights loaded strictly."""
    from transformers import AutoModelForCausalLM

    config = type(config).from_dict(config.to_dict())
    fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    return fresh.eval()


@torch.no_grad()
def _silence(block: nn.Module, coupling, units) -> None:
    """Zero the input columns of the output projection that `units` feed (o_proj / down_proj)."""
    layers = prunable_layers(block)
    for member in coupling.members:
        if member.axis == COLS:
            get_weight(layers[member.layer])[:, member.of(units)] = 0


def _removed_per_block(num_blocks: int, num_units: int, count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(num_units, generator=generator)[:count].tolist()) for _ in range(num_blocks)]


def _kept(removed: list[int], num_units: int) -> list[int]:
    return [u for u in range(num_units) if u not in removed]


# --- the map itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_map_names_exist_and_shapes_agree(preset):
    model = _model(preset)
    smap = structure_map(model)
    attention, mlp = smap.attention, smap.mlp
    assert smap.family == TINY_PRESETS[preset][0] and smap.num_blocks == len(decoder_blocks(model))
    heads, groups, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    for block in decoder_blocks(model):
        layers, modules = prunable_layers(block), dict(block.named_modules())
        if attention.qkv is None:
            assert get_weight(layers[attention.q]).shape == (heads * d, smap.hidden_size)
            assert get_weight(layers[attention.k]).shape == (groups * d, smap.hidden_size)
            assert get_weight(layers[attention.v]).shape == (groups * d, smap.hidden_size)
            assert (layers[attention.q].bias is not None) == attention.qkv_bias
        else:
            assert get_weight(layers[attention.qkv]).shape == ((heads + 2 * groups) * d, smap.hidden_size)
            assert (layers[attention.qkv].bias is not None) == attention.qkv_bias
        assert get_weight(layers[attention.o]).shape == (smap.hidden_size, heads * d)
        assert (layers[attention.o].bias is not None) == attention.o_bias
        size = mlp.intermediate_size
        if mlp.gate_up:
            assert get_weight(layers[mlp.gate_up]).shape == (2 * size, smap.hidden_size)
        else:
            assert get_weight(layers[mlp.up]).shape == (size, smap.hidden_size)
            if mlp.gate:
                assert get_weight(layers[mlp.gate]).shape == (size, smap.hidden_size)
        assert get_weight(layers[mlp.down]).shape == (smap.hidden_size, size)
        # Every norm of the block is named, and the per-head ones act on head_dim.
        norms = {name for name, m in modules.items() if type(m).__name__.endswith("Norm")}
        assert norms == set(smap.norms) | set(attention.head_norms)
        for name in smap.norms:
            assert modules[name].weight.shape == (smap.hidden_size,)
        for name in attention.head_norms:
            assert modules[name].weight.shape == (d,)
        # Units partition each member axis exactly once.
        for coupling in (smap.heads, smap.channels):
            for (layer, axis), members in coupling.layers().items():
                covered = torch.sort(torch.cat([m.indices.reshape(-1) for m in members])).values
                assert torch.equal(covered, torch.arange(get_weight(layers[layer]).shape[axis]))
                assert all(m.indices.shape[0] == coupling.num_units for m in members)
    assert smap.heads.num_units == groups
    assert smap.channels.num_units == mlp.intermediate_size


def _rows(*ranges):
    return torch.cat([torch.arange(a, b) for a, b in ranges])


# Hand-written rows and columns of unit 1 (heads) and unit 5 (channels) for the tiny presets (hidden 64,
# 4 heads of 16, 2 KV heads where there is GQA, 128 or 256 channels), role by role: the layouts written out
# independently of the map's code.
_UNIT_1_HEADS = {
    "tiny-llama": {"q": ("self_attn.q_proj", ROWS, _rows((32, 64))), "k": ("self_attn.k_proj", ROWS, _rows((16, 32))),
                   "v": ("self_attn.v_proj", ROWS, _rows((16, 32))), "o": ("self_attn.o_proj", COLS, _rows((32, 64)))},
    "tiny-phi3": {"q": ("self_attn.qkv_proj", ROWS, _rows((32, 64))),
                  "k": ("self_attn.qkv_proj", ROWS, _rows((80, 96))),
                  "v": ("self_attn.qkv_proj", ROWS, _rows((112, 128))),
                  "o": ("self_attn.o_proj", COLS, _rows((32, 64)))},
    "tiny-opt": {"q": ("self_attn.q_proj", ROWS, _rows((16, 32))), "k": ("self_attn.k_proj", ROWS, _rows((16, 32))),
                 "v": ("self_attn.v_proj", ROWS, _rows((16, 32))), "o": ("self_attn.out_proj", COLS, _rows((16, 32)))},
    "tiny-gpt2": {"q": ("attn.c_attn", ROWS, _rows((16, 32))), "k": ("attn.c_attn", ROWS, _rows((80, 96))),
                  "v": ("attn.c_attn", ROWS, _rows((144, 160))), "o": ("attn.c_proj", COLS, _rows((16, 32)))},
    "tiny-gpt-neox": {"q": ("attention.query_key_value", ROWS, _rows((48, 64))),
                      "k": ("attention.query_key_value", ROWS, _rows((64, 80))),
                      "v": ("attention.query_key_value", ROWS, _rows((80, 96))),
                      "o": ("attention.dense", COLS, _rows((16, 32)))},
}
_UNIT_5_CHANNELS = {
    "tiny-llama": {"gate": ("mlp.gate_proj", ROWS, [5]), "up": ("mlp.up_proj", ROWS, [5]),
                   "down": ("mlp.down_proj", COLS, [5])},
    "tiny-phi3": {"gate": ("mlp.gate_up_proj", ROWS, [5]), "up": ("mlp.gate_up_proj", ROWS, [133]),
                  "down": ("mlp.down_proj", COLS, [5])},
    "tiny-opt": {"up": ("fc1", ROWS, [5]), "down": ("fc2", COLS, [5])},
    "tiny-gpt2": {"up": ("mlp.c_fc", ROWS, [5]), "down": ("mlp.c_proj", COLS, [5])},
    "tiny-gpt-neox": {"up": ("mlp.dense_h_to_4h", ROWS, [5]), "down": ("mlp.dense_4h_to_h", COLS, [5])},
}


@pytest.mark.parametrize("preset", list(_UNIT_1_HEADS))
def test_unit_indices_match_the_layouts_written_by_hand(preset):
    smap = structure_map(build_random_model(preset, torch.float32))
    for coupling, unit, expected in ((smap.heads, 1, _UNIT_1_HEADS[preset]),
                                     (smap.channels, 5, _UNIT_5_CHANNELS[preset])):
        found = {m.role: (m.layer, m.axis, m.of([unit]).tolist()) for m in coupling.members}
        assert found == {role: (layer, axis, torch.as_tensor(rows).tolist())
                         for role, (layer, axis, rows) in expected.items()}


@torch.no_grad()
def _permute(block: nn.Module, coupling, order: torch.Tensor) -> None:
    """Unit u's slots receive the weights of unit order[u], in every member at once."""
    layers = prunable_layers(block)
    for (layer, axis), members in coupling.layers().items():
        weight = get_weight(layers[layer])
        source = torch.arange(weight.shape[axis])
        for member in members:
            source[member.indices.reshape(-1)] = member.indices[order].reshape(-1)
        weight.copy_(weight.index_select(axis, source))
        bias = layers[layer].bias
        if axis == ROWS and bias is not None:
            bias.copy_(bias[source])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["heads", "channels"])
def test_permuting_units_leaves_the_logits_unchanged(preset, kind):
    # Holds only if q, k, v, o (or gate, up, down) agree on which rows make a unit, fused layouts included.
    model = _model(preset)
    dense = _logits(model)
    coupling = structure_map(model).coupling(kind)
    if coupling.num_units == 1:
        pytest.skip("one unit (one KV group): no other order exists")
    generator = torch.Generator().manual_seed(2)
    for block in decoder_blocks(model):
        order = torch.randperm(coupling.num_units, generator=generator)
        while torch.equal(order, torch.arange(coupling.num_units)):
            order = torch.randperm(coupling.num_units, generator=generator)
        _permute(block, coupling, order)
    assert torch.allclose(_logits(model), dense, atol=TOL, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_zeroing_a_units_value_rows_equals_zeroing_its_output_columns(preset):
    # Ties the v rows (fused ones included) to the o columns, in every family: a KV group's values
    # reach the attention output only through its own query heads.
    heads = structure_map(_model(preset)).heads
    unit = 1 if heads.num_units > 1 else 0  # not the last unit: with four heads its rows coincide in some wrong layouts
    by_columns, by_values = _model(preset), _model(preset)
    with torch.no_grad():
        for block_c, block_v in zip(decoder_blocks(by_columns), decoder_blocks(by_values)):
            _silence(block_c, heads, [unit])
            layers = prunable_layers(block_v)
            for member in heads.members:
                if member.role == "v":
                    get_weight(layers[member.layer])[member.of([unit])] = 0
                    if layers[member.layer].bias is not None:
                        layers[member.layer].bias[member.of([unit])] = 0
    assert not torch.allclose(_logits(by_columns), _logits(_model(preset)), atol=1e-2)
    assert torch.allclose(_logits(by_columns), _logits(by_values), atol=TOL, rtol=0)


# --- removing units ---------------------------------------------------------------------------------


def _check_removal(preset: str, kind: str, count: int, dtype: torch.dtype = torch.float64) -> None:
    model = _model(preset, dtype=dtype)
    dense = _logits(model)
    coupling = structure_map(model).coupling(kind)
    blocks = decoder_blocks(model)
    removed = _removed_per_block(len(blocks), coupling.num_units, count)

    silenced = copy.deepcopy(model)
    for block, units in zip(decoder_blocks(silenced), removed):
        _silence(block, coupling, units)
    expected = _logits(silenced)
    assert not torch.allclose(expected, dense, atol=1e-2), "the removed units must matter"

    before = [{name: (get_weight(layer).clone(), None if layer.bias is None else layer.bias.detach().clone())
               for name, layer in prunable_layers(block).items()} for block in blocks]
    for block, units in zip(blocks, removed):
        remove_units(block, coupling, _kept(units, coupling.num_units))

    # Bookkeeping: exactly the named units' rows / columns are gone, the rest kept in order; other
    # layers untouched.
    for block, units, old in zip(blocks, removed, before):
        grouped = coupling.layers()
        for name, layer in prunable_layers(block).items():
            weight, bias = old[name]
            axes = [axis for (layer_name, axis) in grouped if layer_name == name]
            if not axes:
                assert torch.equal(get_weight(layer), weight)
                continue
            (axis,) = axes
            gone = set(coupling.index(name, axis, units).tolist())
            kept = torch.tensor([i for i in range(weight.shape[axis]) if i not in gone])
            assert len(gone) == len(units) * sum(m.indices.shape[1] for m in grouped[(name, axis)])
            assert torch.equal(get_weight(layer), weight.index_select(axis, kept))
            if bias is not None:
                assert torch.equal(layer.bias, bias[kept] if axis == ROWS else bias)

    assert torch.allclose(_logits(model), expected, atol=TOL, rtol=0)  # the shrunk model as it is, in place
    assert torch.allclose(_logits(copy.deepcopy(model)), expected, atol=TOL, rtol=0)

    config = rewrite_config(model.config, **coupling.config_kwargs(coupling.num_units - count))
    rebuilt = _rebuild(model, config)
    assert torch.allclose(_logits(rebuilt), expected, atol=TOL, rtol=0)
    update_model_config(model, config)  # the in-place model with its config brought up to date
    assert torch.allclose(_logits(model), expected, atol=TOL, rtol=0)
    assert structure_map(model).coupling(kind).num_units == coupling.num_units - count


@pytest.mark.parametrize("preset", REMOVABLE_HEADS)
def test_removing_heads_equals_zeroing_their_output_columns(preset):
    _check_removal(preset, "heads", count=1)


@pytest.mark.parametrize("preset", PRESETS)
def test_removing_channels_equals_zeroing_their_down_columns(preset):
    _check_removal(preset, "channels", count=37)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-phi3", "tiny-gpt2"])
def test_removal_in_float32(preset):
    # The models' own dtype: new parameters keep it, and float32 sums differ only by rounding.
    for kind in ("heads", "channels") if preset in REMOVABLE_HEADS else ("channels",):
        _check_removal(preset, kind, count=1, dtype=torch.float32)
    model = _model(preset, dtype=torch.float32)
    remove_units(decoder_blocks(model)[0], structure_map(model).channels, [0, 1])
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("preset", PRESETS)
def test_removing_nothing_changes_nothing(preset):
    model = _model(preset)
    dense = _logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    smap = structure_map(model)
    for coupling in (smap.heads, smap.channels):
        if coupling.removable:
            for block in decoder_blocks(model):
                remove_units(block, coupling, list(range(coupling.num_units)))
    remove_blocks(model, list(range(smap.num_blocks)))
    assert torch.equal(_logits(model), dense)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("preset", FIXED_HEADS)
def test_families_that_derive_head_dim_refuse_head_removal(preset):
    model = _model(preset)
    heads = structure_map(model).heads
    assert not heads.removable and "head_dim" in heads.reason
    assert heads.allowed_counts == (heads.num_units,)
    for attempt in (lambda: remove_units(decoder_blocks(model)[0], heads, [0, 1]),
                    lambda: rewrite_config(model.config, num_heads=2)):
        with pytest.raises(ModelError) as error:
            attempt()
        assert "head_dim" in str(error.value) and "\n" not in str(error.value)


def test_head_counts_that_the_config_cannot_express_are_reported():
    # Llama validates hidden_size % num_attention_heads == 0 even with an explicit head_dim.
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=8, num_key_value_heads=8, head_dim=8)
    heads = structure_map(AutoModelForCausalLM.from_config(config)).heads
    assert heads.removable and heads.num_units == 8 and tuple(heads.allowed_counts) == (1, 2, 4, 8)
    with pytest.raises(ModelError, match="multiple of the number of attention heads"):
        rewrite_config(config, num_heads=6)
    assert rewrite_config(config, num_heads=4).num_attention_heads == 4


def test_phi3_with_longrope_factors_cannot_remove_heads():
    # Phi-3 checks the longrope factor lists against hidden_size / num_heads, whatever head_dim says.
    from transformers import AutoConfig, AutoModelForCausalLM

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    config = AutoConfig.for_model("phi3", vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  original_max_position_embeddings=128, rope_parameters=rope, pad_token_id=0,
                                  eos_token_id=2)
    heads = structure_map(AutoModelForCausalLM.from_config(config)).heads
    assert not heads.removable and "short_factor" in heads.reason


# --- removing blocks --------------------------------------------------------------------------------


def _skip(block: nn.Module):
    """Make a block pass its input through unchanged, in whatever form the family's blocks return."""
    def hook(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return block.register_forward_hook(hook, with_kwargs=True)


def _check_block_removal(preset: str, keep: list[int]) -> nn.Module:
    model = _model(preset)
    dense = _logits(model)
    skipped = copy.deepcopy(model)
    for index, block in enumerate(decoder_blocks(skipped)):
        if index not in keep:
            _skip(block)
    expected = _logits(skipped)
    assert not torch.allclose(expected, dense, atol=1e-2)

    old_types = getattr(model.config, "layer_types", None)
    remove_blocks(model, keep)
    blocks = decoder_blocks(model)
    assert len(blocks) == len(keep) == model.config.num_hidden_layers
    for position, block in enumerate(blocks):
        assert all(m.layer_idx == position for m in block.modules() if hasattr(m, "layer_idx"))
    if old_types is not None:
        assert model.config.layer_types == [old_types[i] for i in keep]
    assert torch.allclose(_logits(model), expected, atol=TOL, rtol=0)
    assert torch.allclose(_logits(_rebuild(model, model.config)), expected, atol=TOL, rtol=0)
    return model


@pytest.mark.parametrize("preset", PRESETS)
def test_removing_blocks_equals_skipping_them(preset):
    layers = len(decoder_blocks(build_random_model(preset, torch.float32)))
    model = _check_block_removal(preset, keep=list(range(1, layers)))  # every kept block moves down
    # The KV cache is indexed by the renumbered blocks: decoding step by step equals one full pass.
    ids = random_ids(2, 20, seed=1)
    with torch.no_grad():
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values, use_cache=True)
    assert torch.allclose(step.logits[:, -1], _logits(model, ids)[:, -1], atol=TOL, rtol=0)


def test_gemma3_layer_types_follow_the_kept_blocks():
    model = _check_block_removal("tiny-gemma3", keep=[0, 2])  # both sliding: no full-attention block left
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    config = rewrite_config(_model("tiny-gemma3").config, num_hidden_layers=2)
    assert config.num_hidden_layers == 2 and config.layer_types == ["sliding_attention", "full_attention"]


def test_gpt2_scaled_by_layer_index_keeps_only_leading_blocks():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", **dict(TINY_PRESETS["tiny-gpt2"][1], n_layer=3,
                                                 scale_attn_by_inverse_layer_idx=True))
    model = _randomize(AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval())
    smap = structure_map(model)
    assert smap.trailing_blocks_only and "scale_attn_by_inverse_layer_idx" in smap.blocks_reason
    with pytest.raises(ModelError, match="only trailing blocks"):
        remove_blocks(model, [0, 2])
    assert len(decoder_blocks(model)) == 3 and model.config.n_layer == 3  # refused before any change
    skipped = copy.deepcopy(model)
    _skip(decoder_blocks(skipped)[2])
    remove_blocks(model, [0, 1])
    assert model.config.n_layer == 2
    assert torch.allclose(_logits(model), _logits(skipped), atol=TOL, rtol=0)
    assert torch.allclose(_logits(_rebuild(model, model.config)), _logits(skipped), atol=TOL, rtol=0)


# --- config rewriting and errors --------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_rewrite_config_uses_the_family_keys(preset):
    config = _model(preset).config
    new = rewrite_config(config, kept_blocks=[1], intermediate_size=40)
    key = {"opt": "ffn_dim", "gpt2": "n_inner"}.get(config.model_type, "intermediate_size")
    assert getattr(new, key) == 40 and new.num_hidden_layers == 1
    assert config.num_hidden_layers == TINY_PRESETS[preset][1].get("num_hidden_layers", 2)  # the original stays
    if preset in REMOVABLE_HEADS:
        new = rewrite_config(config, num_heads=2)
        assert (new.num_attention_heads, new.num_key_value_heads, new.head_dim) == (2, 1, 16)
        assert type(new).from_dict(new.to_dict()).head_dim == 16  # survives save and load (Phi-3 has no field)
    for bad in (dict(kept_blocks=[]), dict(kept_blocks=[99]), dict(num_hidden_layers=99), dict(intermediate_size=0)):
        with pytest.raises(ModelError):
            rewrite_config(config, **bad)


def test_unknown_family_raises_model_error():
    class Unmapped(nn.Module):
        config = types.SimpleNamespace(model_type="bloom")

    for attempt in (lambda: structure_map(Unmapped()), lambda: rewrite_config(Unmapped.config)):
        with pytest.raises(ModelError) as error:
            attempt()
        assert "'bloom'" in str(error.value) and "\n" not in str(error.value)


def test_keep_lists_are_checked():
    model = _model("tiny-llama")
    smap = structure_map(model)
    block = decoder_blocks(model)[0]
    for bad in ([], [2], [-1]):
        with pytest.raises(ModelError):
            remove_units(block, smap.heads, bad)
    remove_units(block, smap.heads, torch.tensor([1, 1]))  # repeats and tensors are fine
    with pytest.raises(ModelError, match="already shrunk"):
        remove_units(block, smap.heads, [0])
    with pytest.raises(ModelError, match="update_model_config"):  # a stale config no longer describes block 0
        structure_map(model)


@pytest.mark.parametrize("preset", ["tiny-phi3", "tiny-gemma3", "tiny-gpt2"])
def test_shrunk_model_saves_and_loads(preset, tmp_path):
    # The whole path a user takes: shrink in place, bring the config up to date, save_pretrained, load.
    from transformers import AutoModelForCausalLM

    model = _model(preset)
    smap = structure_map(model)
    for coupling in (smap.heads, smap.channels):
        if coupling.removable:
            for block in decoder_blocks(model):
                remove_units(block, coupling, list(range(1, coupling.num_units)))
            update_model_config(model, rewrite_config(model.config, **coupling.config_kwargs(coupling.num_units - 1)))
    remove_blocks(model, [smap.num_blocks - 1])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert torch.allclose(_logits(loaded), _logits(model), atol=TOL, rtol=0)
    assert structure_map(loaded).channels.num_units == smap.channels.num_units - 1
