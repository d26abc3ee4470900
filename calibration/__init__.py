"""calibration: where the token windows for pruning and perplexity come from.

Sources: wiki-offline (embedded, no network), wikitext2, ptb, c4 (Hugging Face Hub),
file:PATH (.txt/.jsonl) and tokens:PATH (.pt/.npy windows used as-is). See SOURCES.
"""
from .source_errors import SourceError
from .sources import (
    SOURCES,
    calibration_windows,
    check_source,
    check_token_range,
    evaluation_windows,
    shared_text,
)

__all__ = [
    "SOURCES",
    "SourceError",
    "calibration_windows",
    "check_source",
    "check_token_range",
    "evaluation_windows",
    "shared_text",
]
