"""Planning a run: every setting checked before any model is loaded, each by the subsystem that owns
it, in order; the result is the Plan that api.run executes.

`check_fields` looks at the spec's values alone (the declared types and ranges, then how the method,
pattern, allocation, options, recovery and quantisation fit together): a sweep calls it for every grid
point. `make_plan` adds what needs files, the model's config and the device. Anything wrong is a
UsageError (or one of its subclasses) of one line, naming the setting as the caller spells it
(settings.Spelling: a flag, a config key or a Python attribute).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import UsageError
from .settings import check_values, entry, spelled
from .spec import KINDS, RunSpec


@dataclass
class Fields:
    """The spec's values resolved without looking at any file, model or device."""

    prunes: bool
    method: object  # methods.Method, or a structured.Criterion for a structured pattern
    method_options: dict
    allocation: object  # allocation.Allocation
    allocation_options: dict
    pattern: object  # methods.Pattern
    sparsity: float
    grid: object | None  # quantize.Grid when the run quantises
    quant_method: str | None  # joint | gptq | rtn, resolved


@dataclass
class Plan:
    """A checked RunSpec, resolved: what run() executes."""

    spec: RunSpec
    method: object  # methods.Method (wrapped by quantize.quantizing when the run quantises)
    method_options: dict
    allocation: object
    allocation_options: dict
    pattern: object
    sparsity: float
    device: str
    dtype: object  # torch.dtype
    model_kind: str  # alias | random | gguf | local | hub
    eval_sources: list[str]
    zeroshot: object | None  # evaluate.zeroshot.PreparedTasks
    grid: object | None = None
    quant_method: str | None = None
    lineage: dict | None = None  # the input model's lineage card (eval and recover runs of a saved model)
    prunes: bool = True  # whether the method changes weights (dense does not)
    source: dict | None = None  # models.identity of this run's input model
    base: dict | None = None  # models.identity of the dense model this run's model comes from
    teacher: str | None = None  # distillation's teacher to load; None: the model as loaded, before pruning
    eval_bos: bool = False  # each perplexity window starts with BOS: eval.bos, or the family's convention

    @property
    def needs_calibration(self) -> bool:
        return reads_calibration(self.method, self.method_options, self.allocation)


def reads_calibration(method, options: dict, allocation) -> bool:
    reads = getattr(method, "reads_calibration", None)  # structured criteria: their options decide
    method_reads = reads(options) if reads else method.statistic is not None
    return bool(method_reads or allocation.statistic is not None)


def check_fields(spec: RunSpec) -> Fields:
    """The checks of the spec's own values: no model, data, device or file is looked at."""
    from . import allocation as allocations
    from .methods import METHODS, PatternError, check_sparsity, parse_pattern
    from .models.placement import check_device_text
    from .quantize.method import check_settings as check_quantize
    from .recover.preconditions import check_settings as check_recovery
    from .structured import check_structured_spec, resolve_method

    if spec.kind not in KINDS:
        raise UsageError(f"unknown run kind {spec.kind!r}; choose {' or '.join(KINDS)}")
    check_values(spec)
    check_device_text(spec.device)
    pattern = parse_pattern(spec.pattern)
    # The pattern decides the registry: weight-pruning methods, or structured criteria.
    method = resolve_method(spec.method, pattern, METHODS, spelled("method"), spelled("pattern"))
    prunes = getattr(method, "prunes", True)
    if spec.kind in ("eval", "recover") and prunes:
        raise UsageError(f"an {spec.kind} run takes a model as it is: its method must be dense")
    check_recovery(spec, pattern, method)
    if spec.sequential and (pattern.is_structured or getattr(method, "statistic", None) is None):
        why = "a structured pattern scores whole units" if pattern.is_structured else \
            f"{method.name} reads no calibration data"
        raise UsageError(f"{spelled('sequential')} changes the order in which calibration data reaches each block's "
                         f"layers, and {why}: it would change nothing; leave it out")
    if spec.sequential and getattr(method, "stages", None) is not None:  # both replace the block's stage sequence
        raise UsageError(f"{spelled('sequential')} cannot be combined with {method.name}, which runs each block through "
                         "stages of its own (it prunes and optimises the whole block at once); leave it out")
    if spec.asymmetric:
        check_asymmetric(spec, method, pattern)
    check_refit(spec)
    allocation, method_options, allocation_options = allocations.check(spec, method, pattern)
    if pattern.is_structured:
        check_structured_spec(method, pattern, method_options, allocation.name, spec.checkpoint_dir, spelled)
    if pattern.is_nm:
        if spec.sparsity is not None and spec.sparsity != pattern.sparsity:
            raise PatternError(f"{spelled('sparsity')} {spec.sparsity} conflicts with pattern {pattern}, which prunes "
                               f"{pattern.sparsity:g}; leave {spelled('sparsity')} out")
        sparsity = pattern.sparsity
    else:
        sparsity = check_sparsity(0.5 if spec.sparsity is None else spec.sparsity)
    if not prunes:
        sparsity = 0.0
    grid, quant_method = check_quantize(spec, method, pattern)
    return Fields(prunes, method, method_options, allocation, allocation_options, pattern, sparsity, grid, quant_method)


def check_asymmetric(spec: RunSpec, method, pattern) -> None:
    """--asymmetric hands a reconstructing method another target weight, block by block (engine/sequential.py)."""
    from .methods import METHODS

    if pattern.is_structured or not getattr(method, "reconstructs", False):
        takes = ", ".join(name for name, m in METHODS.items() if getattr(m, "reconstructs", False))
        what = "a structured pattern" if pattern.is_structured else f"method {method.name}"
        raise UsageError(f"{spelled('asymmetric')} changes the weight a layer reconstructs, and {what} does not "
                         f"reconstruct one; it works with {takes}")
    if not spec.sequential:
        raise UsageError(f"{spelled('asymmetric')} corrects each layer for the error of the layers before it, "
                         f"so those must already be pruned when it is calibrated: add {spelled('sequential')}")
    if spec.checkpoint_dir:
        raise UsageError(f"{spelled('asymmetric')} carries the dense model's hidden states from block to block, "
                         f"which a checkpoint does not keep; leave out {spelled('checkpoint_dir')}")


def check_refit(spec: RunSpec) -> None:
    """--refit runs inside the sublayer-sequential stage, after a block's groups are pruned (engine/refit.py)."""
    if not spec.refit:
        if spec.refit_lr != entry("refit_lr").default:
            raise UsageError(f"{spelled('refit_lr')} sets the learning rate of {spelled('refit')}, which is off: "
                             f"add {spelled('refit')} PASSES or leave it out")
        return
    if not spec.sequential:
        raise UsageError(f"{spelled('refit')} fits each pruned block inside the sublayer-sequential pass: add "
                         f"{spelled('sequential')}")
    if spec.quantize:
        raise UsageError(f"{spelled('refit')} moves the kept weights off the quantisation grid; leave out "
                         f"{spelled('quantize')} or {spelled('refit')}")


def check_dense_blocks(spec: RunSpec, skeleton) -> None:
    """--asymmetric and --refit pair the dense and pruned models' tokens, which routing to experts breaks."""
    from .engine.sequential import experts_refused

    moe = next((name for name, _ in skeleton.named_modules() if name.endswith(".experts")), None)
    if moe is not None:
        setting = "asymmetric" if spec.asymmetric else "refit"
        raise UsageError(experts_refused(setting, f"{spec.model} ({moe.rsplit('.experts', 1)[0]})"))


def make_plan(spec: RunSpec) -> Plan:
    """Everything that can be checked without loading the model's weights; returns the Plan."""
    from calibration import check_source

    from . import export
    from .evaluate.readiness import check as check_evaluation
    from .models import model_skeleton
    from .checkpoint import check_resume
    from .models.identity import base_identity, model_identity
    from .models.placement import check as check_model
    from .paths import check_outputs
    from .quantize.method import check_model as check_quantized_model
    from .recover.preconditions import check_inputs as check_recovery_inputs
    from .recover.preconditions import check_pruned_directory

    fields = check_fields(spec)
    export.check_settings(spec)
    if reads_calibration(fields.method, fields.method_options, fields.allocation):
        check_source(spec.calibration.source, "calibration", spelled("calibration.source"))
    if spec.kind == "recover":
        check_pruned_directory(spec)
    check_outputs(spec)
    model_kind, device, dtype = check_model(spec, fields.pattern)
    saved = export.read_lineage(spec.model) if model_kind in ("local", "gguf") else None  # saved by oneshot
    lineage = saved if spec.kind in ("eval", "recover") else None
    source = model_identity(spec.model, spec.seed)
    base = base_identity(spec.model, spec.seed, saved)
    teacher = None
    if spec.recover is not None:
        teacher = check_recovery_inputs(spec, saved, base)
    if spec.resume:
        check_resume(spec.checkpoint_dir, checkpoint_fingerprint(spec, source, dtype), spelled("checkpoint_dir"))
    if spec.asymmetric or spec.refit:
        check_dense_blocks(spec, model_skeleton(spec.model))
    if fields.pattern.is_structured or fields.grid is not None or spec.format != "hf":
        skeleton = model_skeleton(spec.model)
        if fields.pattern.is_structured:
            from .structured import check_structured

            check_structured(skeleton, fields.method, fields.pattern, fields.sparsity, fields.method_options,
                             spelled("sparsity"))
        if fields.grid is not None:
            check_quantized_model(skeleton, fields.grid, spec.quantize_head)
        export.check_format(skeleton, spec.format, fields.grid, removes_blocks=fields.pattern.structure == "layers")
    zeroshot = check_evaluation(spec, model_kind)  # last: it may take seconds
    method = fields.method
    if getattr(method, "configure", None):  # a method whose statistic depends on its options (DSnoT's base)
        method = method.configure(method, fields.method_options)
    if fields.grid is not None:
        from .quantize import quantizing

        if spec.format == "compressed-tensors" and str(dtype) in ("torch.float16", "torch.bfloat16"):
            # the checkpoint keeps scales in the model's dtype: quantise with exactly those
            fields.grid = replace(fields.grid, scale_dtype=dtype)
        method = quantizing(method, fields.grid, fields.quant_method)  # same interface: the engine is unchanged
    return Plan(spec, method, fields.method_options, fields.allocation, fields.allocation_options, fields.pattern,
                fields.sparsity, device, dtype, model_kind, list(spec.eval.ppl), zeroshot, fields.grid,
                fields.quant_method, lineage, fields.prunes, source, base, teacher)


def checkpoint_fingerprint(spec: RunSpec, source: dict, dtype) -> dict:
    """What a checkpoint must share with the run that resumes it, as far as the settings and the input
    model tell (the engine adds the calibration windows' digest; recovery the training windows' width)."""
    fingerprint = {"model": source, "dtype": str(dtype), "seed": spec.seed}
    if spec.kind == "recover":
        from .recover import training_fingerprint

        fingerprint.update(training_fingerprint(spec.recover, spec.seed))
    return fingerprint
