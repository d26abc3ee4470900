"""The evaluation settings, checked before any work: every perplexity source can be read, the zero-shot
tasks exist and their data is at hand (loaded here: it may take seconds), and there is something to measure."""
from __future__ import annotations

from ..errors import UsageError, require
from ..settings import spelled


def check(spec, model_kind: str):
    """The prepared zero-shot tasks (evaluate.zeroshot.PreparedTasks), or None when there are none."""
    from calibration import check_source

    from .zeroshot import ZeroShotError, parse_task_spec, prepare_tasks

    for source in spec.eval.ppl:
        check_source(source, "evaluation", spelled("eval.ppl"))
    zeroshot = None
    if parse_task_spec(spec.eval.tasks):
        if model_kind == "random":
            raise ZeroShotError(f"{spelled('eval.tasks')} needs a model with a real tokenizer; random:<preset> "
                                "models read bytes")
        zeroshot = prepare_tasks(spec.eval.tasks)
    if spec.eval.runtime == "llama.cpp":
        if model_kind not in ("gguf", "alias"):
            raise UsageError(f"{spelled('eval.runtime')} llama.cpp runs a GGUF file; give {spelled('model')} "
                             "DIR/model.gguf (a model saved with --format gguf)")
        if zeroshot is not None:
            raise UsageError(f"{spelled('eval.tasks')} run through lm-eval in transformers; with "
                             f"{spelled('eval.runtime')} llama.cpp measure perplexity only")
        require("llama_cpp", f"{spelled('eval.runtime')} llama.cpp", "llamacpp", "llama-cpp-python")
    if spec.kind == "eval" and not spec.eval.ppl and zeroshot is None:
        raise UsageError(f"nothing to evaluate: give {spelled('eval.ppl')} SOURCE and/or {spelled('eval.tasks')} "
                         "SUITE|TASKS")
    return zeroshot
