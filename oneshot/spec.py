"""RunSpec: everything that describes one run, and the one validation that every caller uses.

The CLI parses flags into a RunSpec, `oneshot prune --config RUN.yaml` reads one from YAML, a sweep
expands its grid into RunSpecs, and Python callers build one directly. `validate(spec)` checks it
all before any model is loaded and returns a Plan (the resolved device, dtype, method, options,
pattern, allocation, evaluation sources and zero-shot tasks); anything wrong is a UsageError of one
line naming the flag or key to change (`names` says how the caller spells each field).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")  # float64: for numerical studies
KINDS = ("prune", "eval", "recover")
SEED_LIMIT = 2**32  # numpy's and torch's seeds alike

# How each field is spelled on the command line, and in a YAML config.
FLAG_NAMES = {
    "model": "--model", "method": "--method", "options": "--option", "sparsity": "--sparsity",
    "pattern": "--pattern", "allocation": "--allocation", "sequential": "--sequential", "calibration.source": "--calibration",
    "calibration.nsamples": "--nsamples", "calibration.seqlen": "--seqlen", "seed": "--seed",
    "eval.ppl": "--eval-ppl", "eval.samples": "--eval-samples", "eval.tasks": "--eval-tasks",
    "eval.limit": "--eval-limit", "eval.batch_size": "--eval-batch-size", "device": "--device", "dtype": "--dtype",
    "batch_size": "--batch-size", "output": "--output", "save_model": "--save-model",
    "checkpoint_dir": "--checkpoint-dir", "resume": "--resume", "overwrite": "--overwrite",
    "quantize": "--quantize", "group_size": "--group-size", "symmetric": "--symmetric",
    "quant_method": "--quant-method", "format": "--format", "weights_on_disk": "--weights-on-disk",
    # recovery inside a prune run (`oneshot recover` spells them without the prefix: RECOVER_FLAG_NAMES)
    "recover.mode": "--recover-mode", "recover.steps": "--recover-steps", "recover.lr": "--recover-lr",
    "recover.schedule": "--recover-schedule", "recover.warmup": "--recover-warmup",
    "recover.batch_size": "--recover-batch-size", "recover.seqlen": "--recover-seqlen",
    "recover.grad_accum": "--recover-grad-accum", "recover.train_data": "--recover-data",
    "recover.distill": "--distill", "recover.temperature": "--temperature", "recover.alpha": "--distill-alpha",
    "recover.teacher": "--teacher", "recover.lora_r": "--lora-r", "recover.lora_alpha": "--lora-alpha",
    "recover.lora_targets": "--lora-targets", "recover.lora_update": "--lora-update",
    "recover.checkpoint_every": "--checkpoint-every",
    "recover.eval_at": "--recover-eval-at", "recover.iterative": "--iterative",
    "recover.iterative_schedule": "--iterative-schedule",
}
RECOVER_FLAG_NAMES = dict(FLAG_NAMES, **{
    "model": "--pruned", "recover.mode": "--mode", "recover.steps": "--steps", "recover.lr": "--lr",
    "recover.schedule": "--schedule", "recover.warmup": "--warmup", "recover.batch_size": "--batch-size",
    "recover.seqlen": "--train-seqlen", "recover.grad_accum": "--grad-accum", "recover.train_data": "--train-data",
    "recover.eval_at": "--eval-at",
})
RECOVER_MODES = ("full", "lora")
# Peak learning rates: LoRA's is Wanda's recipe (1e-4); full fine-tuning moves every kept weight, so less.
DEFAULT_LR = {"full": 5e-5, "lora": 1e-4}
FORMATS = ("hf", "compressed-tensors", "gguf")
YAML_NAMES = {key: key for key in FLAG_NAMES}


@dataclass
class Calibration:
    source: str = "wiki-offline"
    nsamples: int | None = None  # default 128; every row of a tokens: file
    seqlen: int | None = None  # default 2048; a tokens: file's width. Also the perplexity window.


@dataclass
class Evaluation:
    ppl: tuple[str, ...] = ("wiki-offline",)  # perplexity sources; () for none
    samples: int | None = None  # at most this many windows per source
    tasks: str = "none"  # zero-shot: a suite or comma-separated lm-eval task names
    limit: int | None = None  # at most this many documents per zero-shot task
    batch_size: int | str | None = None  # lm-eval batch size, or "auto"


@dataclass
class Recovery:
    """Fine-tuning after pruning with the zero pattern locked (oneshot/recover): the settings of a run of
    kind "recover" (a saved pruned model), or of the recovery that follows pruning in a prune run."""

    mode: str = "full"  # full: the block linears train | lora: peft adapters, merged back sparse
    steps: int = 100  # optimiser steps (per stage when iterative)
    lr: float | None = None  # peak; None: DEFAULT_LR[mode]
    schedule: str = "cosine"  # constant | linear | cosine (recover/schedule.py)
    warmup: int = 0  # steps rising linearly to the peak
    batch_size: int = 8  # windows per micro-batch
    seqlen: int = 512  # tokens per training window (a tokens: file's own width wins)
    grad_accum: int = 1  # micro-batches per optimiser step
    train_data: str = "wiki-offline"  # a calibration source name: its calibration split, never the evaluation one
    distill: bool = False  # KL to the dense base model's logits
    temperature: float = 1.0
    alpha: float = 1.0  # distillation's share of the loss; 1 - alpha is cross-entropy
    teacher: str | None = None  # None: the lineage card's base model (recover) or the model before pruning (prune)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple = ()  # () : the family's query and value projections
    lora_update: str = "masked"  # masked: adapters train the saved (masked) model | dense: peft's, masked at merge
    checkpoint_every: int | None = None  # with checkpoint_dir: every this many steps (default: every 10% of steps)
    eval_at: tuple = ()  # steps at which perplexity is also measured (besides before and after)
    iterative: int = 1  # prune runs: reach the target in this many prune-recover stages
    iterative_schedule: str = "linear"  # linear | cubic (recover/schedule.py)

    @property
    def peak_lr(self) -> float:
        return DEFAULT_LR.get(self.mode, 1e-4) if self.lr is None else float(self.lr)


@dataclass
class RunSpec:
    """One run. `kind` "prune" prunes and measures; "eval" measures a model as it is (method dense),
    taking method and pattern for its record from a saved model's lineage card."""

    model: str = "smollm2-135m"
    method: str = "sparsegpt"
    options: dict = field(default_factory=dict)  # the method's and the allocation's options, by name
    sparsity: float | None = None  # default 0.5; N:M patterns fix it to N/M
    pattern: str = "unstructured"
    allocation: str = "uniform"
    sequential: bool = False  # sublayer-sequential calibration (engine/sequential.py)
    calibration: Calibration = field(default_factory=Calibration)
    eval: Evaluation = field(default_factory=Evaluation)
    seed: int = 0  # calibration sampling and random models
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    output: str | None = None  # directory for result.json
    save_model: str | None = None  # directory for the pruned model and its card
    format: str = "hf"  # how save_model is written: hf | compressed-tensors | gguf
    quantize: str | None = None  # int8 | int4: quantise the (pruned) weights too
    group_size: int | None = None  # inputs per quantisation group; None: one group per output row
    symmetric: bool = False  # symmetric grid (zero point 0) instead of asymmetric
    quant_method: str = "auto"  # auto (joint with sparsegpt, else gptq) | joint | gptq | rtn
    overwrite: bool = False
    checkpoint_dir: str | None = None
    resume: bool = False
    offline: bool = False
    # Decoder blocks read from disk (or drawn, for random: presets) as the engine reaches them and written
    # back shard by shard: models larger than host memory. None: when the weights would take more than
    # half the available host memory.
    weights_on_disk: bool | None = None
    progress: bool = True
    kind: str = "prune"
    recover: Recovery | None = None  # kind "recover", or recovery after pruning in a prune run

    def replace(self, **changes) -> "RunSpec":
        return dataclasses.replace(self, **changes)

    def to_argv(self) -> list[str]:
        """The `oneshot` command line that runs this spec (recorded with every result)."""
        argv = [self.kind, "--pruned" if self.kind == "recover" else "--model", self.model]
        if self.kind == "prune":
            argv += ["--method", self.method]
            if self.pattern != "unstructured":
                argv += ["--pattern", self.pattern]
            if self.sparsity is not None:
                argv += ["--sparsity", repr(float(self.sparsity))]
            if self.allocation != "uniform":
                argv += ["--allocation", self.allocation]
            if self.sequential:
                argv += ["--sequential"]
            for name, value in self.options.items():
                argv += ["--option", f"{name}={value}"]
            if self.quantize is not None:
                argv += ["--quantize", str(self.quantize)]
                if self.group_size is not None:
                    argv += ["--group-size", str(self.group_size)]
                if self.symmetric:
                    argv += ["--symmetric"]
                if self.quant_method != "auto":
                    argv += ["--quant-method", str(self.quant_method)]
            calibration = self.calibration
            argv += ["--calibration", calibration.source]
            if calibration.nsamples is not None:
                argv += ["--nsamples", str(calibration.nsamples)]
        if self.calibration.seqlen is not None:
            argv += ["--seqlen", str(self.calibration.seqlen)]
        argv += ["--seed", str(self.seed), "--eval-ppl", ",".join(self.eval.ppl) or "none"]
        for flag, value in (("--eval-samples", self.eval.samples), ("--eval-limit", self.eval.limit),
                            ("--eval-batch-size", self.eval.batch_size), ("--batch-size", self.batch_size),
                            ("--output", self.output), ("--save-model", self.save_model),
                            ("--checkpoint-dir", self.checkpoint_dir)):
            if value is not None:
                argv += [flag, str(value)]
        if self.format != "hf":
            argv += ["--format", str(self.format)]
        if self.eval.tasks not in ("", "none"):
            argv += ["--eval-tasks", self.eval.tasks]
        argv += ["--device", self.device, "--dtype", self.dtype]
        if self.recover is not None:
            argv += self._recover_argv()
        argv += [flag for flag, on in (("--resume", self.resume), ("--overwrite", self.overwrite),
                                       ("--offline", self.offline), ("--weights-on-disk", self.weights_on_disk)) if on]
        return ["oneshot", *argv]

    def _recover_argv(self) -> list[str]:
        names = RECOVER_FLAG_NAMES if self.kind == "recover" else FLAG_NAMES
        default, argv = Recovery(), []
        for key in ("mode", "steps", "lr", "schedule", "warmup", "batch_size", "seqlen", "grad_accum", "train_data",
                    "temperature", "alpha", "teacher", "lora_r", "lora_alpha", "lora_targets", "lora_update",
                    "checkpoint_every", "eval_at", "iterative", "iterative_schedule"):
            value = getattr(self.recover, key)
            if key == "steps" or value != getattr(default, key):
                text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
                argv += [names[f"recover.{key}"], text]
        if self.recover.distill:
            argv.append(names["recover.distill"])
        return argv


@dataclass
class Plan:
    """A validated RunSpec, resolved: what run() executes."""

    spec: RunSpec
    method: object  # methods.Method
    method_options: dict
    allocation: object  # allocation.Allocation
    allocation_options: dict
    pattern: object  # methods.Pattern
    sparsity: float
    device: str
    dtype: object  # torch.dtype
    model_kind: str
    eval_sources: list[str]
    zeroshot: object | None  # evaluate.zeroshot.PreparedTasks
    grid: object | None = None  # quantize.Grid when the run quantises
    quant_method: str | None = None  # joint | gptq | rtn, resolved

    @property
    def needs_calibration(self) -> bool:
        reads = getattr(self.method, "reads_calibration", None)  # structured criteria: options decide
        method_reads = reads(self.method_options) if reads else self.method.statistic is not None
        return method_reads or self.allocation.statistic is not None


def validate(spec: RunSpec, names: dict | None = None) -> Plan:
    """Check everything that can be checked without loading the model; returns the Plan.
    Raises UsageError with one line naming the flag or key (from `names`) to change."""
    from calibration import SourceError, check_source
    from .models import ModelError, check_model_spec

    names = names or FLAG_NAMES
    fields = validate_fields(spec, names)
    name = lambda key: names.get(key, key)  # noqa: E731
    method, allocation = fields["method"], fields["allocation"]
    try:
        if method.statistic is not None or allocation.statistic is not None:
            check_source(spec.calibration.source, "calibration")
        for source in spec.eval.ppl:
            check_source(source, "evaluation")
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    if spec.kind == "recover":
        _check_pruned_directory(spec, name)
    _check_outputs(spec, name)
    _check_weights_on_disk(spec, fields, name)
    device = resolve_device(spec.device, name("device"))
    if spec.recover is not None:
        _check_recovery_inputs(spec, fields, name)
    try:
        model_kind = check_model_spec(spec.model)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    dtype = resolve_dtype(spec.dtype, device, spec.model, model_kind)
    if spec.weights_on_disk not in (None, True, False):
        raise UsageError(f"{name('weights_on_disk')} must be true or false, not {spec.weights_on_disk!r}")
    if spec.weights_on_disk:
        from .models import can_stay_on_disk

        if not can_stay_on_disk(spec.model):
            raise UsageError(f"{name('weights_on_disk')}: {spec.model} is not a local safetensors checkpoint or a "
                             "random:<preset>; only those can keep their weights on disk")
    if fields["pattern"].is_structured:
        _check_structure(spec, fields, name)
    if fields["grid"] is not None or spec.format != "hf":
        _check_quantization(spec, fields, name)
    zeroshot = _prepare_zeroshot(spec, model_kind, name)  # last: it may take seconds
    if spec.kind == "eval" and not spec.eval.ppl and zeroshot is None:
        raise UsageError(f"nothing to evaluate: give {name('eval.ppl')} SOURCE and/or {name('eval.tasks')} SUITE|TASKS")
    if fields["grid"] is not None:
        from dataclasses import replace

        from .quantize import quantizing

        if spec.format == "compressed-tensors" and str(dtype) in ("torch.float16", "torch.bfloat16"):
            # the checkpoint keeps scales in the model's dtype: quantise with exactly those
            fields["grid"] = replace(fields["grid"], scale_dtype=dtype)
        method = quantizing(method, fields["grid"], fields["quant_method"])  # same interface: the engine is unchanged
    return Plan(spec, method, fields["method_options"], allocation, fields["allocation_options"], fields["pattern"],
                fields["sparsity"], device, dtype, model_kind, list(spec.eval.ppl), zeroshot, fields["grid"],
                fields["quant_method"])


def _check_quantization(spec: RunSpec, fields: dict, name) -> None:
    """Against the model's architecture (its config, no weights): the group size divides every
    quantised layer's input width, and the save format can hold the family and the layers."""
    from .export import ExportError, check_format
    from .models import ModelError, model_skeleton
    from .quantize import QuantizationError, check_group_size

    try:
        skeleton = model_skeleton(spec.model)
        if fields["grid"] is not None:
            check_group_size(skeleton, fields["grid"], name("group_size"))
        check_format(skeleton, spec.format, fields["grid"], name)
    except (ModelError, QuantizationError, ExportError) as exc:
        raise UsageError(str(exc)) from None


def _check_weights_on_disk(spec: RunSpec, fields: dict, name) -> None:
    """What a model whose blocks stay on disk cannot do (it is never whole in memory), refused up front
    when asked for; when it is decided by size, api.run refuses the same before reading any weight."""
    if spec.weights_on_disk:
        why = weights_on_disk_conflict(spec, fields["pattern"], name)
        if why:
            raise UsageError(f"{name('weights_on_disk')} (a model larger than host memory) cannot be used with "
                             f"{why}; leave one out")


def weights_on_disk_conflict(spec: RunSpec, pattern, name=lambda key: FLAG_NAMES[key]) -> str | None:
    """What in `spec` needs the whole model in memory, or None."""
    if pattern.is_structured:
        return f"a structured {name('pattern')} (it rewrites the model whole)"
    if spec.eval.tasks not in ("", "none"):
        return f"{name('eval.tasks')} (lm-eval needs the whole model in memory)"
    if spec.checkpoint_dir:
        return name("checkpoint_dir") + " (the kept blocks are already on disk)"
    if spec.quantize not in (None, "none") or spec.format != "hf":
        return f"{name('quantize')} or {name('format')} other than hf (the writers take the whole model)"
    if spec.recover is not None:
        return f"{name('recover.steps')} (recovery trains the whole model in memory)"
    return None


def _check_structure(spec: RunSpec, fields: dict, name) -> None:
    """A structured pattern against the model's architecture (its config, no weights): the family can
    take it and the fraction leaves something of every kind."""
    from .methods import PatternError
    from .models import ModelError, model_skeleton
    from .structured import check_structured

    try:
        check_structured(model_skeleton(spec.model), fields["method"], fields["pattern"], fields["sparsity"],
                         fields["method_options"], name("sparsity"))
    except (ModelError, PatternError) as exc:
        raise UsageError(str(exc)) from None


def validate_fields(spec: RunSpec, names: dict | None = None) -> dict:
    """The checks of the spec's own values (no model, data, device or file is looked at): returns the
    method, allocation, their typed options, the pattern and the sparsity."""
    from .allocation import get_allocation
    from .methods import METHODS, OptionError, PatternError, check_sparsity, parse_pattern
    from .structured import check_structured_spec, resolve_method

    names = names or FLAG_NAMES
    name = lambda key: names.get(key, key)  # noqa: E731
    if spec.kind not in KINDS:
        raise UsageError(f"unknown run kind {spec.kind!r}; choose {' or '.join(KINDS)}")
    _check_text(spec.model, name("model"))
    try:
        if not isinstance(spec.pattern, str):
            raise PatternError(f"pattern {spec.pattern!r} is not 'unstructured' or 'N:M' (quote it: \"2:4\")")
        pattern = parse_pattern(spec.pattern)
        # The pattern decides the registry: weight-pruning methods, or structured criteria.
        method = resolve_method(spec.method, pattern, METHODS, name("method"), name("pattern"))
    except PatternError as exc:
        raise UsageError(str(exc)) from None
    if spec.kind in ("eval", "recover") and method.name != "dense":
        raise UsageError(f"an {spec.kind} run takes a model as it is: its method must be dense")
    _check_recovery_fields(spec, pattern, method, name)
    try:
        allocation = get_allocation(spec.allocation)
        method_options, allocation_options = _split_options(method, allocation, spec.options, name("options"))
        if pattern.is_structured:
            check_structured_spec(method, pattern, method_options, allocation.name, spec.checkpoint_dir, name)
        if pattern.is_nm:
            if spec.sparsity is not None and spec.sparsity != pattern.sparsity:
                raise UsageError(f"{name('sparsity')} {spec.sparsity} conflicts with pattern {pattern}, which prunes "
                                 f"{pattern.sparsity:g}; leave {name('sparsity')} out")
            if not allocation.accepts_nm:
                raise UsageError(f"{name('allocation')} {allocation.name} gives layers different sparsities, which "
                                 f"pattern {pattern} cannot (it fixes {pattern.sparsity:g}); use unstructured")
            sparsity = pattern.sparsity
        else:
            if spec.sparsity is not None:
                _check_number(spec.sparsity, name("sparsity"))
            sparsity = check_sparsity(0.5 if spec.sparsity is None else spec.sparsity)
    except (PatternError, OptionError) as exc:
        raise UsageError(str(exc)) from None
    if method.name == "dense":
        sparsity = 0.0
    _check_count(spec.calibration.nsamples, name("calibration.nsamples"))
    _check_count(spec.batch_size, name("batch_size"))
    _check_count(spec.calibration.seqlen, name("calibration.seqlen"), minimum=2)
    _check_count(spec.eval.samples, name("eval.samples"))
    _check_count(spec.eval.limit, name("eval.limit"))
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, int) or not 0 <= spec.seed < SEED_LIMIT:
        raise UsageError(f"{name('seed')} must be a whole number from 0 to {SEED_LIMIT - 1} (got {spec.seed!r})")
    batch = spec.eval.batch_size
    if batch is not None and batch != "auto" and not (str(batch).isdigit() and int(batch) > 0):
        raise UsageError(f"{name('eval.batch_size')} must be a positive whole number or auto (got {batch})")
    if not isinstance(spec.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec.device):
        raise UsageError(f"unknown device {spec.device!r}; choose auto, cpu, cuda or cuda:N")
    if spec.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {spec.dtype!r}; choose {', '.join(DTYPES)}")
    if not isinstance(spec.sequential, bool):
        raise UsageError(f"{name('sequential')} must be true or false, not {spec.sequential!r}")
    if not isinstance(spec.calibration.source, str) or not spec.calibration.source.strip():
        raise UsageError(f"{name('calibration.source')} must be a source name")
    grid, quant_method = _check_quantize_fields(spec, method, pattern, name)
    return dict(method=method, method_options=method_options, allocation=allocation,
                allocation_options=allocation_options, pattern=pattern, sparsity=sparsity, grid=grid,
                quant_method=quant_method)


def _check_recovery_fields(spec: RunSpec, pattern, method, name) -> None:
    """The recovery settings' own values (no file or model is looked at)."""
    from .recover import LR_SCHEDULES, SPARSITY_SCHEDULES
    from .recover.lora import UPDATES as LORA_UPDATES

    rc = spec.recover
    if rc is None:
        if spec.kind == "recover":
            raise UsageError("a recover run needs its settings: RunSpec(kind='recover', recover=Recovery(...))")
        return
    if spec.kind == "eval":
        raise UsageError(f"an eval run measures the model as it is; leave out {name('recover.steps')}")
    if not isinstance(rc, Recovery):
        raise UsageError(f"recover must be a Recovery, not {type(rc).__name__}")
    if rc.mode not in RECOVER_MODES:
        raise UsageError(f"unknown {name('recover.mode')} {rc.mode!r}; choose {' or '.join(RECOVER_MODES)}")
    for key in ("steps", "batch_size", "grad_accum", "lora_r", "lora_alpha", "iterative", "checkpoint_every"):
        _check_count(getattr(rc, key), name(f"recover.{key}"))
    _check_count(rc.seqlen, name("recover.seqlen"), minimum=2)
    _check_count(rc.warmup, name("recover.warmup"), minimum=0)
    if rc.warmup >= rc.steps:
        raise UsageError(f"{name('recover.warmup')} {rc.warmup} must be fewer than the {rc.steps} steps")
    if rc.lr is not None:
        _check_number(rc.lr, name("recover.lr"))
        if not 0 < rc.lr < 1:
            raise UsageError(f"{name('recover.lr')} must be in (0, 1) (got {rc.lr!r})")
    if rc.schedule not in LR_SCHEDULES:
        raise UsageError(f"unknown {name('recover.schedule')} {rc.schedule!r}; choose {', '.join(LR_SCHEDULES)}")
    if rc.iterative_schedule not in SPARSITY_SCHEDULES:
        raise UsageError(f"unknown {name('recover.iterative_schedule')} {rc.iterative_schedule!r}; choose "
                         f"{' or '.join(SPARSITY_SCHEDULES)}")
    if not isinstance(rc.distill, bool):
        raise UsageError(f"{name('recover.distill')} must be true or false, not {rc.distill!r}")
    _check_number(rc.temperature, name("recover.temperature"))
    if not rc.temperature > 0:
        raise UsageError(f"{name('recover.temperature')} must be positive (got {rc.temperature!r})")
    _check_number(rc.alpha, name("recover.alpha"))
    if not 0 <= rc.alpha <= 1:
        raise UsageError(f"{name('recover.alpha')} must be in [0, 1] (got {rc.alpha!r})")
    if not rc.distill and (rc.teacher is not None or rc.temperature != 1.0 or rc.alpha != 1.0):
        raise UsageError(f"{name('recover.teacher')}, {name('recover.temperature')} and {name('recover.alpha')} "
                         f"apply to distillation; add {name('recover.distill')}")
    if rc.lora_update not in LORA_UPDATES:
        raise UsageError(f"unknown {name('recover.lora_update')} {rc.lora_update!r}; choose {' or '.join(LORA_UPDATES)}")
    lora_set = rc.lora_targets or any(getattr(rc, key) != getattr(Recovery(), key)
                                      for key in ("lora_r", "lora_alpha", "lora_update"))
    if rc.mode != "lora" and lora_set:
        raise UsageError(f"{name('recover.lora_r')}, {name('recover.lora_alpha')}, {name('recover.lora_targets')} "
                         f"and {name('recover.lora_update')} apply to {name('recover.mode')} lora")
    if not isinstance(rc.train_data, str) or not rc.train_data.strip():
        raise UsageError(f"{name('recover.train_data')} must be a source name")
    if any(isinstance(step, bool) or not isinstance(step, int) or not 0 < step <= rc.steps for step in rc.eval_at):
        raise UsageError(f"{name('recover.eval_at')} takes steps from 1 to {rc.steps} (got "
                         f"{','.join(map(str, rc.eval_at))})")
    if rc.checkpoint_every is not None and not spec.checkpoint_dir:
        raise UsageError(f"{name('recover.checkpoint_every')} needs {name('checkpoint_dir')} (where to write them)")
    if spec.kind == "prune":
        if method.name == "dense":
            raise UsageError(f"{name('recover.steps')} recovers a pruned model; choose a {name('method')} other "
                             "than dense")
        if spec.checkpoint_dir:
            raise UsageError(f"{name('checkpoint_dir')} with recovery in a prune run is not supported; save the pruned "
                             f"model with {name('save_model')} and resume its recovery with `oneshot recover`")
        if rc.iterative > 1 and (pattern.is_nm or pattern.is_structured):
            raise UsageError(f"{name('recover.iterative')} reaches an unstructured target in stages; pattern "
                             f"{pattern} fixes its sparsity in one go")
    elif rc.iterative != 1 or rc.iterative_schedule != "linear":
        raise UsageError(f"{name('recover.iterative')} belongs to a prune run: oneshot prune ... --iterative K "
                         "--recover-steps N")


def _check_pruned_directory(spec: RunSpec, name) -> None:
    """A recover run reads a model saved by `oneshot prune --save-model`: a directory with its card."""
    path = Path(spec.model).expanduser() if isinstance(spec.model, str) else None
    if path is None or not path.is_dir():
        raise UsageError(f"{name('model')} {spec.model}: no such directory")
    if not (path / "config.json").is_file():
        raise UsageError(f"{name('model')} {spec.model} is not a model directory (no config.json)")
    card = path / "oneshot.json"
    try:
        lineage = json.loads(card.read_text()) if card.is_file() else None
    except (OSError, ValueError):
        raise UsageError(f"{card} is damaged (not JSON); save the pruned model again") from None
    if not isinstance(lineage, dict) or "method" not in lineage or "model" not in lineage:
        raise UsageError(f"{name('model')} {spec.model} is not a pruned model saved by oneshot (no oneshot.json "
                         "lineage card): prune it with --save-model first")


def _check_recovery_inputs(spec: RunSpec, fields: dict, name) -> None:
    """The training data, the teacher and the LoRA targets, against files and the model's architecture."""
    from calibration import SourceError, check_source
    from .models import ModelError, model_skeleton
    from .recover import LoraError
    from .recover.teacher import TeacherError, check_teacher

    rc = spec.recover
    try:
        check_source(rc.train_data, "calibration")
    except SourceError as exc:
        raise UsageError(f"{name('recover.train_data')}: {exc}") from None
    if rc.train_data.startswith(("file:", "tokens:")) and rc.train_data in spec.eval.ppl:
        raise UsageError(f"{name('recover.train_data')} {rc.train_data} is also an {name('eval.ppl')} source: "
                         "recovery must never train on the evaluation text")
    if rc.distill:
        teacher = rc.teacher or (lineage_of_directory(spec.model)["model"] if spec.kind == "recover" else None)
        try:
            if teacher is not None:
                check_teacher(spec.model, teacher, name("recover.teacher"))
        except (ModelError, TeacherError) as exc:
            raise UsageError(str(exc)) from None
    if rc.mode == "lora":
        from .recover.lora import check_targets

        try:
            check_targets(model_skeleton(spec.model), rc.lora_targets, name("recover.lora_targets"))
        except (ModelError, LoraError) as exc:
            raise UsageError(str(exc)) from None


def lineage_of_directory(directory: str) -> dict:
    """The lineage card (oneshot.json) of a saved model directory."""
    return json.loads((Path(directory).expanduser() / "oneshot.json").read_text())


def _check_quantize_fields(spec: RunSpec, method, pattern, name):
    """--quantize and its companions, and --format: returns (quantize.Grid or None, resolved quant method)."""
    from .quantize import BITS, QUANT_METHODS, Grid, resolve_quant_method

    if spec.format not in FORMATS:
        raise UsageError(f"unknown {name('format')} {spec.format!r}; choose {', '.join(FORMATS)}")
    if spec.format != "hf" and not spec.save_model:
        raise UsageError(f"{name('format')} {spec.format} says how to save the model: give {name('save_model')} DIR too")
    if not isinstance(spec.symmetric, bool):
        raise UsageError(f"{name('symmetric')} must be true or false, not {spec.symmetric!r}")
    if spec.quant_method not in QUANT_METHODS:
        raise UsageError(f"unknown {name('quant_method')} {spec.quant_method!r}; choose {', '.join(QUANT_METHODS)}")
    if spec.quantize is None:
        for key, unset in (("group_size", None), ("symmetric", False), ("quant_method", "auto")):
            if getattr(spec, key) != unset:
                raise UsageError(f"{name(key)} applies to quantisation; add {name('quantize')} int8|int4")
        if spec.format == "compressed-tensors":
            raise UsageError(f"{name('format')} compressed-tensors stores quantised weights; add {name('quantize')} "
                             f"int8|int4, or save with {name('format')} hf")
        return None, None
    if not isinstance(spec.quantize, str) or spec.quantize not in BITS:
        raise UsageError(f"{name('quantize')} {spec.quantize!r} is not supported; choose {' or '.join(BITS)}")
    _check_count(spec.group_size, name("group_size"))
    if spec.kind in ("eval", "recover"):
        raise UsageError(f"an {spec.kind} run takes the model as it is; leave out {name('quantize')}")
    if spec.recover is not None:
        raise UsageError(f"recovery would move the weights off the {name('quantize')} grid; prune and recover with "
                         f"--save-model, then quantise in a second run")
    if pattern.is_structured:
        raise UsageError(f"{name('quantize')} is not available with a structured {name('pattern')} yet; save the "
                         f"structured model and quantise it in a second run")
    how = resolve_quant_method(method.name, spec.quant_method)
    if how == "joint" and method.name != "sparsegpt":
        raise UsageError(f"{name('quant_method')} joint is SparseGPT's sweep; use gptq or rtn with {method.name}")
    if spec.checkpoint_dir:
        raise UsageError(f"{name('checkpoint_dir')} cannot keep quantisation parameters yet; leave it out with "
                         f"{name('quantize')}")
    if spec.format == "gguf":  # Q8_0 and Q4_0 blocks store their scale as float16: use exactly those scales
        import torch

        return Grid(BITS[spec.quantize], spec.group_size, spec.symmetric, torch.float16), how
    return Grid(BITS[spec.quantize], spec.group_size, spec.symmetric), how


def _split_options(method, allocation, given: dict, flag: str) -> tuple[dict, dict]:
    """Options go to whichever of the method and the allocation declares them."""
    if not isinstance(given, dict):
        raise UsageError(f"{flag} must map option names to values")
    mine = {o.name for o in allocation.options}
    return (method.check_options({k: v for k, v in given.items() if k not in mine}),
            allocation.check_options({k: v for k, v in given.items() if k in mine}))


def _check_text(value, flag: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{flag} must be given as text, not {value!r}")


def _check_number(value, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{flag} must be a number, not {value!r}")


def _check_count(value, flag: str, minimum: int = 1) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number of at least {minimum}"
        raise UsageError(f"{flag} must be {what} (got {value!r})")


def _check_outputs(spec: RunSpec, name) -> None:
    """Every path the run writes, before any work: kind, writability, collisions with each other and
    with every file the run reads."""
    from . import paths

    if spec.kind == "eval" and spec.save_model:
        raise UsageError("an eval run saves no model; leave out " + name("save_model"))
    outputs = []
    for key, whole in (("output", False), ("save_model", True)):
        value = getattr(spec, key)
        if value is not None:
            outputs.append((name(key), paths.output_dir(value, name(key), spec.overwrite, name("overwrite")), whole))
    if spec.resume and not spec.checkpoint_dir:
        raise UsageError(f"{name('resume')} needs {name('checkpoint_dir')} (the directory of the run to continue)")
    if spec.checkpoint_dir is not None:
        directory = paths.output_dir(spec.checkpoint_dir, name("checkpoint_dir"), allow_existing=True)
        state = directory / "state.json"
        if state.exists() and not spec.resume:
            raise UsageError(f"{name('checkpoint_dir')} {spec.checkpoint_dir} holds a checkpoint; pass "
                             f"{name('resume')} to continue it, or choose another directory")
        if spec.resume and not state.exists():
            raise UsageError(f"{name('resume')}: {spec.checkpoint_dir} holds no checkpoint (no state.json)")
        outputs.append((name("checkpoint_dir"), directory, False))
    paths.check_collisions(outputs, input_paths(spec, name))


def input_paths(spec: RunSpec, name) -> list[tuple[str, Path]]:
    """The files and directories a run reads, resolved: the model, file:/tokens: sources."""
    found = []
    model = Path(spec.model).expanduser()
    if not spec.model.startswith("random:") and model.exists():
        found.append((name("model"), model.resolve()))
    sources = [(name("calibration.source"), spec.calibration.source)]
    if spec.recover is not None:
        sources.append((name("recover.train_data"), spec.recover.train_data))
    sources += [(name("eval.ppl"), source) for source in spec.eval.ppl]
    for flag, source in sources:
        for prefix in ("file:", "tokens:"):
            if isinstance(source, str) and source.startswith(prefix):
                found.append((flag, Path(source[len(prefix):]).expanduser().resolve()))
    return found


def _prepare_zeroshot(spec: RunSpec, model_kind: str, name):
    """Check the zero-shot tasks and load their data (None if no tasks): may take seconds."""
    from .evaluate.zeroshot import ZeroShotError, parse_task_spec, prepare_tasks

    try:
        if not parse_task_spec(spec.eval.tasks):
            return None
        if model_kind == "random":
            raise UsageError(f"{name('eval.tasks')} needs a model with a real tokenizer; random:<preset> models "
                             "read bytes")
        return prepare_tasks(spec.eval.tasks)
    except ZeroShotError as exc:
        raise UsageError(str(exc)) from None


def resolve_device(text: str, flag: str = "--device") -> str:
    import torch

    if not isinstance(text, str):
        raise UsageError(f"unknown device {text!r}; choose auto, cpu, cuda or cuda:N")
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if re.fullmatch(r"cuda(:\d+)?", text):
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {text} was asked for but no CUDA GPU is visible; use {flag} cpu")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return text
    raise UsageError(f"unknown device {text!r}; choose auto, cpu, cuda or cuda:N")


def resolve_dtype(text: str, device: str, model: str, model_kind: str):
    import torch

    if text != "auto":
        return getattr(torch, text)
    if device == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and gain nothing here
    if model_kind in ("hub", "local"):
        from transformers import AutoConfig

        if getattr(AutoConfig.from_pretrained(model), "dtype", None) == torch.bfloat16:
            return torch.bfloat16  # bf16-trained weights can overflow in fp16
    return torch.float16


# ---- a RunSpec from a mapping (YAML) ---------------------------------------------------------------

RUN_KEYS = ("model", "method", "options", "sparsity", "pattern", "allocation", "sequential", "calibration", "eval", "seed", "device",
            "dtype", "batch_size", "output", "save_model", "overwrite", "checkpoint_dir", "resume", "offline", "quantize",
            "group_size", "symmetric", "quant_method", "format", "weights_on_disk", "recover")
RECOVER_KEYS = tuple(f.name for f in dataclasses.fields(Recovery))
CALIBRATION_KEYS = ("source", "nsamples", "seqlen", "seed")
EVAL_KEYS = ("ppl", "samples", "tasks", "limit", "batch_size")


def spec_from_mapping(data: dict, where: str, base: RunSpec | None = None, relative_to: Path | None = None) -> RunSpec:
    """A RunSpec from a config mapping (`oneshot prune --config RUN.yaml`); only the shape is checked
    here (keys, lists, mappings), the values by validate(). Paths are relative to `relative_to`."""
    spec = base or RunSpec()
    check_keys(data, RUN_KEYS, "", where)
    changes = {}
    for key in ("model", "method", "sparsity", "pattern", "allocation", "sequential", "seed", "device", "dtype", "batch_size",
                "output", "save_model", "overwrite", "checkpoint_dir", "resume", "offline", "quantize", "group_size",
                "symmetric", "quant_method", "format", "weights_on_disk"):
        if key in data and data[key] is not None:
            changes[key] = data[key]
    for key in ("output", "save_model", "checkpoint_dir"):
        if isinstance(changes.get(key), str):
            changes[key] = resolve_path(changes[key], relative_to)
    if "options" in data and data["options"] is not None:
        if not isinstance(data["options"], dict):
            raise UsageError(f"{where}: options must map option names to values")
        changes["options"] = dict(data["options"])
    calibration = dataclasses.replace(spec.calibration)
    if data.get("calibration") is not None:
        raw = data["calibration"]
        check_keys(raw, CALIBRATION_KEYS, "calibration.", where)
        for key in ("source", "nsamples", "seqlen"):
            if raw.get(key) is not None:
                setattr(calibration, key, raw[key])
        if raw.get("seed") is not None:
            changes["seed"] = raw["seed"]
        if isinstance(calibration.source, str):
            calibration.source = resolve_source(calibration.source, relative_to)
    evaluation = dataclasses.replace(spec.eval)
    if data.get("eval") is not None:
        raw = data["eval"]
        check_keys(raw, EVAL_KEYS, "eval.", where)
        if "ppl" in raw:
            evaluation.ppl = tuple(resolve_source(s, relative_to) for s in source_list(raw["ppl"], f"{where}: eval.ppl"))
        for key in ("samples", "limit", "batch_size"):
            if raw.get(key) is not None:
                setattr(evaluation, key, raw[key])
        if raw.get("tasks") is not None:
            tasks = raw["tasks"]
            evaluation.tasks = ",".join(tasks) if isinstance(tasks, list) else str(tasks)
    if data.get("recover") is not None:
        raw = data["recover"]
        check_keys(raw, RECOVER_KEYS, "recover.", where)
        values = {key: value for key, value in raw.items() if value is not None}
        for key in ("lora_targets", "eval_at"):
            if key in values:
                items = values[key].split(",") if isinstance(values[key], str) else values[key]
                if not isinstance(items, list):
                    raise UsageError(f"{where}: recover.{key} must be a list")
                values[key] = tuple(int(i) if key == "eval_at" and str(i).strip().isdigit() else
                                    (i.strip() if isinstance(i, str) else i) for i in items)
        if isinstance(values.get("train_data"), str):
            values["train_data"] = resolve_source(values["train_data"], relative_to)
        changes["recover"] = dataclasses.replace(spec.recover or Recovery(), **values)
    return spec.replace(calibration=calibration, eval=evaluation, **changes)


def check_keys(mapping, allowed, prefix: str, where: str) -> None:
    if not isinstance(mapping, dict):
        raise UsageError(f"{where}: {prefix.rstrip('.') or 'the top level'} must be a mapping with keys "
                         f"{', '.join(allowed)}")
    for key in mapping:
        if key not in allowed:
            raise UsageError(f"{where}: unknown key {prefix + str(key)!r}; allowed keys"
                             f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(allowed)}")


def source_list(value, where: str) -> list[str]:
    """Sources as a list: 'a,b', [a, b], or none/empty for no sources."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return []
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",")]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where} must be a non-empty list")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise UsageError(f"{where}: {item!r} is not a name")
    return list(dict.fromkeys(item.strip() for item in value))


def resolve_source(source: str, relative_to: Path | None) -> str:
    """file:/tokens: paths in a config are relative to the config's directory."""
    source = source.strip()
    for prefix in ("file:", "tokens:"):
        if source.startswith(prefix) and relative_to is not None:
            return prefix + resolve_path(source[len(prefix):], relative_to)
    return source


def resolve_path(path: str, relative_to: Path | None) -> str:
    target = Path(path).expanduser()
    if relative_to is not None and not target.is_absolute():
        target = relative_to / target
    return str(target)
