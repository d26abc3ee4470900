"""The output head quantised after the blocks (--quantize-head), as llama.cpp's own quantiser does.

The head is not a block layer, so no method prunes it and no calibration reaches it: each (row, group of 32
inputs) is rounded to nearest on a fixed grid, int8 symmetric with float16 scales, which is exactly GGUF's
Q8_0. llama.cpp keeps the head finer than the blocks (its Q4_0 files hold a 6-bit head) because every token's
logits pass through it; Q8_0 is the finest block format oneshot packs from its own codes. A tied head is the
input embedding as well: both then read the rounded values, as both read the one tensor in the file.
"""
from __future__ import annotations

import torch

from .grid import Grid, QuantizationError, QuantizedWeight, rtn

HEAD_KEY = "head"  # its entry among the quantised layers ("block.layer" keys otherwise)


def head_grid(scale_dtype: torch.dtype | None = torch.float16) -> Grid:
    return Grid(8, 32, True, scale_dtype)


def check_head(skeleton, flag: str) -> None:
    """Before any work: the model has an output head whose inputs split into whole groups of 32."""
    head = skeleton.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise QuantizationError(f"{flag}: this model has no output head to quantise; leave it out")
    width = head.weight.shape[1]
    if width % head_grid().group_size:
        raise QuantizationError(f"{flag}: the head's {width} inputs do not split into groups of "
                                f"{head_grid().group_size}; leave it out")


def quantize_head(model) -> QuantizedWeight:
    """Round the head's weight onto head_grid() in place; its grid parameters, for export."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        quantised, params = rtn(head.weight.data, head_grid())
        head.weight.data.copy_(quantised)
    return params
