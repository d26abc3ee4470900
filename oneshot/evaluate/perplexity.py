"""Perplexity with the SparseGPT/Wanda protocol.

The test text is tokenised once and cut into non-overlapping windows of seqlen tokens (the tail is
dropped; `calibration.evaluation_windows` does that). Each window's loss is the mean next-token NLL
over its seqlen - 1 predictions, and ppl = exp(mean over windows of that loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..methods.masks import compute_dtype


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, device="cpu", batch_size: int = 1, progress: bool = True,
                  streamed: bool = False) -> torch.Tensor:
    """Mean next-token NLL of each window [n, seqlen], in fp32 (fp64 for an fp64 model), on CPU [n].
    `streamed`: the model's blocks stay on disk, so all windows pass block by block (the same
    arithmetic, batch for batch) and the model's head then reads the last block's outputs."""
    losses = []
    batches = windows.split(batch_size)
    if streamed:
        from ..engine.capture import streamed_logits

        all_logits = streamed_logits(model, windows, device, batch_size, progress)
    else:
        all_logits = (model(input_ids=batch.to(device), use_cache=False).logits for batch in batches)
    for batch, logits in tqdm(zip(batches, all_logits), total=len(batches), desc="perplexity", unit="batch",
                              disable=not progress or streamed, leave=False):
        batch = batch.to(device)
        logits = logits[:, :-1]
        logits = logits.to(compute_dtype(logits.dtype))
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        losses.append(nll.view(batch.shape[0], -1).mean(dim=1).cpu())
    return torch.cat(losses)


def perplexity(model, windows: torch.Tensor, device="cpu", batch_size: int = 1, progress: bool = True,
               streamed: bool = False) -> float:
    """exp(mean window loss); the model must already be on `device` (unless streamed)."""
    if windows.numel() == 0:
        raise ValueError("no evaluation windows: the text is shorter than one window")
    return math.exp(window_losses(model, windows, device, batch_size, progress, streamed).mean().item())
