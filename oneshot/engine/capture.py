"""Catching what a model feeds its decoder blocks, and replaying a block on those inputs.

The model runs up to its blocks once; every block is replaced by a recorder that logs its
arguments (attention masks, position ids, rotary (cos, sin), cache position: whatever the family
passes) and hands the hidden state on. No family needs code of its own here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import decoder_blocks, materialised


class Caught(Exception):
    """Raised to stop a forward early: nothing after this point is needed."""


class _Recorder(nn.Module):
    """Stands in for a decoder block during capture: logs its call and passes the hidden state on."""

    def __init__(self, block: nn.Module, index: int, calls: list, first_inputs: list, last: bool):
        super().__init__()
        # Kept outside _modules so that model.to(device) leaves the real block where it is.
        object.__setattr__(self, "wrapped", block)
        self.index, self.calls, self.first_inputs, self.last = index, calls, first_inputs, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.index == 0:
            self.first_inputs.append(hidden_states)
        if self.last:
            raise Caught
        return hidden_states

    def __getattr__(self, name):  # the model may read block attributes such as attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # the current block's input, one tensor per chunk
    calls: list[list[tuple]]  # calls[block][chunk] = (args, kwargs) the model passed that block
    dense: list[torch.Tensor] | None = None  # --asymmetric: the dense model's input to the current block


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device, batch_size: int, offload: bool) -> BlockInputs:
    """Run the model up to its blocks on `device` and keep every block's inputs; the blocks stay put."""
    blocks = decoder_blocks(model)
    originals = list(blocks)
    calls = [[] for _ in originals]
    first_inputs: list[torch.Tensor] = []
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, calls[i], first_inputs, last=i == len(originals) - 1)
    try:
        model.to(device)  # embeddings, rotary tables, final norm: everything but the blocks
        for chunk in input_ids.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except Caught:
                pass
    finally:
        model.to("cpu")
        for i, block in enumerate(originals):
            blocks[i] = block
    return BlockInputs([store(h, offload) for h in first_inputs], calls)


def store(x: torch.Tensor, offload: bool) -> torch.Tensor:
    """Where activations wait between blocks: on the device, or in pinned host memory."""
    if offload and x.is_cuda:
        return x.to("cpu", non_blocking=False).pin_memory()
    return x


def forward_block(block: nn.Module, hidden: torch.Tensor, call, device) -> torch.Tensor:
    args, kwargs = call
    out = block(hidden.to(device, non_blocking=True), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return tuples


class _Replay(nn.Module):
    """Stands in for a decoder block when the blocks have already run: passes the hidden state on, and
    the last one hands over the block stack's output for this chunk, so the model's head reads it."""

    def __init__(self, block: nn.Module, outputs, last: bool):
        super().__init__()
        object.__setattr__(self, "wrapped", block)
        self.outputs, self.last = outputs, last

    def forward(self, hidden_states, *args, **kwargs):
        return next(self.outputs) if self.last else hidden_states

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)


@torch.no_grad()
def streamed_logits(model: nn.Module, input_ids: torch.Tensor, device, batch_size: int, progress: bool = False):
    """The model's logits for each batch of `input_ids`, running every batch through one block at a
    time (each block read once, for a model whose blocks stay on disk)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    inputs = capture_block_inputs(model, input_ids, device, batch_size, offload=False)
    blocks = decoder_blocks(model)
    for index in tqdm(range(len(blocks)), desc="perplexity", unit="block", disable=not progress, leave=False):
        with materialised(model, index) as block:
            block.to(device)
            try:
                inputs.hidden = [forward_block(block, h, call, device) for h, call in zip(inputs.hidden, inputs.calls[index])]
            finally:
                block.to("cpu")
    outputs = iter(inputs.hidden)
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Replay(block, outputs, last=i == len(originals) - 1)
    try:
        model.to(device)
        for chunk in input_ids.split(batch_size):
            yield model(input_ids=chunk.to(device), use_cache=False).logits
    finally:
        model.to("cpu")
        for i, block in enumerate(originals):
            blocks[i] = block
