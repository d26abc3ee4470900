"""Perplexity measured by llama.cpp itself (through llama-cpp-python) on a GGUF file: the file a user
deploys, run by the runtime that deploys it, on the same windows and with the same protocol as
evaluate/perplexity.py (each window's mean next-token NLL over its seqlen - 1 predictions, then exp of the
mean over windows). llama.cpp computes the logits; the NLL is taken here in float64 from them.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from tqdm.auto import tqdm


def threads() -> int:
    """llama.cpp's thread count: torch's, so both runtimes use the same cores."""
    return max(1, torch.get_num_threads())


def open_model(path: str, seqlen: int, n_threads: int | None = None):
    """A llama_cpp.Llama on `path` with room for one window and the logits of every position."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                 n_threads=n_threads or threads(), n_threads_batch=n_threads or threads(), verbose=False,
                 seed=0, use_mmap=True)


def window_losses(llm, windows: torch.Tensor, progress: bool = True) -> torch.Tensor:
    """Mean next-token NLL of each window [n, seqlen] from llama.cpp's logits, float64, [n]."""
    losses = []
    for window in tqdm(windows.tolist(), desc="perplexity (llama.cpp)", unit="window", disable=not progress,
                       leave=False):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)  # the prediction for each next token
        peak = logits.max(axis=1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        chosen = logits[np.arange(len(window) - 1), window[1:]]
        losses.append(float(np.mean(log_norm - chosen)))
    return torch.tensor(losses, dtype=torch.float64)


def perplexity(path: str, windows: torch.Tensor, progress: bool = True) -> float:
    if windows.numel() == 0:
        raise ValueError("no evaluation windows: the text is shorter than one window")
    llm = open_model(path, int(windows.shape[1]))
    try:
        return math.exp(window_losses(llm, windows, progress).mean().item())
    finally:
        llm.close() if hasattr(llm, "close") else None
        del llm


def version() -> str | None:
    try:
        from importlib import metadata

        return metadata.version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - not installed
        return None


os.environ.setdefault("LLAMA_LOG_LEVEL", "error")  # llama.cpp's own loader logs to stderr otherwise
