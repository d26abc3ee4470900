"""Save a quantised (and pruned) model in the compressed-tensors format that transformers and vLLM read.

The `compressed-tensors` library does the packing: each quantised linear layer's integer codes are
packed into int32 words (`weight_packed`, the `pack-quantized` format, int4 and int8 alike), beside
its per-group `weight_scale` (and `weight_zero_point` for an asymmetric grid), and config.json gets
the library's `quantization_config`. Nothing here re-quantises: the codes are those of the run's grid,
so `AutoModelForCausalLM.from_pretrained(DIR)` (with compressed-tensors installed) decompresses to
exactly the weights the run evaluated. The library (0.20) no longer writes a sparsity config, so the
sparsity is recorded under `quantization_config.sparsity_config` as its dense sparsity config
(`format: dense`, `global_sparsity`, `sparsity_structure`), and in the lineage card.

The in-memory model is not changed: the compressed state dict is built beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models import decoder_blocks, prunable_layers


def quantized_modules(model) -> dict[str, str]:
    """Prunable layer key ("3.self_attn.q_proj") -> the module's full name in the model."""
    names = {id(module): name for name, module in model.named_modules()}
    found = {}
    for index, block in enumerate(decoder_blocks(model)):
        for name, layer in prunable_layers(block).items():
            found[f"{index}.{name}"] = names[id(layer)]
    return found


def _scheme(grid):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = "channel" if grid.group_size is None else "group"
    args = QuantizationArgs(num_bits=grid.bits, type="int", symmetric=grid.symmetric, strategy=strategy,
                            group_size=grid.group_size, zp_dtype=None if grid.symmetric else torch.int8)
    return QuantizationScheme(targets=["Linear"], weights=args)


def compressed_state_dict(model, quantized: dict) -> tuple[dict, dict]:
    """(state dict with every quantised layer packed by the library, quantization_config for config.json)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    grids = {params.grid for params in quantized.values()}
    if len(grids) != 1:
        raise ValueError(f"one grid per model is expected, found {len(grids)}")
    grid = grids.pop()
    scheme = _scheme(grid)
    modules = quantized_modules(model)
    state = {key: value.detach() for key, value in model.state_dict().items()}
    for key, params in quantized.items():
        module = modules[key]
        weight = state.pop(f"{module}.weight")
        scale = params.scale.to(weight.dtype)
        local = {"weight": weight, "weight_scale": scale}
        if not grid.symmetric:
            # the library's codes are signed ([-8, 7] for int4); ours for an asymmetric grid are [0, 15]
            local["weight_zero_point"] = (params.zero - 2 ** (grid.bits - 1)).to(torch.int8)
        packed = PackedQuantizationCompressor.compress(local, scheme)
        state.update({f"{module}.{name}": value for name, value in packed.items()})
    ignore = sorted(name for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and name not in set(modules.values()))
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
    return state, config


def save_compressed_tensors(model, quantized: dict, record: dict, tmp: Path) -> None:
    """Write the model into `tmp` (config, packed safetensors); the caller adds tokenizer and card."""
    import compressed_tensors
    from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_CONFIG_NAME,
                                         QUANTIZATION_METHOD, QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME)

    state, config = compressed_state_dict(model, quantized)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    path = tmp / "config.json"
    data = json.loads(path.read_text())
    pattern = record.get("pattern", "unstructured")
    data[QUANTIZATION_CONFIG_NAME] = {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: {"format": "dense", "global_sparsity": record.get("sparsity_measured", 0.0),
                               "sparsity_structure": pattern if pattern != "dense" else "unstructured",
                               "targets": ["Linear"], "ignore": config.ignore},
        **config.model_dump(exclude=["quant_method"]),
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
