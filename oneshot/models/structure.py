"""The structure map per family: which weights inside a decoder block are coupled, and the config rewrite.

Structured pruning removes whole units: a KV group of attention heads, one MLP channel, one decoder
block. Each unit spans several layers (a head owns rows of q, k and v and columns of o), so it must
leave all of them at once. `structure_map` states, once per family, which rows and columns belong to
which unit (a `Coupling`; the map's types are in structure_types.py), so that scoring and removal code
needs no family knowledge: `rewrite_config` here, and `remove_units`, `remove_blocks` and
`update_model_config` in removal.py, act on the map and the config alone. The table `_FAMILIES` at the
bottom is the only place that names families. Layer names and axes follow structure_types.py.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import ModelError, decoder_blocks, get_weight
from .structure_types import COLS, ROWS, AttentionMap, Coupling, Member, MlpMap, StructureMap, UnitCountAttribute


# ---------------------------------------------------------------------------------------------------
# Building the map


def structure_map(model: nn.Module) -> StructureMap:
    """The coupled groups of `model`'s decoder blocks, from its config, checked against every block."""
    config = getattr(model, "config", None)
    family = _family_of(config)
    blocks = decoder_blocks(model)
    spec = _FAMILIES[family]

    hidden = config.hidden_size
    num_heads = getattr(config, spec.heads_key)
    num_kv_heads = getattr(config, spec.kv_heads_key) if spec.kv_heads_key else num_heads
    head_dim = hidden // num_heads if spec.heads_fixed else (getattr(config, "head_dim", None) or hidden // num_heads)
    if num_heads % num_kv_heads:
        raise ModelError(f"{family}: {num_heads} heads do not split into {num_kv_heads} KV groups")

    modules = dict(blocks[0].named_modules())
    # A mixture of experts has no MLP layers to name (mlp_fixed), multi-head latent attention no q/k/v.
    for name in filter(None, (spec.qkv or spec.q, spec.o, spec.gate_up or spec.up, spec.down)):
        if name not in modules:
            raise ModelError(f"{family} block 0 has no {name}; the structure map is out of date")
    mlp_in = spec.gate_up or spec.up
    # GPT-2 leaves n_inner unset for 4 * hidden_size; the weights say it either way.
    intermediate = 0 if spec.mlp_fixed else \
        getattr(config, spec.intermediate_key, None) or get_weight(modules[spec.down]).shape[1]
    q_in = spec.qkv or spec.q
    attention = AttentionMap(
        module=spec.attention, o=spec.o, q=spec.q, k=spec.k, v=spec.v, qkv=spec.qkv, qkv_layout=spec.qkv_layout,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        qkv_bias=q_in is not None and modules[q_in].bias is not None, o_bias=modules[spec.o].bias is not None,
        head_norms=spec.head_norms, bias_switch=None if modules[spec.o].bias is not None else spec.o_bias_switch)
    down_bias = spec.down is not None and modules[spec.down].bias is not None
    mlp = MlpMap(module=spec.mlp, up=spec.up, gate=spec.gate, gate_up=spec.gate_up, down=spec.down,
                 intermediate_size=intermediate, up_bias=mlp_in is not None and modules[mlp_in].bias is not None,
                 down_bias=down_bias, bias_switch=None if down_bias or spec.mlp_fixed else spec.down_bias_switch)

    heads = _heads_coupling(spec, config, attention)
    channels = _channels_coupling(spec, mlp)
    for index, block in enumerate(blocks):
        _check_block(family, index, block, spec, heads, channels)

    trailing_only = any(getattr(config, key, False) for key in spec.index_dependent_flags)
    reason = (f"{family} with {', '.join(spec.index_dependent_flags)} scales each block by its index: only "
              "trailing blocks can be removed") if trailing_only else ""
    return StructureMap(family=family, num_blocks=len(blocks), hidden_size=hidden, attention=attention, mlp=mlp,
                        norms=spec.norms, heads=heads, channels=channels, trailing_blocks_only=trailing_only,
                        blocks_reason=reason)


def _heads_coupling(spec: _Family, config, attention: AttentionMap) -> Coupling:
    # Units are KV groups: a group's k/v rows and the rows of the query heads that read them go
    # together; without GQA a group is one head. Removing whole groups keeps heads / kv_heads fixed.
    heads, groups, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    per_group = heads // groups
    if spec.q is None and spec.qkv is None:  # no per-head rows to name (multi-head latent attention)
        return Coupling("heads", groups, (), (), (), (groups,), False, f"{config.model_type}: {spec.heads_fixed}")
    q_rows = torch.arange(heads * d).view(groups, per_group * d)
    kv_rows = torch.arange(groups * d).view(groups, d)
    if spec.qkv_layout == "separate":
        parts = [(spec.q, "q", q_rows), (spec.k, "k", kv_rows), (spec.v, "v", kv_rows)]
    elif spec.qkv_layout == "q|k|v":
        parts = [(spec.qkv, "q", q_rows), (spec.qkv, "k", heads * d + kv_rows),
                 (spec.qkv, "v", (heads + groups) * d + kv_rows)]
    else:  # "per-head q,k,v": the fused output is [heads, 3, head_dim] (GPT-NeoX); no GQA there
        if groups != heads:
            raise ModelError(f"{config.model_type}: an interleaved per-head q,k,v layout cannot have KV groups")
        start = (torch.arange(heads) * 3 * d)[:, None] + torch.arange(d)
        parts = [(spec.qkv, "q", start), (spec.qkv, "k", start + d), (spec.qkv, "v", start + 2 * d)]
    members = tuple(Member(layer, ROWS, role, rows) for layer, role, rows in parts)
    members += (Member(spec.o, COLS, "o", q_rows),)
    per_unit = (("num_heads", per_group), ("num_kv_heads", 1))
    counters = tuple(UnitCountAttribute(spec.attention, attribute, per_group if what == "heads" else 1)
                     for attribute, what in spec.head_counters)

    if spec.heads_fixed:
        return Coupling("heads", groups, members, counters, per_unit, (groups,), False,
                        f"{config.model_type}: {spec.heads_fixed}")
    allowed, first_refusal = [], ""
    for kept in range(1, groups + 1):
        try:
            rewrite_config(config, num_heads=kept * per_group, num_kv_heads=kept)
            allowed.append(kept)
        except ModelError as exc:
            first_refusal = first_refusal or str(exc)
    if groups == 1:  # Gemma 3 270M: every query head shares the one key/value head
        return Coupling("heads", groups, members, counters, per_unit, (groups,), False,
                        f"its {per_group} query heads share one key/value head (one KV group), and removing that "
                        "group would remove the whole attention")
    if allowed == [groups]:
        return Coupling("heads", groups, members, counters, per_unit, (groups,), False,
                        f"no smaller head count passes the config's checks: {first_refusal}")
    return Coupling("heads", groups, members, counters, per_unit, tuple(allowed), True)


def _channels_coupling(spec: _Family, mlp: MlpMap) -> Coupling:
    if spec.mlp_fixed:  # a mixture of experts: no MLP channels shared by every token
        return Coupling("channels", 0, (), (), (), (), False, spec.mlp_fixed)
    size = mlp.intermediate_size
    channel = torch.arange(size)[:, None]
    if spec.gate_up:  # Phi-3: rows [gate | up]
        members = (Member(spec.gate_up, ROWS, "gate", channel), Member(spec.gate_up, ROWS, "up", size + channel))
    elif spec.gate:
        members = (Member(spec.gate, ROWS, "gate", channel), Member(spec.up, ROWS, "up", channel))
    else:
        members = (Member(spec.up, ROWS, "up", channel),)
    members += (Member(spec.down, COLS, "down", channel),)
    counters = tuple(UnitCountAttribute(spec.mlp, attribute, 1) for attribute in spec.channel_counters)
    return Coupling("channels", size, members, counters, (("intermediate_size", 1),), range(1, size + 1), True)


def _check_block(family: str, index: int, block: nn.Module, spec: _Family, *couplings: Coupling) -> None:
    """Every member's axis must be exactly as long as its units cover, in every block."""
    modules = dict(block.named_modules())
    for coupling in couplings:
        for (layer, axis), members in coupling.layers().items():
            if layer not in modules:
                raise ModelError(f"{family} block {index} has no {layer}; the structure map is out of date")
            size = get_weight(modules[layer]).shape[axis]
            covered = sum(m.indices.numel() for m in members)
            if size != covered:
                raise ModelError(f"{family} block {index}: {layer} has {size} {'rows' if axis == ROWS else 'columns'}"
                                 f" but the config implies {covered} (shrunk without update_model_config?)")
    for name in spec.norms + spec.head_norms:
        if name not in modules:
            raise ModelError(f"{family} block {index} has no norm {name}; the structure map is out of date")


# ---------------------------------------------------------------------------------------------------
# Acting on the map (no family names below this line until the table)


class _ConfigView:
    """The model's config as one module sees it, with a few values of its own.

    Everything else is read from (and written to) the shared config, so later changes such as the
    attention implementation still reach the module.
    """

    def __init__(self, base, values: dict):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name):
        state = self.__dict__
        if name.startswith("__") or "_base" not in state:  # copy/pickle probe an empty instance
            raise AttributeError(name)
        if name in state["_values"]:
            return state["_values"][name]
        return getattr(state["_base"], name)

    def __setattr__(self, name, value):
        if name in self._values:
            self._values[name] = value
        else:
            setattr(self._base, name, value)


def _kept(keep, num_units: int, what: str) -> torch.Tensor:
    kept = torch.unique(torch.as_tensor(keep, dtype=torch.long).reshape(-1))  # sorted, no repeats
    if kept.numel() == 0:
        raise ModelError(f"keeping no {what} at all is not supported")
    if kept[0] < 0 or kept[-1] >= num_units:
        raise ModelError(f"{what} to keep must be in 0..{num_units - 1}, got {kept.tolist()}")
    return kept


def rewrite_config(config, *, num_hidden_layers: int | None = None, kept_blocks: Sequence[int] | None = None,
                   num_heads: int | None = None, num_kv_heads: int | None = None,
                   intermediate_size: int | None = None):
    """A new config for a shrunk model, in the family's own key names; `config` is left as it is.

    kept_blocks: the original indices of the blocks that stay (per-layer lists such as layer_types
    follow them); num_hidden_layers alone keeps the first blocks. num_heads / num_kv_heads: heads per
    block (head_dim is written out so that it no longer derives from hidden_size); either one alone
    keeps the current ratio. Every value is validated as the family's config class validates it.
    """
    family = _family_of(config)
    spec = _FAMILIES[family]
    new = copy.deepcopy(config)
    layers = getattr(config, spec.layers_key)

    if kept_blocks is not None or num_hidden_layers is not None:
        if kept_blocks is None:
            if not 1 <= num_hidden_layers <= layers:
                raise ModelError(f"num_hidden_layers must be in 1..{layers}, got {num_hidden_layers}")
            kept = list(range(num_hidden_layers))
        else:
            kept = _kept(list(kept_blocks), layers, "blocks").tolist()
            if num_hidden_layers is not None and num_hidden_layers != len(kept):
                raise ModelError(f"num_hidden_layers={num_hidden_layers} but {len(kept)} kept blocks")
        flags = [key for key in spec.index_dependent_flags if getattr(config, key, False)]
        if flags and kept != list(range(len(kept))):
            raise ModelError(f"{family} with {', '.join(flags)} scales each block by its index: only trailing "
                             f"blocks can be removed, not {sorted(set(range(layers)) - set(kept))}")
        setattr(new, spec.layers_key, len(kept))
        for key in _PER_LAYER_KEYS:
            values = getattr(config, key, None)
            if isinstance(values, (list, tuple)) and len(values) == layers:
                setattr(new, key, [values[i] for i in kept])
        if spec.dense_blocks:
            _keep_dense_blocks(spec.dense_blocks, config, new, kept)

    if num_heads is not None or num_kv_heads is not None:
        if spec.heads_fixed:
            raise ModelError(f"{family} cannot remove heads: {spec.heads_fixed}")
        heads = getattr(config, spec.heads_key)
        groups = getattr(config, spec.kv_heads_key)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if num_heads is None:
            num_heads = num_kv_heads * (heads // groups)
        if num_kv_heads is None:
            if (num_heads * groups) % heads:
                raise ModelError(f"{num_heads} heads cannot keep the ratio of {heads} heads to {groups} KV heads")
            num_kv_heads = num_heads * groups // heads
        if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
            raise ModelError(f"{num_heads} heads do not split into {num_kv_heads} KV groups")
        setattr(new, spec.heads_key, num_heads)
        setattr(new, spec.kv_heads_key, num_kv_heads)
        new.head_dim = head_dim  # explicit: no longer hidden_size / num_heads

    if intermediate_size is not None:
        if intermediate_size < 1:
            raise ModelError(f"intermediate_size must be at least 1, got {intermediate_size}")
        setattr(new, spec.intermediate_key, intermediate_size)

    try:
        new.validate()
    except Exception as exc:  # the config class's own checks; their errors span several lines
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelError(f"{family} config refuses the change: {lines[-1] if lines else type(exc).__name__}") from None
    return new


def _keep_dense_blocks(rule: str, config, new, kept: list[int]) -> None:
    """Mixtures of experts with some dense blocks: the kept blocks keep their kind (dense MLP or experts).
    first_k_dense_replace (DeepSeek): the first k blocks are dense, so the kept ones among them stay first.
    mlp_only_layers (Qwen2/3-MoE): dense blocks are listed, or every decoder_sparse_step-th block has experts."""
    if rule == "first_k_dense_replace":
        new.first_k_dense_replace = sum(1 for index in kept if index < config.first_k_dense_replace)
        return
    step, listed = config.decoder_sparse_step, set(config.mlp_only_layers or ())
    dense = [index in listed or (index + 1) % step != 0 for index in kept]
    new.decoder_sparse_step = 1  # the kept blocks' kinds are listed explicitly from now on
    new.mlp_only_layers = [position for position, is_dense in enumerate(dense) if is_dense]


def _family_of(config) -> str:
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        raise ModelError(f"no structure map for model family {family!r} (mapped: {', '.join(_FAMILIES)})")
    if getattr(config, "is_heterogeneous", False):
        raise ModelError(f"{family} config with per_layer_config overrides is not supported by the structure map")
    return family


# ---------------------------------------------------------------------------------------------------
# The family table: names inside one block, config keys, and what each family cannot express


@dataclass(frozen=True)
class _Family:
    attention: str
    o: str
    mlp: str
    down: str | None  # None with mlp_fixed
    norms: tuple[str, ...]
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: str = "separate"
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    head_norms: tuple[str, ...] = ()
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    intermediate_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"
    heads_fixed: str = ""  # why heads cannot be removed at all (head_dim derives from hidden_size)
    head_counters: tuple[tuple[str, str], ...] = ()  # (attribute, "heads" or "kv_heads") on the attention module
    channel_counters: tuple[str, ...] = ()  # attributes on the MLP module equal to intermediate_size
    index_dependent_flags: tuple[str, ...] = ()  # config flags that tie a block's maths to its index
    # Config switches that give the output projections a bias: (key, prefix of the layers it governs).
    o_bias_switch: tuple[str, str] | None = None
    down_bias_switch: tuple[str, str] | None = None
    mlp_fixed: str = ""  # why MLP channels cannot be removed at all (a mixture of experts)
    dense_blocks: str = ""  # mixtures of experts: the config key that says which blocks are dense


_PER_LAYER_KEYS = ("layer_types",)  # config lists with one entry per block (Qwen2/3, Gemma 2/3)

_DERIVED_HEAD_DIM = "head_dim is hidden_size / num_heads (no head_dim setting), so fewer heads would change every head"


def _llama_like(norms=("input_layernorm", "post_attention_layernorm"), head_norms=(), o_bias_switch=None,
                down_bias_switch=None) -> _Family:
    # Llama, Mistral, Qwen2/3, Gemma 1/2/3: separate q/k/v/o and gate/up/down, explicit head_dim.
    # Their attention keeps num_key_value_groups (heads per KV group), which whole-group removal preserves.
    return _Family(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                   o="self_attn.o_proj", mlp="mlp", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                   norms=norms, head_norms=head_norms, channel_counters=("intermediate_size",),
                   o_bias_switch=o_bias_switch, down_bias_switch=down_bias_switch)


_MOE_MLP = ("its MLP is a mixture of experts: each expert has its own channels and no channel is shared by every "
            "token; pattern experts removes whole routed experts instead")
_MLA = ("multi-head latent attention (MLA): keys and values come from one low-rank latent shared by every head "
        "(kv_a_proj_with_mqa, kv_b_proj), with a rotary part shared across heads, so heads are not separable rows "
        "of q, k and v")


def _moe_family(head_norms=(), o_bias_switch=None, heads_fixed="", mla=False, dense_blocks="") -> _Family:
    # Mixtral, Qwen2/3-MoE, OLMoE: separate q/k/v/o; DeepSeek-V2/V3: MLA, whose o_proj alone is named here.
    attention = dict(o="self_attn.o_proj") if mla else \
        dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj")
    return _Family(attention="self_attn", **attention, mlp="mlp", down=None,
                   norms=("input_layernorm", "post_attention_layernorm"), head_norms=head_norms,
                   heads_fixed=_MLA if mla else heads_fixed, o_bias_switch=o_bias_switch, mlp_fixed=_MOE_MLP,
                   dense_blocks=dense_blocks)


_GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
_HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
# attention_bias gives q, k, v and o a bias together; Llama's mlp_bias gives gate, up and down one.
# Mistral, Qwen2 (o), Phi-3 and the MLPs of Qwen3 and Gemma hard-code bias=False: no switch.
_ATTENTION_BIAS = ("attention_bias", "self_attn.")

_FAMILIES: dict[str, _Family] = {
    "llama": _llama_like(o_bias_switch=_ATTENTION_BIAS, down_bias_switch=("mlp_bias", "mlp.")),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(head_norms=_HEAD_NORMS, o_bias_switch=_ATTENTION_BIAS),
    "gemma": _llama_like(o_bias_switch=_ATTENTION_BIAS),
    "gemma2": _llama_like(norms=_GEMMA2_NORMS, o_bias_switch=_ATTENTION_BIAS),
    "gemma3_text": _llama_like(norms=_GEMMA2_NORMS, head_norms=_HEAD_NORMS, o_bias_switch=_ATTENTION_BIAS),
    # Phi-3's attention reads num_attention_heads from its config at forward time to split qkv_proj.
    "phi3": _Family(attention="self_attn", qkv="self_attn.qkv_proj", qkv_layout="q|k|v", o="self_attn.o_proj",
                    mlp="mlp", gate_up="mlp.gate_up_proj", down="mlp.down_proj",
                    norms=("input_layernorm", "post_attention_layernorm"),
                    head_counters=(("num_key_value_heads", "kv_heads"), ("config.num_attention_heads", "heads"),
                                   ("config.num_key_value_heads", "kv_heads"))),
    "opt": _Family(attention="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                   o="self_attn.out_proj", mlp="", up="fc1", down="fc2",
                   norms=("self_attn_layer_norm", "final_layer_norm"), kv_heads_key=None,
                   intermediate_key="ffn_dim", heads_fixed=_DERIVED_HEAD_DIM),
    "gpt2": _Family(attention="attn", qkv="attn.c_attn", qkv_layout="q|k|v", o="attn.c_proj", mlp="mlp",
                    up="mlp.c_fc", down="mlp.c_proj", norms=("ln_1", "ln_2"), heads_key="n_head",
                    kv_heads_key=None, intermediate_key="n_inner", layers_key="n_layer",
                    heads_fixed=_DERIVED_HEAD_DIM, index_dependent_flags=("scale_attn_by_inverse_layer_idx",)),
    "gpt_neox": _Family(attention="attention", qkv="attention.query_key_value", qkv_layout="per-head q,k,v",
                        o="attention.dense", mlp="mlp", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h",
                        norms=("input_layernorm", "post_attention_layernorm"), kv_heads_key=None,
                        heads_fixed=_DERIVED_HEAD_DIM, o_bias_switch=("attention_bias", "attention.")),
    # Mixtures of experts: standard attention (heads), routed experts in place of an MLP (channels refused;
    # whole experts are removed by pattern experts, expert_map.py), blocks removable with their experts.
    "mixtral": _moe_family(),
    "qwen2_moe": _moe_family(dense_blocks="mlp_only_layers"),  # o_proj hard-codes bias=False
    "qwen3_moe": _moe_family(head_norms=_HEAD_NORMS, o_bias_switch=_ATTENTION_BIAS, dense_blocks="mlp_only_layers"),
    # OLMoE's q_norm and k_norm span every head at once, sized from hidden_size.
    "olmoe": _moe_family(heads_fixed="its q_norm and k_norm normalise all heads' queries and keys together and are "
                                     "sized from hidden_size, so a model with fewer heads would not load"),
    "deepseek_v2": _moe_family(mla=True, dense_blocks="first_k_dense_replace"),
    "deepseek_v3": _moe_family(mla=True, dense_blocks="first_k_dense_replace"),
}
