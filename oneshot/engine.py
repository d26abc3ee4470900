"""The layer-by-layer streaming pass that every method shares.

1. Catch what the model feeds its decoder blocks: block 0's hidden states, and every block's
   other arguments (attention masks, position ids, rotary (cos, sin), ...), whatever the family.
2. For each block: move it to the device, feed its linear layers' inputs to the method's
   statistic (one accumulator per distinct input tensor: q/k/v share one), ask the method for
   each new weight, re-run the pruned block to make the next block's inputs, move it back.

The engine knows nothing of any method's maths: a method is a statistic class plus a function
(weight, statistic, sparsity, pattern) -> (weight, mask, info). Only one block is ever on the device.
"""
from __future__ import annotations

import hashlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .methods import Method, NumericsError, Pattern
from .models import decoder_blocks, get_weight, prunable_layers, set_weight


@dataclass
class PruneReport:
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # "block.layer" -> zeros / numel
    layer_info: dict[str, dict] = field(default_factory=dict)  # what a method noted per layer (damping, ...)
    zeros: int = 0
    numel: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def record(self, name: str, weight: torch.Tensor, info: dict | None = None) -> None:
        zeros = int((weight == 0).sum())
        self.zeros += zeros
        self.numel += weight.numel()
        self.layer_sparsity[name] = zeros / weight.numel()
        if info:
            self.layer_info[name] = info


class _Caught(Exception):
    """Raised by the last recorder: nothing after the blocks needs to run."""


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
            raise _Caught
        return hidden_states

    def __getattr__(self, name):  # the model may read block attributes such as attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "wrapped"), name)


@dataclass
class _Captured:
    hidden: list[torch.Tensor]  # block 0's input, one tensor per chunk
    calls: list[list[tuple]]  # calls[block][chunk] = (args, kwargs) the model passed that block


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device, batch_size: int, offload: bool) -> _Captured:
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
            except _Caught:
                pass
    finally:
        model.to("cpu")
        for i, block in enumerate(originals):
            blocks[i] = block
    hidden = [_store(h, offload) for h in first_inputs]
    return _Captured(hidden, calls)


def _store(x: torch.Tensor, offload: bool) -> torch.Tensor:
    if offload and x.is_cuda:
        return x.to("cpu", non_blocking=False).pin_memory()
    return x


def _forward(block: nn.Module, hidden: torch.Tensor, call, device) -> torch.Tensor:
    args, kwargs = call
    out = block(hidden.to(device, non_blocking=True), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older transformers return tuples


def _gather_statistics(block: nn.Module, layers: dict, statistic: type, hidden: list, calls: list, device,
                       index: int = 0) -> dict:
    """Feed every layer's input to an accumulator; layers reading the same tensor share one."""
    stats: dict[str, object] = {}
    feeds: dict[str, bool] = {}
    seen: list[tuple[weakref.ref, object]] = []
    sequences = 0  # in the chunk being forwarded
    finite: dict[str, torch.Tensor] = {}
    order: list[str] = []  # hook calls during the first chunk
    stop_after = None  # the last layer to run, once known: nothing after it feeds a statistic

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0]
            if name not in stats:  # first chunk: identity of the input tensor decides sharing
                for ref, accumulator in seen:
                    if ref() is x:
                        stats[name], feeds[name] = accumulator, False
                        break
                else:
                    stats[name], feeds[name] = statistic(x.shape[-1], device, x.dtype), True
                    seen.append((weakref.ref(x), stats[name]))
            if feeds[name]:
                stats[name].add(x, sequences)
                finite[name] = finite.get(name, True) & torch.isfinite(x).all()  # no sync until the end
            if stop_after is None:
                order.append(name)
            elif name == stop_after:
                raise _Caught  # skip the rest of the block: its output is not needed here
        return fn

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        for h, call in zip(hidden, calls):
            sequences = h.shape[0]
            try:
                _forward(block, h, call, device)
            except _Caught:
                pass
            if stop_after is None and sorted(order) == sorted(layers):  # each layer ran exactly once
                stop_after = order[-1]
    finally:
        for handle in handles:
            handle.remove()
    for name, ok in finite.items():
        if not bool(ok):
            raise NumericsError(f"block {index}, layer {name}: its input contains NaN or inf; check the model's "
                                "weights and --dtype (float16 overflows for some bfloat16-trained models)")
    return stats


class ResourceError(RuntimeError):
    """Not enough device or host memory for the requested run; the message names the flag to change."""


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: Method,
    sparsity: float,
    pattern: Pattern,
    input_ids: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    options: dict | None = None,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
    on_block_done: Callable[[int], None] | None = None,
) -> PruneReport:
    """Prune every decoder block's linear layers in place; the model stays on the CPU.

    With `checkpoint`, each finished block is saved and a run that finds a checkpoint of the same
    configuration continues after its last finished block.
    """
    device = torch.device(device)
    options = options or {}
    report = PruneReport()
    blocks = decoder_blocks(model)
    sparsity = pattern.sparsity if pattern.structured else sparsity
    start = time.perf_counter()
    needs_data = method.statistic is not None
    if needs_data and input_ids is None:
        raise ValueError(f"{method.name} needs calibration data")

    first, captured, resumed_notes = 0, None, {}
    if checkpoint is not None:
        checkpoint.fingerprint.update(_fingerprint(method, sparsity, pattern, options, input_ids, len(blocks)))
        if checkpoint.exists():
            first, resumed_hidden, resumed_notes = checkpoint.restore(blocks, needs_data)
    if needs_data and first < len(blocks):
        batch_size = batch_size or default_batch_size(model, input_ids.shape[1], device)
        offload = device.type == "cuda" and not _activations_fit(model, input_ids, device)
        captured = capture_block_inputs(model, input_ids, device, batch_size, offload)
        if first:
            captured.hidden = [_store(h.to(device), offload) for h in resumed_hidden]
        _check_finite(captured.hidden, f"the inputs of block {first}")
        report.timings["capture_s"] = time.perf_counter() - start

    bar = tqdm(range(len(blocks)), desc=f"{method.name} {pattern if pattern.structured else sparsity}",
               unit="block", disable=not progress, leave=False, initial=first)
    for index in range(first):  # finished before a resume: only measure them
        for name, layer in prunable_layers(blocks[index]).items():
            report.record(f"{index}.{name}", get_weight(layer), resumed_notes.get(f"{index}.{name}"))
    for index in range(first, len(blocks)):
        block, phase = blocks[index], "moving"
        try:
            block.to(device)
            layers = prunable_layers(block)
            stats = {}
            if captured is not None:
                phase = "statistics"
                bar.set_postfix_str(phase)
                stats = _gather_statistics(block, layers, method.statistic, captured.hidden, captured.calls[index],
                                           device, index)
            phase = "pruning"
            bar.set_postfix_str(phase)
            prepared = {}  # once per shared accumulator
            for name, layer in layers.items():
                stat = stats.get(name)
                if stat is not None and id(stat) not in prepared:
                    value = stat.value()
                    prepared[id(stat)] = method.prepare(value, **options) if method.prepare else value
                result = method.prune(get_weight(layer), prepared.get(id(stat)), sparsity, pattern, **options)
                set_weight(layer, result.weight)
                report.record(f"{index}.{name}", result.weight, result.info)
            del stats, prepared
            if captured is not None and index + 1 < len(blocks):
                phase = "forward"
                bar.set_postfix_str(phase)
                offload = captured.hidden[0].device.type == "cpu" and device.type == "cuda"
                captured.hidden = [_store(_forward(block, h, call, device), offload)
                                   for h, call in zip(captured.hidden, captured.calls[index])]
                _check_finite(captured.hidden, f"the outputs of block {index} after pruning")
            block.to("cpu")
        except torch.cuda.OutOfMemoryError:
            block.to("cpu")
            raise ResourceError(f"CUDA ran out of memory in block {index} ({phase}); lower --batch-size "
                                f"(now {batch_size}) or --nsamples/--seqlen") from None
        if checkpoint is not None:
            last = index + 1 == len(blocks)
            checkpoint.save(index, block, None if last or captured is None else captured.hidden,
                            dict(report.layer_info))
        bar.update(1)
        if on_block_done is not None:
            on_block_done(index)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report.timings["prune_s"] = time.perf_counter() - start
    return report


def _fingerprint(method, sparsity, pattern, options, input_ids, blocks) -> dict:
    digest = None if input_ids is None else hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()
    return {"method": method.name, "sparsity": sparsity, "pattern": str(pattern), "options": options,
            "calibration_sha256": digest, "blocks": blocks}


def _check_finite(tensors: list[torch.Tensor], what: str) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NumericsError(f"{what} contain NaN or inf; check the model's weights and --dtype "
                            "(float16 overflows for some bfloat16-trained models)")


def measure_sparsity(model: nn.Module) -> PruneReport:
    """The sparsity of the prunable layers as they are (for dense runs and checks)."""
    report = PruneReport()
    for index, block in enumerate(decoder_blocks(model)):
        for name, layer in prunable_layers(block).items():
            report.record(f"{index}.{name}", get_weight(layer))
    return report


def default_batch_size(model: nn.Module, seqlen: int, device="cpu") -> int:
    """Sequences per block forward: enough to keep the device busy, few enough to bound scratch memory.
    A GPU wants large batches (16k tokens); a CPU is fastest at ~4k tokens, whose activations stay
    in cache (SmolLM2 block, 32 x 1024 tokens, 2 cores: 1.70 s per pass at 4k vs 2.09 s at 16k)."""
    tokens_per_batch = 16384 if torch.device(device).type == "cuda" else 4096
    return max(1, tokens_per_batch // seqlen)


def _activations_fit(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> bool:
    """Two copies of the hidden states (inputs and outputs) should take at most a third of free memory."""
    hidden_size = model.config.get_text_config().hidden_size
    element = next(model.parameters()).element_size()
    needed = 2 * input_ids.numel() * hidden_size * element
    free, _total = torch.cuda.mem_get_info(device)
    return needed < free / 3


def check_pattern(model: nn.Module, pattern: Pattern) -> None:
    """Fail before any work if an N:M pattern does not fit some layer's input width."""
    if pattern.structured:
        for block in decoder_blocks(model):
            for name, layer in prunable_layers(block).items():
                pattern.check_width(get_weight(layer).shape[1], name)


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(model: nn.Module, nsamples: int, seqlen: int, device, batch_size: int | None = None) -> dict:
    """Estimate the run's working memory and fail early, naming the flag to change, if it cannot fit.

    The dominant terms: two copies of the block activations (inputs and outputs, nsamples x seqlen x
    hidden), one block's weights and statistics, and one batch's forward scratch.
    """
    device = torch.device(device)
    config = model.config.get_text_config()
    hidden = config.hidden_size
    element = next(model.parameters()).element_size()
    batch_size = batch_size or default_batch_size(model, seqlen, device)
    block = decoder_blocks(model)[0]
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    widest = max(get_weight(layer).shape[1] for layer in prunable_layers(block).values())
    statistics = 4 * widest * widest * 4  # a few fp32 [in, in] Hessians at most
    heads = getattr(config, "num_attention_heads", 1)
    scratch = batch_size * seqlen * (12 * hidden + heads * seqlen) * max(element, 4)
    activations = 2 * nsamples * seqlen * hidden * element
    gib = 2 ** 30
    estimate = {"activations_gib": activations / gib, "block_gib": (block_bytes + statistics + scratch) / gib}
    on_host = activations if device.type == "cpu" else 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if block_bytes + statistics + scratch > 0.9 * free:
            raise ResourceError(f"one block needs about {(block_bytes + statistics + scratch) / gib:.1f} GiB on "
                                f"{device} but {free / gib:.1f} GiB is free; lower --batch-size (now {batch_size})")
        if activations >= free / 3:
            on_host = activations  # the engine keeps them in pinned host memory
    available = _available_host_bytes()
    needed = on_host + (scratch if device.type == "cpu" else 0)
    if available is not None and needed > 0.9 * available:
        raise ResourceError(f"calibration activations need about {needed / gib:.1f} GiB of host memory "
                            f"({nsamples} x {seqlen} tokens x {hidden} features) but {available / gib:.1f} GiB "
                            "is available; lower --nsamples or --seqlen")
    return estimate
