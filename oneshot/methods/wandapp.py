"""Wanda++ (Yang et al., ACL Findings 2025, "Wanda++: Pruning Large Language Models via Regional Gradients",
arXiv 2503.04992): Wanda's score plus a gradient term computed inside one decoder block (the "region"),
then a few steps of regional optimisation of the block's kept weights. No official code exists; where
the paper leaves a detail open, the choice made here is stated ("Choice", and the list below).

Per decoder block l, with its calibration inputs X_1..X_N (one per calibration sequence):

1. Regional gradient. L(X_n) = ||f_l(X_n)||_2, the L2 (Frobenius) norm of the dense block's output for
   sequence n; one backward pass through the block alone per sequence gives dL/dW for every weight of
   the block's linear layers. The per-sequence gradients are combined as
       G_ij = sqrt((1/N) sum_n (dL(X_n)/dW_ij)^2),
   an L2 norm over the sequences (as GBLM aggregates its full-model gradients, which the regional ones
   replace), divided by sqrt(N). Choice: the 1/N inside the root, so that G pairs with Wanda's s_j = (1/N) sum ||x_j||^2 (also
   averaged over sequences, DESIGN.md section 3), and alpha keeps one meaning whatever N is. The
   community reproduction the paper links to (TTTTTTris/wandaplus) takes the same root mean square.
2. Regional gradient score (RGS): S_ij = |W_ij| * (sqrt(s_j) + alpha * G_ij), alpha = 100 by default;
   the lowest scores of each output row are pruned (floor(cols * p) per row, stable sort), or the N
   lowest of every M inputs per row for N:M, exactly as Wanda. alpha = 0 is Wanda.
3. Regional optimisation (RO): K = `rounds` times, prune with the RGS score of the current weights, then
   draw M = `ro_samples` calibration sequences and make one RMSprop step (lr `ro_lr`) per sequence on
   the squared error between the pruned block's output and the dense block's output for it, with only
   the block's prunable weights trainable. After the K rounds the block is pruned once more with the
   RGS score (the weights the engine records), and its outputs become the next block's inputs.
   Defaults K = 5, M = 32, RMSprop with lr 3e-7 (torch's other RMSprop defaults: smoothing 0.99,
   eps 1e-8, no momentum, no weight decay): the community reproduction's values; alpha = 100 is the
   paper's default by its summaries.

Choices where the paper is silent, or where its full text (not readable from this project's sources,
which hold its abstract and summaries) could not be checked:
- G and the activation norms s_j are measured once per block, on the dense block, with all calibration
  sequences (Wanda's statistic, gathered by the engine); each round re-scores with the current weights.
- `ro_update` kept (default): the pruned weights get no gradient and stay exactly 0 during RO (the mask
  is re-applied after every step), so re-scoring keeps the mask of the first round: the K rounds are then
  K x M steps, each round on a fresh draw. `ro_update` all: RMSprop moves every weight, pruned ones
  included, and the next round's pruning (and the final one) chooses the mask again, so it may change;
  this is how the community reproduction reads the paper. At lr 3e-7 they differ little: one RMSprop
  step moves a weight by at most 10 x lr, so a pruned weight regrows to under 5e-4 in 160 steps.
- The RO loss is the sum of squared errors over the sequence's tokens and features (its mean times a
  constant): RMSprop is invariant to the loss's scale except through eps, and the mean over millions of
  entries would leave gradients below eps = 1e-8. One sequence per step, in a random order drawn with
  `ro_seed` (block b uses torch.Generator seeded ro_seed * 1000003 + b), without replacement within a
  round; M larger than N uses all N.
- The gradient pass and RO run in fp32 (fp64 for a float64 model): the block's parameters are cast for
  them and cast back after, since lr 3e-7 steps vanish in float16 or bfloat16 rounding. The dense
  outputs (RO's targets) are computed in the model's dtype and kept beside the block's inputs.

The maths (score, gradient aggregation, the optimisation loop) are pure functions of tensors and of a
forward callable; the stages at the bottom are thin wrappers over the engine's BlockVisit.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from .magnitude import magnitude_mask
from .masks import Pattern, PruneResult, compute_dtype, nm_mask, row_mask
from .options import Option, defaults
from .wanda import wanda_scores
from .masked_fit import regional_optimise

log = logging.getLogger("oneshot")

WANDAPP_OPTIONS: tuple[Option, ...] = (
    Option("alpha", float, 100.0, "weight of the regional gradient term in |W| * (||X|| + alpha * G)", minimum=0.0),
    Option("rounds", int, 5, "K: prune-then-optimise rounds per block (0: RGS pruning only)", minimum=0,
           maximum=1000),
    Option("ro_samples", int, 32, "M: calibration sequences per round, one RMSprop step each", minimum=1),
    Option("ro_lr", float, 3e-7, "RMSprop learning rate of the regional optimisation", above=0.0, maximum=1.0),
    Option("ro_update", str, "kept", "which weights RO moves: kept (pruned stay 0) | all (re-pruned after)",
           choices=("kept", "all")),
    Option("ro_seed", int, 0, "seed of the order in which RO draws calibration sequences", minimum=0),
)


# ---- the maths: pure functions of tensors -------------------------------------------------------------

class RegionalInputs(NamedTuple):
    """What the RGS score of one layer reads: Wanda's s_j (1/N sum ||x_j||^2) and G [outputs, inputs]."""

    act_sq_norm: torch.Tensor
    gradient: torch.Tensor | None


def rgs_scores(weight: torch.Tensor, act_sq_norm: torch.Tensor, gradient: torch.Tensor | None,
               alpha: float) -> torch.Tensor:
    """S = |W| * (sqrt(s)[None, :] + alpha * G); with alpha = 0 (or no G) exactly Wanda's scores."""
    if gradient is None or alpha == 0:
        return wanda_scores(weight, act_sq_norm)
    dtype = compute_dtype(weight.dtype, act_sq_norm.dtype, gradient.dtype)
    norm = torch.sqrt(act_sq_norm.to(dtype)).reshape(1, -1)
    return weight.abs().to(dtype) * (norm + alpha * gradient.to(dtype))


def rgs_mask(weight: torch.Tensor, inputs: RegionalInputs, sparsity: float, pattern: Pattern,
             alpha: float) -> torch.Tensor:
    """True where pruned: the lowest scores of each row, or the N lowest of every M per row."""
    scores = rgs_scores(weight, inputs.act_sq_norm, inputs.gradient, alpha)
    return nm_mask(scores, pattern) if pattern.is_nm else row_mask(scores, sparsity)


def wandapp_prune(weight: torch.Tensor, inputs, sparsity: float, pattern: Pattern,
                  alpha: float = defaults(WANDAPP_OPTIONS)["alpha"],
                  **_other_options) -> PruneResult:
    """Prune one weight [outputs, inputs] by the RGS score; `inputs` is a RegionalInputs (a bare s_j tensor
    is Wanda's statistic without G, which only alpha = 0 accepts). The new weight keeps its dtype."""
    if isinstance(inputs, torch.Tensor):
        if alpha != 0:
            raise ValueError("wanda++ needs its regional gradients: run it through its own stages "
                             "(oneshot.methods.wandapp.WANDAPP_STAGES), or set alpha=0")
        inputs = RegionalInputs(inputs, None)
    mask = rgs_mask(weight, inputs, sparsity, pattern, alpha)
    return PruneResult(weight.masked_fill(mask, 0), mask, {})


def regional_gradients(forward: Callable, samples: Iterable, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each p in `params` (tensors that require grad), sqrt((1/N) sum_n (d||forward(x_n)||_2 / dp)^2) over
    the N samples, each its own forward and backward; gradients reach only `params`."""
    sums = [torch.zeros_like(p, dtype=compute_dtype(p.dtype)) for p in params]
    count = 0
    with torch.enable_grad():
        for x in samples:
            out = forward(x)
            loss = out.to(compute_dtype(out.dtype)).norm()
            for total, grad in zip(sums, torch.autograd.grad(loss, params)):
                total.add_(grad.to(total.dtype).pow(2))
            count += 1
    if not count:
        raise ValueError("regional_gradients needs at least one sample")
    return [total.div_(count).sqrt_() for total in sums]


def draw_orders(count: int, rounds: int, per_round: int, seed: int, block: int) -> list[list[int]]:
    """Which calibration sequences each round uses, in order: `per_round` of `count` without replacement
    (all of them if fewer), from a generator seeded by (seed, block)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
    take = min(per_round, count)
    return [torch.randperm(count, generator=generator)[:take].tolist() for _ in range(rounds)]


# ---- the stages: thin wrappers over the engine's BlockVisit ---------------------------------------------
# The engine imports oneshot.methods, so the engine's helpers are imported when a stage runs.

_DENSE, _GRADIENTS = "wanda++ dense outputs", "wanda++ gradients"  # keys in BlockVisit.scratch


def _options(visit) -> dict:
    return {**defaults(WANDAPP_OPTIONS), **visit.options}


def _region():
    from ..engine import region  # the engine imports the methods: the block's helpers come in lazily

    return region


def _needs_rounds(visit) -> bool:
    return visit.inputs is not None and _options(visit)["rounds"] > 0


def gather_statistics(visit) -> None:
    """The engine's stage of this name: Wanda's s_j for every layer, from the dense block's inputs."""
    from ..engine.stages import gather_statistics as engine_stage

    engine_stage(visit)


def capture_dense_outputs(visit) -> None:
    """The dense block's output for every calibration chunk (RO's targets), stored beside its inputs."""
    if not _needs_rounds(visit):
        return
    from ..engine.capture import forward_block, store

    visit.on_phase("dense outputs")
    offload = visit.inputs.hidden[0].device.type == "cpu" and visit.device.type == "cuda"
    calls = visit.inputs.calls[visit.index]
    visit.scratch[_DENSE] = [store(forward_block(visit.block, h, call, visit.device), offload)
                             for h, call in zip(visit.inputs.hidden, calls)]


def regional_gradient_pass(visit) -> None:
    """G for every prunable layer: one forward and backward of the dense block per calibration sequence."""
    if visit.inputs is None or _options(visit)["alpha"] == 0:
        return
    visit.on_phase("regional gradients")
    region = _region()
    params, dtype = region.prunable_parameters(visit), region.region_dtype(visit)
    with region.trainable(visit.block, params, dtype):
        samples = (region.sample(visit, c, i, dtype) for c, i in region.sequences(visit))
        gradients = regional_gradients(region.region_forward(visit), samples, params)
    by_parameter = {id(p): g for p, g in zip(params, gradients)}
    from ..models import layer_parameter, weight_matrix

    visit.scratch[_GRADIENTS] = {name: weight_matrix(layer, by_parameter[id(layer_parameter(layer))])
                                 for name, layer in visit.layers.items()}


class _WithGradient:
    """A layer's statistic accumulator (possibly shared with other layers) with the layer's own G beside it;
    the engine's prune_layers reads it like any accumulator. A compound statistic (a quantising method's,
    whose value is a tuple) carries the method's own statistic first, and keeps the rest."""

    def __init__(self, inner, gradient):
        self.inner, self.gradient = inner, gradient

    @property
    def tokens(self):
        return getattr(self.inner, "tokens", None)

    def value(self):
        value = self.inner.value()
        if isinstance(value, tuple):
            return (RegionalInputs(value[0], self.gradient),) + tuple(value[1:])
        return RegionalInputs(value, self.gradient)


def _round_masks(visit, alpha: float, values: dict) -> dict:
    """Prune every layer by the RGS score of its current weight; returns each layer's mask."""
    from ..models import get_weight, set_weight

    masks = {}
    for name, layer in visit.layers.items():
        weight, stat = get_weight(layer), visit.stats.get(name)
        target = visit.targets[name]
        if stat is None or getattr(stat, "tokens", None) == 0:  # as the engine: magnitude without data
            mask = magnitude_mask(weight, target, visit.pattern)
        else:
            if id(stat) not in values:
                value = stat.value()  # RegionalInputs, or a compound statistic's tuple that starts with one
                values[id(stat)] = value if isinstance(value, RegionalInputs) else value[0]
            mask = rgs_mask(weight, values[id(stat)], target, visit.pattern, alpha)
        set_weight(layer, weight.masked_fill(mask, 0))
        masks[name] = mask
    return masks


def prune_and_optimise(visit) -> None:
    """K rounds of RGS pruning then regional optimisation, then the final RGS pruning through the engine's
    prune_layers (which records each layer and applies a quantising method's step)."""
    from ..engine.stages import prune_layers
    from ..models import layer_parameter, weight_matrix

    options = _options(visit)
    gradients = visit.scratch.pop(_GRADIENTS, {})
    for name in visit.layers:
        if name in visit.stats:
            visit.stats[name] = _WithGradient(visit.stats[name], gradients.get(name))
    if _needs_rounds(visit):
        dense = visit.scratch.pop(_DENSE)
        region = _region()
        params, dtype = region.prunable_parameters(visit), region.region_dtype(visit)
        sequences = region.sequences(visit)
        orders = draw_orders(len(sequences), options["rounds"], options["ro_samples"], options["ro_seed"],
                             visit.index)
        with region.trainable(visit.block, params, dtype):
            optimiser = torch.optim.RMSprop(params, lr=options["ro_lr"])
            values: dict = {}
            first = last = None
            for k, order in enumerate(orders):
                visit.on_phase(f"round {k + 1}/{len(orders)}")
                masks = _round_masks(visit, options["alpha"], values)
                pruned = {id(p): torch.zeros_like(p, dtype=torch.bool) for p in params}
                for name, layer in visit.layers.items():
                    weight_matrix(layer, pruned[id(layer_parameter(layer))]).copy_(masks[name])
                pairs = ((region.sample(visit, c, i, dtype), dense[c][i:i + 1]) for c, i in (sequences[n] for n in order))
                losses = regional_optimise(region.region_forward(visit), pairs, params, [pruned[id(p)] for p in params],
                                           optimiser, options["ro_update"])
                first = losses[0] if first is None else first
                last = losses[-1]
            del optimiser, dense
        log.debug(f"wanda++ block {visit.index}: RO loss {first:.4g} -> {last:.4g} over {len(orders)} rounds")
    prune_layers(visit)


def propagate(visit) -> None:
    """The engine's stage of this name: the pruned block's outputs become the next block's inputs."""
    from ..engine.stages import propagate as engine_stage

    engine_stage(visit)


WANDAPP_STAGES = (gather_statistics, capture_dense_outputs, regional_gradient_pass, prune_and_optimise, propagate)
