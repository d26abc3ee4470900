"""The passes over the dense model that some criteria need before anything is removed.

- `first_order`: a backward pass of the calibration loss through the whole model (taylor, gradient).
  The loss of a batch is the sum over its sequences of each sequence's mean next-token NLL, so that
  one backward pass gives every sequence's own gradient where the gradient criterion needs it
  (sequences do not interact in a causal LM). The whole model sits on the device, with gradients
  for the decoder blocks' linear weights (taylor) or for the activations only (gradient).
- `hidden_states`: block inputs and outputs on the calibration windows, block by block through the
  engine's capture (block-influence, angular).

Both return scores per block; scores.py holds the maths, the structure map says which rows and
columns belong to which unit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engine.capture import capture_block_inputs, forward_block, store
from ..engine.memory import activations_fit, default_batch_size
from ..models import COLS, decoder_blocks, get_weight, layer_parameter, prunable_layers, weight_matrix
from . import scores as S


def _grad(layer: nn.Module) -> torch.Tensor:
    """The weight's gradient as [outputs, inputs], like get_weight (an expert's: its rows of the fused one)."""
    return weight_matrix(layer, layer_parameter(layer).grad)


def _consumer(coupling):
    """The member whose input columns are the units: o_proj for heads, down_proj for channels."""
    return next(m for m in coupling.members if m.axis == COLS)


def _sequence_loss(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    """Sum over the batch's sequences of each one's mean next-token NLL."""
    logits = model(input_ids=chunk, use_cache=False).logits
    nll = F.cross_entropy(S.at_least_fp32(logits[:, :-1].flatten(0, 1)), chunk[:, 1:].flatten(), reduction="none")
    return nll.view(chunk.shape[0], -1).mean(dim=1).sum()


def first_order(model: nn.Module, smap, kinds: list[str], ids: torch.Tensor, criterion: str, device="cpu",
                batch_size: int | None = None, progress: bool = True) -> list[dict]:
    """Per block, {kind: scores} for kinds among "heads", "channels" (scores per unit) and "blocks"
    (one score for the block); criterion "taylor" or "gradient"."""
    device = torch.device(device)
    blocks = decoder_blocks(model)
    # A backward pass holds every activation of a batch and the logits twice over: about 1k tokens per
    # batch keeps SmolLM2-135M near 4 GiB of host memory (2k tokens: 6.5 GiB).
    batch_size = batch_size or max(1, min(default_batch_size(model, ids.shape[1], device), 1024 // ids.shape[1]))
    couplings = {kind: smap.coupling(kind) for kind in kinds if kind != "blocks"}
    totals = [dict.fromkeys(kinds, 0.0) for _ in blocks]
    flags = {param: param.requires_grad for param in model.parameters()}
    handles, sequences = [], [0]
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        if criterion == "taylor":
            for block in blocks:
                for layer in prunable_layers(block).values():
                    layer_parameter(layer).requires_grad_(True)
        else:
            # Activation gradients only: start the graph at the embeddings' output.
            handles.append(model.get_input_embeddings().register_forward_hook(
                lambda _m, _i, out: out.detach().requires_grad_(True)))
            for index, block in enumerate(blocks):
                layers = prunable_layers(block)
                for kind, coupling in couplings.items():
                    handles.append(layers[_consumer(coupling).layer].register_forward_pre_hook(
                        _gate_hook(totals[index], kind, _consumer(coupling).indices, sequences)))
                if "blocks" in kinds:
                    handles.append(block.register_forward_hook(_block_gate_hook(totals[index], sequences),
                                                               with_kwargs=True))
        model.to(device)
        with torch.enable_grad():
            for chunk in tqdm(ids.split(batch_size), desc=criterion, unit="batch", disable=not progress, leave=False):
                sequences[0] = chunk.shape[0]  # the gate hooks split their sums per sequence
                _sequence_loss(model, chunk.to(device)).backward()
        if criterion == "taylor":
            for index, block in enumerate(blocks):
                layers = prunable_layers(block)
                for kind, coupling in couplings.items():
                    totals[index][kind] = S.taylor(
                        [(get_weight(layers[m.layer]), _grad(layers[m.layer]), m.axis, m.indices)
                         for m in coupling.members])
                if "blocks" in kinds:
                    totals[index]["blocks"] = S.block_taylor((get_weight(layer), _grad(layer))
                                                             for layer in layers.values())
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.grad = None
            param.requires_grad_(flag)
        model.to("cpu")
    return [{kind: _cpu(value) for kind, value in block.items()} for block in totals]


def _cpu(value):
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)


def _gate_hook(totals: dict, kind: str, index: torch.Tensor, sequences: list):
    def hook(_module, inputs):
        x = inputs[0]
        if not x.requires_grad:
            return
        seen = x.detach()
        batch = sequences[0]

        def on_grad(grad):
            # Some blocks flatten [batch, tokens] before their MLP (OPT): restore the sequences.
            per_sequence = S.gate_gradients(seen.reshape(batch, -1, seen.shape[-1]),
                                            grad.reshape(batch, -1, grad.shape[-1]), index)
            totals[kind] = totals[kind] + per_sequence.abs().sum(dim=0)

        x.register_hook(on_grad)
    return hook


def _block_gate_hook(totals: dict, sequences: list):
    def hook(_module, args, kwargs, output):
        inp = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        if not out.requires_grad:
            return
        branch = (out - inp).detach()  # the block's contribution to the residual stream
        batch = sequences[0]

        def on_grad(grad):
            per_sequence = S.branch_gate_gradients(branch.reshape(batch, -1), grad.reshape(batch, -1))
            totals["blocks"] = totals["blocks"] + float(per_sequence.abs().sum())

        out.register_hook(on_grad)
    return hook


@torch.no_grad()
def hidden_states(model: nn.Module, ids: torch.Tensor, device="cpu", batch_size: int | None = None,
                  progress: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(influence [blocks]: 1 - mean cosine of each block's input and output over all tokens,
    last-token states: the input of every block and the last block's output, each [sequences, hidden])."""
    device = torch.device(device)
    batch_size = batch_size or default_batch_size(model, ids.shape[1], device)
    offload = device.type == "cuda" and not activations_fit(model, ids, device)
    inputs = capture_block_inputs(model, ids, device, batch_size, offload)
    blocks = decoder_blocks(model)
    influence = torch.zeros(len(blocks), dtype=torch.float64)
    states = [torch.cat([h[:, -1].float().cpu() for h in inputs.hidden])]
    for index in tqdm(range(len(blocks)), desc="hidden states", unit="block", disable=not progress, leave=False):
        block = blocks[index].to(device)
        try:
            outputs, cos_sum, tokens = [], 0.0, 0
            for hidden, call in zip(inputs.hidden, inputs.calls[index]):
                out = forward_block(block, hidden, call, device)
                cos = S.cosine(hidden.to(device), out)
                cos_sum, tokens = cos_sum + float(cos.sum(dtype=torch.float64)), tokens + cos.numel()
                outputs.append(store(out, offload))
            influence[index] = 1.0 - cos_sum / tokens
            inputs.hidden = outputs
            states.append(torch.cat([h[:, -1].float().cpu() for h in outputs]))
        finally:
            block.to("cpu")
    return influence, states
