"""GGUF models dequantised once: transformers dequantises a GGUF file on every load (about a minute for
Gemma 3 270M, most of it the 262k-token vocabulary), so the first load saves the dequantised model and its
tokenizer under the oneshot cache, and later loads read those safetensors in seconds.

The cache entry is keyed by the GGUF's fingerprint (models/identity.py) and the transformers version that
dequantised it, and holds float32 weights (what dequantisation gives; other dtypes are cast on load, as
transformers would cast them). It is written to a temporary directory and renamed, so a killed load never
leaves half an entry. `ONESHOT_CACHE` moves the cache; deleting a directory in it only costs a slow load.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


def entry(gguf: Path) -> Path:
    """The cache directory for `gguf` (which may not exist yet)."""
    import transformers

    from ..paths import cache_root
    from .fingerprint import file_fingerprint

    return cache_root() / "dequantised" / f"{gguf.stem}-{file_fingerprint(gguf)}-transformers-{transformers.__version__}"


def load_cached(gguf: Path, dtype: torch.dtype):
    """(model, tokenizer) from the cache entry of `gguf`, or None when there is none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = entry(gguf)
    if not (directory / "config.json").is_file():
        return None
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(directory)


def store(gguf: Path, model, tokenizer) -> None:
    """Save a float32 model dequantised from `gguf`, with its tokenizer, as its cache entry (atomically;
    a failure to write only means the next load is slow again)."""
    directory = entry(gguf)
    if (directory / "config.json").is_file() or next(model.parameters()).dtype != torch.float32:
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            hf_logging.enable_progress_bar()
    except OSError as exc:  # a full disk or a read-only home: say so once, since every load stays slow
        import sys

        print(f"oneshot: could not cache the dequantised model under {directory.parent} ({exc}); every load of "
              f"{gguf.name} will dequantise it again (set ONESHOT_CACHE to a writable directory)", file=sys.stderr)
