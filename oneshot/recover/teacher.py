"""The distillation teacher: the dense base model named by a pruned model's lineage card.

Distillation compares logits token by token, so teacher and student must read text the same way:
`check_teacher` compares their vocabulary sizes (from the configs, no weights) and their tokenizers
(UTF-8 bytes for random: presets and saved random models; otherwise the tokenizers' vocabularies)
before any weight is loaded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UsageError
from ..models import check_model_spec, model_skeleton
from ..models.loading import BYTE_TOKENIZER_FILE


class TeacherError(UsageError):
    """A teacher that cannot teach this student; the message says what to change."""


def tokenizer_identity(spec: str) -> str:
    """"bytes", or a digest of the tokenizer's vocabulary (token -> id)."""
    kind = check_model_spec(spec)
    if kind == "random":
        return "bytes"
    path = Path(spec).expanduser()
    if kind == "local" and (path / BYTE_TOKENIZER_FILE).is_file():
        return "bytes"
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if kind in ("alias", "gguf"):
        from ..models import gguf_file

        gguf = gguf_file(spec)
        where, extra = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        where, extra = spec, {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        vocab = AutoTokenizer.from_pretrained(where, **extra).get_vocab()
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the message names the model
        raise TeacherError(f"cannot read the tokenizer of {spec}: {' '.join(str(exc).split())[:200]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def vocabulary_size(spec: str) -> int:
    config = model_skeleton(spec).config
    return int(config.get_text_config().vocab_size)


def check_teacher(student: str, teacher: str, flag: str = "--teacher") -> None:
    """TeacherError unless `teacher` reads text as `student` does and predicts the same vocabulary."""
    check_model_spec(teacher)
    theirs, ours = vocabulary_size(teacher), vocabulary_size(student)
    if theirs != ours:
        raise TeacherError(f"{flag} {teacher} predicts {theirs} tokens and the student {ours}: distillation needs "
                           "the same tokenizer; give the base model the student was pruned from")
    if tokenizer_identity(teacher) != tokenizer_identity(student):
        raise TeacherError(f"{flag} {teacher} does not use the student's tokenizer: distillation compares logits "
                           "token by token; give the base model the student was pruned from")
