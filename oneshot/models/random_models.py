"""Random models: presets with the real shapes of public checkpoints (and tiny ones for tests), built
with seeded random weights, and the byte tokenizer they read text with.

They need no download: `load_model` (loading.py) opens a preset as `random:<preset>`, for speed work and
tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .lazy import default_dtype as _default_dtype


# Real shapes of public checkpoints, plus tiny ones for tests. Values are config keyword arguments.
_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
PRESETS: dict[str, tuple[str, dict]] = {
    "llama-2-7b": ("llama", dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32)),
    "llama-2-13b": ("llama", dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40)),
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "opt-1.3b": ("opt", dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                             num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048)),
    "opt-125m": ("opt", dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768)),
}
_TINY_IDS = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_TINY_ATTN = dict(_TINY_IDS, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=256)
TINY_PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("llama", dict(_TINY_ATTN, intermediate_size=128, num_key_value_heads=2)),
    "tiny-mistral": ("mistral", dict(_TINY_ATTN, intermediate_size=128, num_key_value_heads=2, sliding_window=16)),
    "tiny-qwen2": ("qwen2", dict(_TINY_ATTN, intermediate_size=128, num_key_value_heads=2)),
    "tiny-qwen3": ("qwen3", dict(_TINY_ATTN, intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "tiny-gemma": ("gemma", dict(_TINY_ATTN, intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "tiny-gemma2": ("gemma2", dict(_TINY_ATTN, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                   sliding_window=16)),
    "tiny-gemma3": ("gemma3_text", dict(_TINY_ATTN, num_hidden_layers=3, intermediate_size=128,
                                        num_key_value_heads=2, head_dim=16, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # Gemma 3 270M's shape in small: four query heads sharing one KV head, tied embeddings, q/k norms,
    # five sliding layers then a global one (the real one's pattern, which llama.cpp fixes for gemma3).
    "tiny-gemma3-1kv": ("gemma3_text", dict(_TINY_ATTN, num_hidden_layers=6, intermediate_size=128,
                                            num_key_value_heads=1, head_dim=16, sliding_window=16,
                                            layer_types=["sliding_attention"] * 5 + ["full_attention"])),
    "tiny-phi3": ("phi3", dict(_TINY_ATTN, intermediate_size=128, num_key_value_heads=2)),
    "tiny-opt": ("opt", dict(_TINY_IDS, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=64)),
    "tiny-gpt2": ("gpt2", dict(_TINY_IDS, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "tiny-gpt-neox": ("gpt_neox", dict(_TINY_IDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256)),
}
# Mixture-of-experts families (transformers 5 fused experts: each expert is pruned as its own layers).
# Kept apart from TINY_PRESETS, which the dense-family tests (structure map included) walk.
# 4096 positions (OLMoE's; the others have more), so that the default --seqlen 2048 applies to them as it is.
_TINY_MOE = dict(_TINY_ATTN, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=4096)
_TINY_MLA = dict(_TINY_MOE, num_key_value_heads=4, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128,
                 moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
TINY_MOE_PRESETS: dict[str, tuple[str, dict]] = {
    "tiny-mixtral": ("mixtral", dict(_TINY_MOE, intermediate_size=32, num_local_experts=8)),
    "tiny-qwen2-moe": ("qwen2_moe", dict(_TINY_MOE, intermediate_size=128, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_experts=8)),
    "tiny-qwen3-moe": ("qwen3_moe", dict(_TINY_MOE, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                                         num_experts=8)),
    "tiny-olmoe": ("olmoe", dict(_TINY_MOE, intermediate_size=32, num_experts=8)),
    # DeepSeek style: shared + routed experts, the first block dense, multi-head latent attention.
    "tiny-deepseek-v2": ("deepseek_v2", dict(_TINY_MLA)),
    "tiny-deepseek-v3": ("deepseek_v3", dict(_TINY_MLA, n_group=2, topk_group=1)),
}
PRESETS.update(TINY_PRESETS)
PRESETS.update(TINY_MOE_PRESETS)


BYTE_TOKENIZER_FILE = "oneshot_byte_tokenizer.json"


class ByteTokenizer:
    """Text -> UTF-8 bytes as token ids (0..255): lets random models read real text offline."""

    name_or_path = "bytes"
    vocab_size = 256
    eos_token_id = None

    def __call__(self, text, **_):
        return _Encoding([list(text.encode("utf-8"))] if isinstance(text, list) else list(text.encode("utf-8")))

    def decode(self, ids, **_):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save_pretrained(self, directory):
        """A marker file: the byte mapping is fixed, and oneshot loads a model directory holding this
        file with a ByteTokenizer (`oneshot eval --pruned DIR` of a random: model)."""
        path = Path(directory) / BYTE_TOKENIZER_FILE
        path.write_text(json.dumps({"tokenizer": "utf-8 bytes", "vocab_size": self.vocab_size}) + "\n")
        return (str(path),)


class _Encoding(dict):
    def __init__(self, ids):
        super().__init__(input_ids=ids)
        self.input_ids = ids


def build_random_model(preset: str, dtype: torch.dtype, seed: int = 0, on_disk: bool = False) -> nn.Module:
    """A model with a preset's real shapes and seeded random weights, created directly in `dtype`.

    The tiny presets are drawn whole from `seed`. The real-shape ones are drawn block by block (block i
    from its own seed, lazy.block_seed), so that they come out the same whether built whole or, with
    `on_disk`, one block at a time as the engine reaches it (a 13B model in a few GiB of memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = PRESETS[preset]
    config = AutoConfig.for_model(model_type, **kwargs)
    if preset not in TINY_PRESETS and preset not in TINY_MOE_PRESETS:
        from .lazy import random_model

        return random_model(config, dtype, seed, keep_on_disk=on_disk)
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _experts_for_dtype(model, dtype)
    if on_disk:  # a tiny model streamed as if from disk (tests of that path): its values do not change
        from .lazy import hold_aside

        hold_aside(model)
    return model.eval()


def _experts_for_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Fused experts run through torch's grouped matmul by default, which has no float64 kernel: a
    float64 mixture of experts (numerical studies) runs transformers' eager expert loop instead."""
    if dtype == torch.float64 and hasattr(model, "set_experts_implementation") and \
            getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")
