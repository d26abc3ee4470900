"""Save a model as one GGUF file (the `gguf` package's GGUFWriter): llama.cpp and transformers read it.

The llama architecture only (Llama, SmolLM2 and other models with model_type "llama"). Quantised
layers are written as Q8_0 (int8) or Q4_0 (int4): blocks of 32 weights along the inputs, each with a
float16 scale d; Q8_0 stores the signed codes, Q4_0 the codes + 8 in nibbles (x = d * (nibble - 8)).
Those are exactly the run's symmetric grid with groups of 32 and float16 scales (the run rounds its
scales to float16 when it is to be saved as GGUF), so the blocks are packed from the run's own codes and
the file dequantises to exactly the weights the run evaluated; nothing is re-quantised. Every other
tensor (embeddings, norms, an untied LM head) keeps the model's dtype (F32, F16 or BF16).

q and k rows are permuted into llama.cpp's rotary layout (pairs interleaved per head), as its own
converter does and as transformers' GGUF loader undoes. The tokenizer's `tokenizer.ggml.*` metadata is
copied from the source GGUF when the model came from one (the embedded SmolLM2), else built from a
byte-pair-encoding fast tokenizer's vocabulary and merges when there is one, else left out (the
model then loads, but llama.cpp needs a tokenizer). The lineage card goes into `oneshot.lineage`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..models import decoder_blocks, prunable_layers

GGUF_FAMILIES = ("llama",)
BLOCK = 32  # weights per Q8_0 / Q4_0 block
LAYER_NAMES = {  # HF layer name inside a block -> GGUF tensor name inside blk.N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
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


def save_gguf(model, tokenizer, quantized: dict, lineage: dict, tmp: Path, source_gguf: str | None = None) -> Path:
    """Write tmp/model.gguf; `quantized` maps "block.layer" to grid parameters (empty: nothing quantised)."""
    import gguf

    config = model.config.get_text_config()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    path = tmp / FILE_NAME
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(str(lineage.get("model", "model")))
    writer.add_description("pruned with oneshot; lineage in oneshot.lineage")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(model.get_input_embeddings().num_embeddings)
    grids = {params.grid.bits for params in quantized.values()}
    writer.add_file_type({8: gguf.LlamaFileType.MOSTLY_Q8_0, 4: gguf.LlamaFileType.MOSTLY_Q4_0}.get(
        grids.pop() if len(grids) == 1 else None, gguf.LlamaFileType.ALL_F32))
    writer.add_string("oneshot.lineage", json.dumps(lineage))
    _tokenizer_metadata(writer, tokenizer, source_gguf)

    data, kind = _plain(model.get_input_embeddings().weight)
    writer.add_tensor("token_embd.weight", data, raw_dtype=kind)
    for index, block in enumerate(decoder_blocks(model)):
        layers = prunable_layers(block)
        for name, module in block.named_modules():
            if name not in LAYER_NAMES:
                continue
            weight = module.weight.detach().cpu()
            params = quantized.get(f"{index}.{name}") if name in layers else None
            permute = {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}.get(name)
            target = f"blk.{index}.{LAYER_NAMES[name]}.weight"
            if params is None:
                data, kind = _plain(_rotary_permute(weight, permute) if permute else weight)
                writer.add_tensor(target, data, raw_dtype=kind)
                continue
            codes, scale = params.codes(weight), params.scale
            if permute:
                codes, scale = _rotary_permute(codes, permute), _rotary_permute(scale, permute)
            pack, kind = ((pack_q8_0, gguf.GGMLQuantizationType.Q8_0) if params.grid.bits == 8
                          else (pack_q4_0, gguf.GGMLQuantizationType.Q4_0))
            writer.add_tensor(target, pack(codes, scale), raw_dtype=kind)
    data, kind = _plain(model.model.norm.weight)
    writer.add_tensor("output_norm.weight", data, raw_dtype=kind)
    if not getattr(model.config, "tie_word_embeddings", False):
        data, kind = _plain(model.get_output_embeddings().weight)
        writer.add_tensor("output.weight", data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


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
