"""The recovery settings, checked before any work: how they fit together and with the run
(`check_settings`, no file read), then the saved model, the training data, the teacher and the LoRA
targets (`check_inputs`, configs and files only; no weights)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UsageError, require
from ..settings import spelled
from ..spec import Recovery


def check_settings(spec, pattern, method) -> None:
    rc = spec.recover
    if rc is None:
        if spec.kind == "recover":
            raise UsageError("a recover run needs its settings: RunSpec(kind='recover', recover=Recovery(...))")
        return
    if spec.kind == "eval":
        raise UsageError(f"an eval run measures the model as it is; leave out {spelled('recover.steps')}")
    if rc.warmup >= rc.steps:
        raise UsageError(f"{spelled('recover.warmup')} {rc.warmup} must be fewer than the {rc.steps} steps")
    default = Recovery()
    if not rc.distill and (rc.teacher is not None or rc.temperature != default.temperature
                           or rc.alpha != default.alpha):
        raise UsageError(f"{spelled('recover.teacher')}, {spelled('recover.temperature')} and "
                         f"{spelled('recover.alpha')} apply to distillation; add {spelled('recover.distill')}")
    lora_set = rc.lora_targets or any(getattr(rc, key) != getattr(default, key)
                                      for key in ("lora_r", "lora_alpha", "lora_update"))
    if rc.mode != "lora" and lora_set:
        raise UsageError(f"{spelled('recover.lora_r')}, {spelled('recover.lora_alpha')}, "
                         f"{spelled('recover.lora_targets')} and {spelled('recover.lora_update')} apply to "
                         f"{spelled('recover.mode')} lora")
    if any(not 0 < step <= rc.steps for step in rc.eval_at):
        raise UsageError(f"{spelled('recover.eval_at')} takes steps from 1 to {rc.steps} (got "
                         f"{','.join(map(str, rc.eval_at))})")
    if rc.checkpoint_every is not None and not spec.checkpoint_dir:
        raise UsageError(f"{spelled('recover.checkpoint_every')} needs {spelled('checkpoint_dir')} (where to write "
                         "them)")
    if rc.checkpoint_every is not None and rc.checkpoint_every >= rc.steps:
        raise UsageError(f"{spelled('recover.checkpoint_every')} {rc.checkpoint_every} would never write a checkpoint "
                         f"in {rc.steps} steps; give fewer steps between checkpoints than {rc.steps}")
    if rc.seqlen is not None and rc.train_data.startswith("tokens:"):
        raise UsageError(f"{spelled('recover.seqlen')}: the windows of {rc.train_data} are used as they are (their "
                         f"width is the window); leave {spelled('recover.seqlen')} out")
    if rc.eval_at and not spec.eval.ppl:
        raise UsageError(f"{spelled('recover.eval_at')} measures perplexity during recovery, and "
                         f"{spelled('eval.ppl')} names no source; give one, or leave {spelled('recover.eval_at')} out")
    if spec.kind == "recover" and not (spec.save_model or spec.output or spec.eval.ppl or
                                       spec.eval.tasks not in ("", "none")):
        raise UsageError(f"this recovery would keep nothing: give {spelled('save_model')} DIR and/or "
                         f"{spelled('output')} DIR, or something to measure ({spelled('eval.ppl')})")
    if spec.kind == "prune":
        if not method_prunes(method):
            raise UsageError(f"{spelled('recover.steps')} recovers a pruned model; choose a {spelled('method')} "
                             "that prunes")
        if spec.checkpoint_dir:
            raise UsageError(f"{spelled('checkpoint_dir')} with recovery in a prune run is not supported; save the "
                             f"pruned model with {spelled('save_model')} and resume its recovery with `oneshot recover`")
        if rc.iterative > 1 and (pattern.is_nm or pattern.is_structured):
            raise UsageError(f"{spelled('recover.iterative')} reaches an unstructured target in stages; pattern "
                             f"{pattern} fixes its sparsity in one go")
    elif rc.iterative != default.iterative or rc.iterative_schedule != default.iterative_schedule:
        raise UsageError(f"{spelled('recover.iterative')} belongs to a prune run: oneshot prune ... --iterative K "
                         "--recover-steps N")


def method_prunes(method) -> bool:
    return getattr(method, "prunes", True)


def check_pruned_directory(spec) -> dict:
    """A recover run reads a model saved by `oneshot prune --save-model`: a directory with its card.
    Returns the card."""
    from ..export import read_lineage

    flag = spelled("model")
    path = Path(spec.model).expanduser()
    if not path.is_dir():
        raise UsageError(f"{flag} {spec.model}: no such directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {spec.model} is not a model directory (no config.json)")
    lineage = read_lineage(path)
    if lineage is None or "method" not in lineage or "model" not in lineage:
        raise UsageError(f"{flag} {spec.model} is not a pruned model saved by oneshot (no oneshot.json lineage "
                         "card): prune it with --save-model first")
    quantization = lineage.get("quantization")
    if quantization:  # training moves weights off the grid, and a packed format would come back as floats
        raise UsageError(f"{flag} {spec.model} is quantised ({quantization.get('grid', 'int')}, saved as "
                         f"{quantization.get('format', 'hf')}): recovery would move its weights off the grid; recover "
                         "the pruned model saved before quantising, then quantise the result: oneshot prune --model "
                         "RECOVERED --method dense --quantize ...")
    return lineage


def check_inputs(spec, saved: dict | None, base: dict) -> str | None:
    """The training data, the teacher and the LoRA targets, against files and the model's architecture.
    Returns the teacher to load for distillation (None: the model as loaded, before pruning)."""
    from calibration import check_source, shared_text

    from ..models import model_skeleton
    from ..models.identity import changed_since, loadable
    from .lora import check_targets
    from .teacher import check_teacher

    rc = spec.recover
    check_source(rc.train_data, "calibration", spelled("recover.train_data"))
    for source in spec.eval.ppl:
        why = shared_text(rc.train_data, source)
        if why:
            raise UsageError(f"{spelled('recover.train_data')} and {spelled('eval.ppl')}: {why}; recovery must never "
                             "train on the evaluation text")
    teacher = None
    if rc.distill:
        if rc.teacher is not None:
            teacher = rc.teacher
        elif saved is not None:  # a saved pruned model: its dense base, wherever this run is started from
            why = changed_since(base)
            if why:
                raise UsageError(f"{spelled('recover.distill')}: the base model this one was pruned from is not "
                                 f"where its card says: {why}; give {spelled('recover.teacher')} MODEL")
            teacher = loadable(base)
        if teacher is not None:
            check_teacher(spec.model, teacher, spelled("recover.teacher"))
    if rc.mode == "lora":
        require("peft", f"{spelled('recover.mode')} lora", "recover")
        check_targets(model_skeleton(spec.model), rc.lora_targets, spelled("recover.lora_targets"))
    return teacher
