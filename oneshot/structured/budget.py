"""How much to remove: parameters per unit and per block, and the counts that meet a target fraction.

`--sparsity` for a structured pattern is the fraction of decoder-block parameters to remove. Every
block loses the same number of units (so the rewritten config stays uniform), so the choice is a
handful of integers: blocks removed, KV groups removed per block, channels removed per block. Each
is the count whose removed fraction is nearest the target, among the counts the family's config can
express; a target whose nearest count is "all of them" is refused, never clipped silently.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..methods.masks import PatternError


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of a model's decoder blocks (all blocks alike)."""

    num_blocks: int
    block: int  # parameters of one block (weights, biases, norms)
    num_heads: int  # removable units: KV groups with their query heads
    head: int  # parameters one KV group owns (q, k, v rows with their biases, o columns)
    head_counts: tuple[int, ...]  # numbers of kept KV groups the config can express
    num_channels: int
    channel: int  # parameters one MLP channel owns (gate, up rows with biases, down column)

    @property
    def total(self) -> int:
        return self.num_blocks * self.block

    def fraction(self, blocks: int = 0, heads: int = 0, channels: int = 0) -> float:
        """The fraction of decoder-block parameters that a removal takes away."""
        per_block = heads * self.head + channels * self.channel
        return (blocks * self.block + (self.num_blocks - blocks) * per_block) / self.total


@dataclass(frozen=True)
class Removal:
    """What a structured run removes: whole blocks, or per block the same number of units."""

    pattern: str
    blocks: int = 0
    heads: int = 0  # KV groups per block
    channels: int = 0  # MLP channels per block
    fraction: float = 0.0  # of decoder-block parameters

    def describe(self, sizes: Sizes) -> str:
        parts = []
        if self.blocks:
            parts.append(f"{self.blocks} of {sizes.num_blocks} blocks")
        if self.heads:
            parts.append(f"{self.heads} of {sizes.num_heads} KV groups per block")
        if self.channels:
            parts.append(f"{self.channels} of {sizes.num_channels} MLP channels per block")
        return (", ".join(parts) or "nothing") + f" ({100 * self.fraction:.1f}% of the block parameters)"


def nearest_count(target: float, unit: float, counts) -> int:
    """The count c in `counts` whose c * unit is nearest `target`; a tie rounds half up, as rounding
    7.5 blocks to 8 does."""
    return min(counts, key=lambda c: (abs(c * unit - target), -c))


def plan_removal(pattern: str, sparsity: float, sizes: Sizes, flag: str = "--sparsity",
                 channel_multiple: int = 1) -> Removal:
    """The removal nearest `sparsity` for `pattern`, keeping a multiple of `channel_multiple` MLP channels
    (a quantised runtime's block width); PatternError (one line, naming `flag`) when the nearest one would
    remove every block, head or channel."""
    if pattern == "layers":
        count = nearest_count(sparsity * sizes.num_blocks, 1.0, range(sizes.num_blocks + 1))
        if count == sizes.num_blocks:
            raise PatternError(f"{flag} {sparsity:g} with pattern layers would remove all {sizes.num_blocks} blocks; "
                               f"choose a fraction below {(sizes.num_blocks - 0.5) / sizes.num_blocks:.3f}")
        return Removal("layers", blocks=count, fraction=sizes.fraction(blocks=count))

    target = sparsity * sizes.block  # parameters to remove from every block
    heads = channels = 0
    if pattern in ("heads", "width"):
        share = sizes.num_heads * sizes.head / sizes.block
        # width takes from attention and MLP in proportion to their sizes; heads takes it all from attention
        wanted = target if pattern == "heads" else target * share
        if pattern == "heads" and nearest_count(wanted, sizes.head, range(sizes.num_heads + 1)) == sizes.num_heads:
            limit = (sizes.num_heads - 0.5) * sizes.head / sizes.block
            raise PatternError(f"{flag} {sparsity:g} with pattern heads would remove every head (attention holds "
                               f"{100 * share:.1f}% of each block's parameters); choose a fraction below {limit:.3f}")
        removable = [sizes.num_heads - kept for kept in sizes.head_counts if kept < sizes.num_heads]
        heads = nearest_count(wanted, sizes.head, [0] + removable)
    if pattern in ("channels", "width"):
        wanted = target - heads * sizes.head
        keepable = [c for c in range(sizes.num_channels + 1) if (sizes.num_channels - c) % channel_multiple == 0]
        if not keepable:  # pragma: no cover - removing all channels is always a multiple
            keepable = [sizes.num_channels]
        channels = nearest_count(wanted, sizes.channel, keepable)
        if channels == sizes.num_channels:
            share = sizes.num_channels * sizes.channel / sizes.block
            limit = (sizes.num_channels - 0.5) * sizes.channel / sizes.block
            if pattern == "width":
                limit += heads * sizes.head / sizes.block
            raise PatternError(f"{flag} {sparsity:g} with pattern {pattern} would remove every MLP channel (the MLP "
                               f"holds {100 * share:.1f}% of each block's parameters); choose a fraction below "
                               f"{limit:.3f}")
    return Removal(pattern, heads=heads, channels=channels, fraction=sizes.fraction(heads=heads, channels=channels))
