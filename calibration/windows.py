"""Tokenise text once and cut it into [n, seqlen] windows of token ids.

Two cuts, as in the SparseGPT/Wanda reference code:
- calibration: n random windows, start i = rng.randint(0, ntokens - seqlen - 1)
  with rng = random.Random(seed) (same numbers as the reference's random.seed);
- evaluation: consecutive non-overlapping windows, the tail dropped.
Tokenised streams are cached in-process so one run tokenises each text once.
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Callable, Hashable

import torch

from .source_errors import SourceError

# transformers warns when a text is longer than model_max_length. We tokenise whole
# corpora on purpose and cut them into windows afterwards, so the warning is noise.
_LENGTH_WARNING_LOGGER = "transformers.tokenization_utils_base"

# (id(tokenizer), key) -> (tokenizer, ids). Holding the tokenizer keeps its id unique.
_token_cache: dict[tuple, tuple[object, torch.Tensor]] = {}
_TOKEN_CACHE_SIZE = 8


@contextlib.contextmanager
def _quiet_length_warning():
    logger = logging.getLogger(_LENGTH_WARNING_LOGGER)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of text as a 1-D LongTensor, with the tokenizer's default special tokens."""
    with _quiet_length_warning():
        ids = tokenizer(text).input_ids
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def cached_encode(tokenizer, key: Hashable, make_text: Callable[[], str]) -> torch.Tensor:
    """encode(tokenizer, make_text()), remembered per (tokenizer, key) for this process."""
    cache_key = (id(tokenizer), key)
    hit = _token_cache.get(cache_key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    ids = encode(tokenizer, make_text())
    _token_cache[cache_key] = (tokenizer, ids)
    while len(_token_cache) > _TOKEN_CACHE_SIZE:
        _token_cache.pop(next(iter(_token_cache)))  # oldest first
    return ids


def clear_token_cache() -> None:
    _token_cache.clear()


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """nsamples random windows of seqlen tokens from one token stream (wikitext2 protocol)."""
    ntokens = ids.numel()
    if ntokens <= seqlen:
        raise SourceError(
            f"{what} has {ntokens} tokens, too few for a calibration window of {seqlen} tokens "
            f"(need more than {seqlen}); give it more text or pass a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ntokens - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i:i + seqlen] for i in starts])


def consecutive_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, what: str) -> torch.Tensor:
    """Non-overlapping windows of seqlen tokens, tail dropped; the first max_windows if given."""
    nwindows = ids.numel() // seqlen
    if nwindows == 0:
        raise SourceError(
            f"{what} has {ids.numel()} tokens, too few for one evaluation window of {seqlen} tokens; "
            f"give it more text or pass a smaller --seqlen"
        )
    if max_windows is not None:
        nwindows = min(nwindows, max_windows)
    return ids[:nwindows * seqlen].reshape(nwindows, seqlen).clone()
