"""Writing pruned models: the Hugging Face checkpoint with its lineage card (hf.py), and for quantised
models the compressed-tensors checkpoint (compressed_tensors.py) or one GGUF file (gguf.py).
`check_format` says before any work whether a model and a grid can be written in a format."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UsageError, require
from ..settings import spelled
from ..spec import FORMATS
from .hf import directory_bytes, lineage_card, read_lineage, save_model

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


class ExportError(UsageError):
    """A model or grid that the chosen format cannot hold; the message says what to change."""


def check_settings(spec) -> None:
    """The save format's own settings: it says how --save-model writes, and compressed-tensors packs codes."""
    flag = spelled("format")
    if spec.format != "hf" and not spec.save_model:
        raise ExportError(f"{flag} {spec.format} says how to save the model: give {spelled('save_model')} DIR too")
    if spec.format == "compressed-tensors" and spec.quantize is None:
        raise ExportError(f"{flag} compressed-tensors stores quantised weights; add {spelled('quantize')} int8|int4, "
                          f"or save with {flag} hf")


def check_format(model, format: str, grid, removes_blocks: bool = False) -> None:
    """Against the model's architecture (a skeleton will do), the run's grid (None: not quantised) and
    whether the run removes whole blocks (which changes what some architectures can hold)."""
    from ..models import decoder_blocks, prunable_layers

    flag = spelled("format")
    if format == "hf":
        return
    if format == "gguf":
        from .gguf import BLOCK, GGUF_FAMILIES, unwritable

        family = getattr(model.config, "model_type", type(model).__name__)
        if family not in GGUF_FAMILIES:
            raise ExportError(f"{flag} gguf writes the {', '.join(GGUF_FAMILIES)} families (the architectures "
                              f"llama.cpp reads), and this model is {family}; save it with {flag} hf or "
                              "compressed-tensors")
        unwritten = unwritable(model.config.get_text_config(), removes_blocks)
        if unwritten:
            raise ExportError(f"{flag} gguf: this writer does not store {', '.join(unwritten)} of this {family} "
                              f"model; save it with {flag} hf")
        require("gguf", f"{flag} gguf", "quant")
        if grid is not None and not (grid.symmetric and grid.group_size == BLOCK):
            raise ExportError(f"{flag} gguf stores int{grid.bits} as Q{grid.bits}_0: symmetric blocks of {BLOCK} "
                              f"weights; add {spelled('symmetric')} {spelled('group_size')} {BLOCK}")
        return
    require("compressed_tensors", f"{flag} compressed-tensors", "quant", "compressed-tensors")
    if not grid.symmetric:
        # compressed-tensors 0.20 packs asymmetric zero points on save, but transformers' loader expects them
        # unpacked, so such a checkpoint does not load; symmetric grids load exactly.
        raise ExportError(f"{flag} compressed-tensors: transformers cannot load asymmetric pack-quantized "
                          f"checkpoints (compressed-tensors 0.20); add {spelled('symmetric')}")
    for block in decoder_blocks(model):
        for layer_name, layer in prunable_layers(block).items():
            if type(layer) is not nn.Linear:
                raise ExportError(f"{flag} compressed-tensors packs nn.Linear layers; {layer_name} is a "
                                  f"{type(layer).__name__} (fused experts or Conv1D); save with {flag} hf")


def save_in_format(model, tokenizer, record: dict, directory: str | Path, format: str = "hf",
                   quantized: dict | None = None, source_gguf: str | None = None) -> dict:
    """Save in `format`; returns {"format", "bytes" (the whole directory), "weights_bytes"}."""
    quantized = quantized or {}
    write = None
    if format == "compressed-tensors":
        from .compressed_tensors import save_compressed_tensors

        def write(tmp, _lineage):
            save_compressed_tensors(model, quantized, record, tmp)
    elif format == "gguf":
        from .gguf import save_gguf

        def write(tmp, lineage):
            save_gguf(model, tokenizer, quantized, lineage, tmp, source_gguf)
    save_model(model, tokenizer, record, directory, write)
    weights = sum(p.stat().st_size for p in Path(directory).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return {"format": format, "bytes": directory_bytes(directory), "weights_bytes": weights}


__all__ = ["save_model", "save_in_format", "lineage_card", "read_lineage", "directory_bytes", "check_format", "check_settings", "ExportError", "FORMATS"]
