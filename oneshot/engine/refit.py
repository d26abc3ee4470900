"""Block refit (--refit): once a block's layers are pruned, their kept weights are fitted together, by Adam,
so that the block's output matches a target: the dense model's output of that block (with --asymmetric), or
else the unpruned block's output on the same inputs. Each layer's own reconstruction (SparseGPT, ADMM, ALPS)
is blind to what follows it inside the block (attention's softmax, the gated MLP, the residual sums); this
step is not. The mask stays as pruned: pruned weights get no gradient and stay exactly 0.

One Adam step per calibration sequence (its squared error summed over tokens and features), `epochs` passes
over the sequences, each in an order drawn from a generator seeded by (seed, block), so a run does not
depend on the batch size."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..methods.masked_fit import regional_optimise
from . import region

log = logging.getLogger("oneshot")


@dataclass(frozen=True)
class Refit:
    epochs: int  # passes over the calibration sequences (0: no refit)
    lr: float  # Adam's learning rate
    seed: int = 0  # the order of the sequences in each pass


def refit_block(visit, targets: list[torch.Tensor], refit: Refit) -> tuple[float, float]:
    """Fit the pruned block's kept weights so that its output on visit.inputs.hidden matches `targets`
    (one tensor per calibration chunk, shaped like its output). Returns the loss summed over the sequences
    in the first pass and in the last (each before its step)."""
    params, dtype = region.prunable_parameters(visit), region.region_dtype(visit)
    pruned = [p.detach() == 0 for p in params]  # the mask pruning left
    sequences = region.sequences(visit)
    generator = torch.Generator().manual_seed(refit.seed * 1_000_003 + visit.index)
    first = last = 0.0
    with region.trainable(visit.block, params, dtype):
        optimiser = torch.optim.Adam(params, lr=refit.lr)
        for epoch in range(refit.epochs):
            visit.on_phase(f"refit {epoch + 1}/{refit.epochs}")
            order = torch.randperm(len(sequences), generator=generator).tolist()
            pairs = ((region.sample(visit, c, i, dtype), targets[c][i:i + 1])
                     for c, i in (sequences[n] for n in order))
            loss = sum(regional_optimise(region.region_forward(visit), pairs, params, pruned, optimiser))
            first, last = (loss if epoch == 0 else first), loss
        del optimiser
    log.debug(f"refit block {visit.index}: loss {first:.4g} -> {last:.4g} over {refit.epochs} passes")
    return first, last
