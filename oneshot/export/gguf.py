"""Save a model as one GGUF file (the `gguf` package's GGUFWriter), as llama.cpp's own converter would:
llama.cpp runs it and transformers reads it.

Architectures (ARCHS): llama (Llama, SmolLM2, Mistral), qwen2, qwen3 and gemma3. Tensor names come from the
gguf package's own map for the architecture; what differs between them is declared in one table: llama's q
and k rows are permuted into llama.cpp's interleaved rotary layout (transformers' GGUF loader undoes it),
Gemma's RMSNorm multiplies by 1 + w so its norms are stored as 1 + w, and Gemma 3 in llama.cpp has its
sliding-window layers fixed at five of every six with local rope base 10000, so a Gemma 3 whose layers no
longer follow that pattern (blocks removed) is refused rather than written wrong.

Quantised layers are written as Q8_0 (int8) or Q4_0 (int4): blocks of 32 weights along the inputs, each with
a float16 scale d; Q8_0 stores the signed codes, Q4_0 the codes + 8 in nibbles (x = d * (nibble - 8)). Those
are exactly the run's symmetric grid with groups of 32 and float16 scales (the run rounds its scales to float16
when it is to be saved as GGUF), so the blocks are packed from the run's own codes and the file dequantises
to exactly the weights the run evaluated; nothing is re-quantised. With --quantize-head the head (for a tied
head, token_embd) is Q8_0 from the run's own rounding too. Every other tensor keeps the model's dtype
(F32, F16 or BF16). The tokenizer's `tokenizer.ggml.*` metadata is copied from the source GGUF when the model
came from one (the embedded models), else built from a byte-pair-encoding fast tokenizer's vocabulary and
merges when there is one, else left out (the model then loads, but llama.cpp needs a tokenizer). The lineage
card goes into `oneshot.lineage`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models import decoder_blocks, prunable_layers
from ..quantize.head import HEAD_KEY


@dataclass(frozen=True)
class GgufArch:
    name: str  # llama.cpp's architecture
    interleave_rotary: bool = False  # q/k rows into llama.cpp's interleaved pairs (its "normal" rope)
    norm_offset: float = 0.0  # added to every RMSNorm weight (Gemma's norms scale by 1 + w)
    head_length: bool = False  # write attention.key_length/value_length (head_dim not hidden / heads)
    attention_bias: bool = False  # q/k/v carry biases (Qwen2)
    swa_every: int | None = None  # llama.cpp fixes every n-th layer global, the rest sliding (Gemma 3: 6)
    swa_rope_theta: float | None = None  # and the sliding layers' rope base (Gemma 3: 10000)


ARCHS = {  # transformers' model_type -> how llama.cpp expects it
    "llama": GgufArch("llama", interleave_rotary=True),
    "mistral": GgufArch("llama", interleave_rotary=True),
    "qwen2": GgufArch("qwen2", attention_bias=True),
    "qwen3": GgufArch("qwen3", head_length=True),
    "gemma3_text": GgufArch("gemma3", norm_offset=1.0, head_length=True, swa_every=6, swa_rope_theta=10000.0),
}
GGUF_FAMILIES = tuple(ARCHS)
BLOCK = 32  # weights per Q8_0 / Q4_0 block
FILE_NAME = "model.gguf"


def pack_q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """codes int [rows, cols] in [-128, 127], scale [rows, cols/32] -> uint8 [rows, cols/32 * 34]."""
    rows, cols = codes.shape
    d = scale.to(torch.float16).numpy().view(np.uint8).reshape(rows, cols // BLOCK, 2)
    q = codes.to(torch.int8).numpy().view(np.uint8).reshape(rows, cols // BLOCK, BLOCK)
    return np.concatenate([d, q], axis=2).reshape(rows, -1)


def pack_q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """codes int [rows, cols] in [-8, 7], scale [rows, cols/32] -> uint8 [rows, cols/32 * 18]."""
    rows, cols = codes.shape
    d = scale.to(torch.float16).numpy().view(np.uint8).reshape(rows, cols // BLOCK, 2)
    q = (codes + 8).to(torch.uint8).numpy().reshape(rows, cols // BLOCK, BLOCK)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # element k in the low nibble, element k + 16 in the high one
    return np.concatenate([d, nibbles], axis=2).reshape(rows, -1)


def _rotary_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (rows only: blocks survive)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _plain(tensor: torch.Tensor):
    """A tensor stored unquantised, in its own dtype (bfloat16 goes through its raw bits)."""
    import gguf

    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    if tensor.dtype == torch.float16:
        return tensor.numpy(), gguf.GGMLQuantizationType.F16
    return tensor.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32


def unwritable(config, removes_blocks: bool = False) -> list[str]:
    """What of this model's config the GGUF writer (and llama.cpp) cannot hold, in words (empty: none);
    `removes_blocks`: the run will remove decoder blocks first."""
    arch = ARCHS[config.model_type]
    rope = _rope(config)
    found = [what for what, present in (
        ("attention biases", getattr(config, "attention_bias", False) and not arch.attention_bias),
        ("MLP biases", getattr(config, "mlp_bias", False)),
        (f"rope scaling {rope.get('rope_type')!r}", rope.get("rope_type", "default") != "default"),
    ) if present]
    window = getattr(config, "sliding_window", None)
    if not arch.swa_every and window and getattr(config, "use_sliding_window", True) and \
            window < config.max_position_embeddings:
        found.append(f"a sliding window of {window} tokens (llama.cpp's {arch.name} attends to the whole context)")
    if arch.swa_every:
        types = getattr(config, "layer_types", None) or []
        expected = ["full_attention" if (i + 1) % arch.swa_every == 0 else "sliding_attention" for i in range(len(types))]
        if types != expected:
            found.append(f"layer types other than llama.cpp's fixed {arch.name} pattern (every {arch.swa_every}th "
                         "layer global, as when blocks were removed)")
        elif removes_blocks:
            found.append(f"blocks removed from its sliding/global pattern (llama.cpp fixes every {arch.swa_every}th "
                         "layer global)")
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
        if local is not None and local != arch.swa_rope_theta:
            found.append(f"a sliding-layer rope base of {local} (llama.cpp fixes {arch.swa_rope_theta:g})")
    return found


def save_gguf(model, tokenizer, quantized: dict, lineage: dict, tmp: Path, source_gguf: str | None = None) -> Path:
    """Write tmp/model.gguf; `quantized` maps "block.layer" to grid parameters (empty: nothing quantised)."""
    import gguf

    config = model.config.get_text_config()
    arch = ARCHS[config.model_type]
    unwritten = unwritable(config)
    if unwritten:  # checked before any work; a model changed since (blocks removed) must not be written wrong
        raise ValueError(f"gguf cannot hold {', '.join(unwritten)} of this {config.model_type} model")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    path = tmp / FILE_NAME
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(str(lineage.get("model", "model")))
    writer.add_description("pruned with oneshot; lineage in oneshot.lineage")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    # llama.cpp takes a head's length as hidden / heads unless told: a model that lost heads must say it
    if arch.head_length or head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if not arch.head_length:
        writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if arch.swa_every:
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_vocab_size(model.get_input_embeddings().num_embeddings)
    head = quantized.get(HEAD_KEY)  # --quantize-head: the head's (a tied one's: the embeddings') Q8_0 codes
    grids = {params.grid.bits for key, params in quantized.items() if key != HEAD_KEY}
    writer.add_file_type({8: gguf.LlamaFileType.MOSTLY_Q8_0, 4: gguf.LlamaFileType.MOSTLY_Q4_0}.get(
        grids.pop() if len(grids) == 1 else None, gguf.LlamaFileType.ALL_F32))
    writer.add_string("oneshot.lineage", json.dumps(lineage))
    _tokenizer_metadata(writer, tokenizer, source_gguf)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name.upper()), config.num_hidden_layers)
    layers = {id(layer.weight): (index, name) for index, block in enumerate(decoder_blocks(model))
              for name, layer in prunable_layers(block).items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    output = model.get_output_embeddings()
    for hf_name, parameter in model.named_parameters(remove_duplicate=False):
        if tied and output is not None and parameter is output.weight and hf_name.startswith("lm_head"):
            continue  # llama.cpp reads the embeddings for a tied head
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"no GGUF name for {hf_name} in llama.cpp's {arch.name} architecture")
        tensor = parameter.detach().cpu()
        if arch.norm_offset and hf_name.endswith("norm.weight"):
            tensor = tensor + arch.norm_offset
        permute = None
        if arch.interleave_rotary and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = heads
        elif arch.interleave_rotary and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = kv_heads
        index_name = layers.get(id(parameter))
        params = quantized.get(f"{index_name[0]}.{index_name[1]}") if index_name else None
        if head is not None and output is not None and parameter is output.weight:
            params = head
        if params is None:
            data, kind = _plain(_rotary_permute(tensor, permute) if permute else tensor)
            writer.add_tensor(target, data, raw_dtype=kind)
            continue
        codes, scale = params.codes(tensor), params.scale  # nn.Linear keeps [outputs, inputs], as the grid does
        if permute:
            codes, scale = _rotary_permute(codes, permute), _rotary_permute(scale, permute)
        pack, kind = ((pack_q8_0, gguf.GGMLQuantizationType.Q8_0) if params.grid.bits == 8
                      else (pack_q4_0, gguf.GGMLQuantizationType.Q4_0))
        writer.add_tensor(target, pack(codes, scale), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def _rope(config) -> dict:
    """The (global layers') rope parameters, whichever way the config keeps them."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "full_attention" in rope:  # per layer type (Gemma 3): the global layers'
        rope = dict(rope["full_attention"])
    if getattr(config, "rope_theta", None) is not None:
        rope.setdefault("rope_theta", config.rope_theta)
    return rope


def _tokenizer_metadata(writer, tokenizer, source_gguf: str | None) -> None:
    import gguf

    if source_gguf:
        reader = gguf.GGUFReader(source_gguf)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                main = field.types[0]
                sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), main, sub)
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    model = json.loads(backend.to_str()).get("model", {})
    if model.get("type") != "BPE":
        return
    vocab = sorted(model["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_merges(merges)
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            add(value)
