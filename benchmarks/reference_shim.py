"""Run locuslab/wanda's own prune functions on our model and windows, for side-by-side timings.

The reference is imported from a checkout at run time and never copied here. Only its environment
is adapted: transformers >= 4.48 decoder blocks need `position_embeddings` and return a tensor, and
the reference calls CUDA-only functions that a CPU build of torch lacks.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn


class _BlockShim(nn.Module):
    """Gives a transformers-5 decoder block the 4.3x calling convention the reference uses."""

    def __init__(self, block: nn.Module, rotary: nn.Module):
        super().__init__()
        self.block = block
        object.__setattr__(self, "rotary", rotary)  # not a child module: the reference walks children

    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        cos_sin = self.rotary(hidden_states, position_ids=position_ids)
        out = self.block(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                         position_embeddings=cos_sin, **kwargs)
        return out if isinstance(out, tuple) else (out,)


@contextlib.contextmanager
def _cpu_safe():
    """The reference calls torch.cuda.synchronize/empty_cache and .cuda(); make them no-ops on CPU."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.empty_cache, torch.Tensor.cuda
    torch.cuda.synchronize = torch.cuda.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.empty_cache, torch.Tensor.cuda = saved


def run_reference(checkout: Path, model, method: str, pattern: str, ids: torch.Tensor, device: str,
                  sparsity: float = 0.5) -> None:
    """Prune `model` in place with locuslab/wanda's prune_<method> (magnitude, wanda, sparsegpt) at `sparsity`,
    on calibration windows `ids`; "dense" leaves it as it is."""
    if method == "dense":
        return
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    tf32 = torch.backends.cuda.matmul.allow_tf32  # the reference turns TF32 off for the whole process
    import lib.prune as reference

    torch.backends.cuda.matmul.allow_tf32 = tf32
    reference.get_loaders = lambda *a, **k: ([(row[None], None) for row in ids], None)
    n, m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    args = SimpleNamespace(nsamples=ids.shape[0], seed=0, sparsity_ratio=sparsity, use_variant=False)
    blocks = model.model.layers
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _BlockShim(block, model.model.rotary_emb)
    model.seqlen, model.hf_device_map = ids.shape[1], {}
    model.to(device)
    try:
        with _cpu_safe(), contextlib.redirect_stdout(io.StringIO()):
            prune = getattr(reference, f"prune_{method}")
            prune(args, model, None, torch.device(device), prune_n=n, prune_m=m)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        model.to("cpu")


def reference_perplexity(checkout: Path, model, eval_ids: torch.Tensor, device: str) -> float:
    """locuslab/wanda's own eval_ppl_wikitext on the windows `eval_ids` [n, seqlen] (joined, as its loader gives)."""
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from lib.eval import eval_ppl_wikitext

    model.seqlen = eval_ids.shape[1]
    model.to(device)
    try:
        with _cpu_safe(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            return float(eval_ppl_wikitext(model, SimpleNamespace(input_ids=eval_ids.reshape(1, -1)), 1,
                                           torch.device(device)))
    finally:
        model.to("cpu")


# Reference implementations by name: (checkout, model, method, pattern, ids, device, sparsity) -> None, in place.
REFERENCES = {"wanda": run_reference}
