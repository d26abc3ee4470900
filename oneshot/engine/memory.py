"""Memory: batch sizes, and the estimate that stops a run early, naming the flag to change."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import RunError
from ..methods import Pattern
from ..models import ExpertProjection, decoder_blocks, get_weight, prunable_layers
from ..settings import spelled


class ResourceError(RunError):
    """Not enough device or host memory for the requested run; the message names the flag to change."""


def default_batch_size(model: nn.Module, seqlen: int, device="cpu") -> int:
    """Sequences per block forward: enough to keep the device busy, few enough to bound scratch memory.
    A GPU wants large batches (16k tokens); a CPU is fastest at ~4k tokens, whose activations stay
    in cache (SmolLM2 block, 32 x 1024 tokens, 2 cores: 1.70 s per pass at 4k vs 2.09 s at 16k)."""
    tokens_per_batch = 16384 if torch.device(device).type == "cuda" else 4096
    return max(1, tokens_per_batch // seqlen)


def activations_fit(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> bool:
    """Two copies of the hidden states (inputs and outputs) should take at most a third of free memory."""
    hidden_size = model.config.get_text_config().hidden_size
    element = next(model.parameters()).element_size()
    needed = 2 * input_ids.numel() * hidden_size * element
    free, _total = torch.cuda.mem_get_info(device)
    return needed < free / 3


def check_pattern(model: nn.Module, pattern: Pattern) -> None:
    """Fail before any work if an N:M pattern does not fit some layer's input width."""
    if pattern.is_nm:
        for block in decoder_blocks(model):
            for name, layer in prunable_layers(block).items():
                pattern.check_width(get_weight(layer).shape[1], name)



def check_memory(model: nn.Module, nsamples: int, seqlen: int, device, batch_size: int | None = None) -> dict:
    """Estimate the run's working memory and fail early, naming the flag to change, if it cannot fit.

    The one-block bound (bytes): what one block visit adds on the device on top of the activations, for
    the heaviest default method (SparseGPT; Wanda and magnitude need less):

        block = W + S + C
        W = sum of the largest block's parameters x their element size e        (its weights)
        S = 4 x (2 x (F4 + Fe) + 8 x f_max^2)                                   (fp32 statistics)
            F4 = sum of f^2 over the 4 widest layer inputs f (a dense block reads at most 4 distinct
                 inputs: attention in and out, MLP in and inner; q/k/v share one Hessian, gate/up one)
            Fe = sum of f^2 over the distinct expert inputs (each expert's gate/up share one)
            one f x f Hessian per distinct input, held until the block is pruned, and the inverse factor
            prepared from each beside it (2x); while the widest is factorised, about 8 f_max^2 transient
            copies (its value, the damped copy, identity, Cholesky factor, inverse, upper factor, ...)
        C = b x s x (12 h + a x s) x max(e, 4)                                  (one chunk's scratch)
            b = sequences per forward (min(batch size, nsamples)), s = seqlen, h = hidden size,
            a = attention heads

        activations = 2 x n x s x h x e   (the block's inputs and outputs for n sequences; on the device
                                          when they take under a third of its free memory, else pinned host)

    So a visit's peak is at most activations + block (tests/test_memory_bound.py measures it on the CPU
    for two shapes; on a GPU benchmarks/gpu_check.py records it beside torch.cuda.max_memory_allocated).
    Returns the terms in GiB: activations_gib, block_gib (= weights_gib + statistics_gib + scratch_gib).
    """
    device = torch.device(device)
    config = model.config.get_text_config()
    hidden = config.hidden_size
    element = next(model.parameters()).element_size()
    batch_size = batch_size or default_batch_size(model, seqlen, device)
    # The largest block (a DeepSeek-style model's first blocks are dense, the rest mixtures of experts).
    block = max(decoder_blocks(model), key=lambda b: sum(p.numel() for p in b.parameters()))
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    layers = prunable_layers(block)
    widths = sorted((get_weight(layer).shape[1] for layer in layers.values()
                     if not isinstance(layer, ExpertProjection)), reverse=True)
    # One fp32 [in, in] Hessian per distinct input (the 4 widest inputs bound a dense block's), plus one per
    # expert input (its gate and up share one, as they read one tensor): experts never share inputs.
    expert_inputs = {(id(layer.experts), layer.index, layer.parameter): get_weight(layer).shape[1]
                     for layer in layers.values() if isinstance(layer, ExpertProjection)}
    widest = max(widths[:1] + list(expert_inputs.values()))
    hessians = sum(width ** 2 for width in widths[:4]) + sum(width ** 2 for width in expert_inputs.values())
    statistics = (2 * hessians + 8 * widest * widest) * 4  # each with its inverse factor; the widest's factorisation
    heads = getattr(config, "num_attention_heads", 1)
    chunk = min(batch_size, nsamples)  # the engine forwards input_ids.split(batch_size)
    scratch = chunk * seqlen * (12 * hidden + heads * seqlen) * max(element, 4)
    activations = 2 * nsamples * seqlen * hidden * element
    gib = 2 ** 30
    estimate = {"activations_gib": activations / gib, "block_gib": (block_bytes + statistics + scratch) / gib,
                "weights_gib": block_bytes / gib, "statistics_gib": statistics / gib, "scratch_gib": scratch / gib}
    on_host = activations if device.type == "cpu" else 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if block_bytes + statistics + scratch > 0.9 * free:
            raise ResourceError(f"one block needs about {(block_bytes + statistics + scratch) / gib:.1f} GiB on "
                                f"{device} but {free / gib:.1f} GiB is free; lower {spelled('batch_size')} "
                                f"(now {batch_size})")
        if activations >= free / 3:
            on_host = activations  # the engine keeps them in pinned host memory
    from ..models.lazy import available_host_bytes

    available = available_host_bytes()
    needed = on_host + (scratch if device.type == "cpu" else 0)
    if available is not None and needed > 0.9 * available:
        raise ResourceError(f"calibration activations need about {needed / gib:.1f} GiB of host memory "
                            f"({nsamples} x {seqlen} tokens x {hidden} features) but {available / gib:.1f} GiB "
                            f"is available; lower {spelled('calibration.nsamples')} or {spelled('calibration.seqlen')}")
    return estimate
