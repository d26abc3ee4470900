"""Hugging Face Hub sources: wikitext2, ptb and c4, as the SparseGPT/Wanda papers use them.

`datasets` is imported lazily, only here and only when one of these sources is used.
When the Hub cannot be reached we switch datasets/huggingface_hub to offline mode
first, so a cached copy loads at once instead of retrying for 25-50 s, and a missing
one fails fast with a one-line SourceError naming the offline sources.
"""
from __future__ import annotations

import importlib.util
import os
import random
import socket
import sys
import threading
from pathlib import Path
from typing import Sequence

import torch

from .source_errors import OFFLINE_ALTERNATIVES, SourceError
from .windows import encode

HUB_HOST = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 3.0

# Repo ids each source may be cached under (the legacy canonical name and its namespaced home).
CACHE_NAMES = {
    "wikitext2": ("wikitext", "Salesforce/wikitext"),
    "ptb": ("ptb_text_only", "ptb-text-only/ptb_text_only"),
    "c4": ("allenai/c4",),
}

C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_VALIDATION_DOCS = 1100
C4_VALIDATION_WINDOWS = 256  # validation tokens are truncated to 256 * seqlen
# Random picks allowed per wanted C4 sample before giving up. With seqlen 2048 a few
# percent of C4 documents are long enough, so this is ample; it only trips when the
# documents are far too short for seqlen, where the reference loop spins forever.
C4_TRIES_PER_SAMPLE = 250

_TRUE = {"1", "ON", "YES", "TRUE"}
_reachable: bool | None = None


def env_offline() -> bool:
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable() -> bool:
    """Whether huggingface.co answers, honouring HF_HUB_OFFLINE; probed once per process."""
    global _reachable
    if _reachable is None:
        _reachable = False if env_offline() else _probe()
    return _reachable


def _probe() -> bool:
    # create_connection's timeout does not cover DNS, which can hang; bound both with a thread.
    answer = []

    def connect():
        try:
            socket.create_connection(HUB_HOST, timeout=PROBE_TIMEOUT_S).close()
            answer.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(answer)


def _cache_dirs() -> tuple[Path, Path]:
    """(huggingface_hub cache, datasets cache), resolved from the environment as those libraries do."""
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = Path(os.path.expanduser(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))))
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or home / "datasets"
    return Path(os.path.expanduser(hub_cache)), Path(os.path.expanduser(datasets_cache))


def in_local_cache(source: str) -> bool:
    """Whether a copy of the source's dataset seems to be in the local HF caches."""
    hub_cache, datasets_cache = _cache_dirs()
    for name in CACHE_NAMES[source]:
        if (hub_cache / ("datasets--" + name.replace("/", "--"))).is_dir():
            return True
        if (datasets_cache / name.replace("/", "___")).is_dir():
            return True
    return False


def check(source: str, role: str) -> None:
    """Fail fast, before any model loads, if the source cannot possibly be loaded."""
    if importlib.util.find_spec("datasets") is None:
        raise SourceError(f"{source} needs the datasets package: pip install datasets (or use {OFFLINE_ALTERNATIVES})")
    if not hub_reachable() and not in_local_cache(source):
        raise SourceError(
            f"{role} source {source} needs the Hugging Face Hub, which is unreachable from here, and it is not "
            f"in the local HF cache; use an offline source instead: {OFFLINE_ALTERNATIVES}"
        )


def go_offline() -> None:
    """Make datasets/huggingface_hub use the cache only, even if they are already imported."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True


def _load(source: str, attempts: Sequence[tuple[tuple, dict]], split: str):
    """load_dataset(*args, split=split, **kwargs) for the first attempt that works."""
    check(source, "calibration" if split == "train" else "evaluation")
    if not hub_reachable():
        go_offline()
    import datasets

    failure = None
    for args, kwargs in attempts:
        try:
            return datasets.load_dataset(*args, split=split, **kwargs)
        except Exception as error:  # datasets raises many types (network, script, not found); try the next
            failure = error
    raise SourceError(
        f"could not load {source} ({split}) with datasets {datasets.__version__}: "
        f"{type(failure).__name__}: {failure}; use an offline source instead: {OFFLINE_ALTERNATIVES}"
    )


def wikitext2_text(split: str) -> str:
    """WikiText-2 raw: train joined with " ", test joined with "\\n\\n" (as the reference)."""
    attempts = [(("wikitext", "wikitext-2-raw-v1"), {}), (("Salesforce/wikitext", "wikitext-2-raw-v1"), {})]
    data = _load("wikitext2", attempts, split)
    return (" " if split == "train" else "\n\n").join(data["text"])


def ptb_text(split: str) -> str:
    """Penn Treebank text-only: both splits joined with " " (as the reference).

    Unverified offline: ptb_text_only is a loading-script dataset, which datasets >= 4 no
    longer runs, so after the canonical name we try the Hub's auto-converted parquet branch.
    """
    attempts = [
        (("ptb_text_only", "penn_treebank"), {}),
        (("ptb-text-only/ptb_text_only", "penn_treebank"), {"revision": "refs/convert/parquet"}),
    ]
    data = _load("ptb", attempts, split)
    return " ".join(data["sentence"])


class _TextColumn(Sequence[str]):
    """data[i]["text"] on demand: the C4 shard is ~350k documents; don't materialise them."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> str:
        return self.data[i]["text"]


def c4_train_texts() -> Sequence[str]:
    data = _load("c4", [(("allenai/c4",), {"data_files": {"train": C4_TRAIN_FILE}})], "train")
    return _TextColumn(data)


def c4_validation_text() -> str:
    """The first 1100 C4 validation documents joined with " " (truncate the tokens to 256 * seqlen)."""
    data = _load("c4", [(("allenai/c4",), {"data_files": {"validation": C4_VALIDATION_FILE}})], "validation")
    return " ".join(data[:C4_VALIDATION_DOCS]["text"])


def sample_long_documents(texts: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """C4 protocol: per sample, pick random documents until one has more than seqlen tokens,
    then a random window in it. Same random stream as the reference, but bounded."""
    rng = random.Random(seed)
    max_tries = C4_TRIES_PER_SAMPLE * nsamples
    tried, longest, windows = 0, 0, []
    while len(windows) < nsamples:
        if tried >= max_tries:
            raise SourceError(
                f"c4: tried {tried} random documents and only {len(windows)} had more than {seqlen} tokens "
                f"(longest {longest}), {nsamples} needed; pass a smaller --seqlen or --nsamples"
            )
        tried += 1
        ids = encode(tokenizer, texts[rng.randint(0, len(texts) - 1)])
        longest = max(longest, ids.numel())
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start:start + seqlen])
    return torch.stack(windows)
