"""The `offline` zero-shot suite: lm-eval tasks built from the embedded Wikipedia summaries.

Two tasks, generated deterministically (fixed seed) from the EVALUATION split of wiki-offline only
(`calibration.wiki_offline.split_articles("evaluation")`), so no text that calibration can draw is
ever evaluated:

- `wiki_offline_describe` (multiple choice, 4-way; acc and acc_norm): the prompt is an article's
  title, the choices are its real Wikipedia short description and the descriptions of three other
  evaluation-split articles (distinct from the answer and from each other, case-insensitively).
- `wiki_offline_lastword` (last-word prediction, LAMBADA-style; acc and perplexity): the context
  is an article's summary up to the last word of one of its sentences, the target is that word.
  Only sentences whose final word already occurs earlier in the passage are used, so the
  passage determines the answer; one sentence per article (the last that qualifies).

They are written as lm-eval task YAMLs with JSONL data under absolute paths into a cache directory
(`$ONESHOT_CACHE/lm_eval_tasks/<version>-<data digest>`, default `~/.cache/oneshot/...`) on first
use. The directory name carries the generator version and a digest of the summaries file, so a
changed generator or a changed data file builds a fresh copy instead of reusing a stale one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from ..paths import cache_root

GENERATOR_VERSION = "v1"
SEED = 1234
DESCRIBE_TASK = "wiki_offline_describe"
LASTWORD_TASK = "wiki_offline_lastword"
TASKS = (DESCRIBE_TASK, LASTWORD_TASK)
DESCRIBE_ITEMS = 500  # of the 975 evaluation articles that have a short description
DESCRIBE_CHOICES = 4
LASTWORD_MIN_CONTEXT_WORDS = 15
LASTWORD_MAX_ITEMS = 400  # about 390 articles qualify; all are used

# A sentence-final word: 3+ letters, preceded by whitespace, followed by . ! or ? and then space or the end.
_FINAL_WORD = re.compile(r"(?<=\s)([A-Za-z]{3,})(?=[.!?](?:\s|$))")


def _data_digest() -> str:
    from calibration.wiki_offline import data_file

    return hashlib.sha1(data_file().read_bytes()).hexdigest()[:10]


def _evaluation_articles() -> list[dict]:
    from calibration.wiki_offline import in_evaluation_split, split_articles

    articles = split_articles("evaluation")
    assert all(in_evaluation_split(a["title"]) for a in articles)  # never calibration text
    return articles


def _clean(text: str) -> str:
    return " ".join(str(text or "").split())


def describe_items(articles: list[dict], n: int = DESCRIBE_ITEMS, seed: int = SEED) -> list[dict]:
    """Title -> its real short description among DESCRIBE_CHOICES, the others from other articles."""
    pool = [a for a in articles if _clean(a.get("description"))]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(pool)), min(n, len(pool))))
    items = []
    for index in chosen:
        article = pool[index]
        answer = _clean(article["description"])
        seen = {answer.lower()}
        distractors = []  # (title, description)
        while len(distractors) < DESCRIBE_CHOICES - 1:
            other = pool[rng.randrange(len(pool))]
            description = _clean(other["description"])
            if other is article or description.lower() in seen:
                continue
            seen.add(description.lower())
            distractors.append((other["title"], description))
        choices = [(article["title"], answer)] + distractors
        rng.shuffle(choices)
        items.append({
            "title": article["title"],
            "choices": [description for _, description in choices],
            "choice_titles": [title for title, _ in choices],
            "label": [title for title, _ in choices].index(article["title"]),
        })
    return items


def lastword_items(articles: list[dict], max_items: int = LASTWORD_MAX_ITEMS, seed: int = SEED) -> list[dict]:
    """Context: a summary up to the last word of a sentence; target: that word (it occurs earlier)."""
    items = []
    for article in articles:
        text = _clean(article["extract"])
        found = None
        for match in _FINAL_WORD.finditer(text):
            context, word = text[:match.start(1)].rstrip(), match.group(1)
            if len(context.split()) < LASTWORD_MIN_CONTEXT_WORDS:
                continue
            if re.search(r"\b" + re.escape(word) + r"\b", context):
                found = (context, word)  # keep the last qualifying sentence
        if found:
            items.append({"title": article["title"], "context": found[0], "target": found[1]})
    if len(items) > max_items:
        keep = sorted(random.Random(seed).sample(range(len(items)), max_items))
        items = [items[i] for i in keep]
    return items


def _yaml(task: str, data_path: Path) -> str:
    """The lm-eval task config, with the data file's absolute path."""
    common = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "metadata": {"version": 1.0, "generator": f"oneshot {GENERATOR_VERSION}, seed {SEED}"},
    }
    if task == DESCRIBE_TASK:
        specific = {
            "output_type": "multiple_choice",
            "doc_to_text": "Article: {{title}}\nShort description:",
            "doc_to_target": "label",  # a field of the data: its value is used as-is
            "doc_to_choice": "choices",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        }
    else:
        specific = {
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{' ' + target}}",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    return yaml.safe_dump({**common, **specific}, sort_keys=False, allow_unicode=True, width=1000)


def write_tasks(directory: Path, final: Path | None = None) -> None:
    """Generate both tasks (YAML + JSONL) into `directory`, which must exist; the YAMLs name
    their data files as they will be found under `final` (default: `directory`)."""
    final = Path(final or directory).resolve()
    articles = _evaluation_articles()
    for task, items in ((DESCRIBE_TASK, describe_items(articles)), (LASTWORD_TASK, lastword_items(articles))):
        with open(directory / f"{task}.jsonl", "w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
        (directory / f"{task}.yaml").write_text(_yaml(task, final / f"{task}.jsonl"), encoding="utf-8")


def task_directory(root: Path | None = None) -> Path:
    """The directory holding the offline task YAMLs, built on first use (atomically)."""
    root = Path(root).resolve() if root is not None else cache_root() / "lm_eval_tasks"
    final = root / f"{GENERATOR_VERSION}-{_data_digest()}"
    if all((final / f"{task}.yaml").is_file() for task in TASKS):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))  # built aside, then renamed
    try:
        write_tasks(tmp, final)
        if final.exists():
            shutil.rmtree(final)  # an incomplete copy from an interrupted build
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not all((final / f"{task}.yaml").is_file() for task in TASKS):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
