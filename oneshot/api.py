"""The one way a run happens: `run(RunSpec) -> Record`, from the CLI, a sweep, a worker or Python.

    from oneshot import RunSpec, run
    record = run(RunSpec(method="wanda", sparsity=0.5, pattern="2:4"))
    record.ppl["wiki-offline"], record.sparsity_measured

run() plans the spec (plan.make_plan: every setting checked before any work), then runs one of three
short pipelines over the shared steps in steps.py: prune (calibrate, allocate, prune, optionally
recover, evaluate, save), evaluate (measure a model as it is) and recover (fine-tune a saved pruned
model). It prints nothing: progress bars aside, it reports through the `oneshot` logger, and failures
are UsageError (bad input) or RunError (the run could not finish), or subclasses of them.
"""
from __future__ import annotations

import logging
import time

from . import steps
from .errors import RunError
from .plan import Plan, make_plan
from .record import Record, provenance
from .settings import KEYS, Spelling, spelled, to_mapping
from .spec import RunSpec

log = logging.getLogger("oneshot")


def run(spec: RunSpec, loaded=None, spelling: Spelling | None = None) -> Record:
    """Run `spec`; `loaded` is a models.LoadedModel to use instead of loading (a sweep's copy).
    `spelling` names settings in messages as the caller's user knows them: flags, config keys (the
    default, which are also the RunSpec's attribute paths) or a sweep's keys."""
    with (spelling or KEYS).active():
        plan = make_plan(spec)
        if spec.offline:  # before anything can import datasets or probe the Hub
            from .evaluate.zeroshot import configure_offline

            configure_offline(force=True)
        import torch

        try:
            return _with_model(plan, loaded)
        except torch.cuda.OutOfMemoryError:
            raise RunError(f"CUDA ran out of memory; lower {spelled('batch_size')}, {spelled('calibration.nsamples')} "
                           f"or {spelled('calibration.seqlen')}, or use {spelled('device')} cpu") from None


def _with_model(plan: Plan, loaded) -> Record:
    from .models import block_weights

    timings: dict[str, float] = {}
    if loaded is None:
        loaded = steps.load(plan, timings)
    else:
        timings["load_s"] = 0.0
    on_disk = block_weights(loaded.model)
    try:
        if on_disk is not None:
            steps.check_on_disk(plan, on_disk)
        plan = steps.adapt(plan, loaded)
        seqlen = steps.check_against_model(loaded, plan)
        record, report = PIPELINES[plan.spec.kind](plan, loaded, seqlen, timings)
        if plan.spec.save_model:
            steps.save(plan, loaded, record, report)
        if plan.spec.output:
            log.info(f"wrote {record.write(plan.spec.output)}")
        return record
    finally:
        if on_disk is not None:
            on_disk.close()  # the kept blocks' spill shards: moved into a saved model, or removed


def prune(plan: Plan, loaded, seqlen, timings: dict) -> tuple[Record, object]:
    """Calibrate, allocate, prune (in stages with recovery between them when iterative), recover, evaluate."""
    spec = plan.spec
    ids, calibration = None, None
    if plan.needs_calibration:
        ids, calibration = steps.calibration(plan, loaded.model, loaded.tokenizer, seqlen, timings)
        seqlen = seqlen or int(ids.shape[1])  # a tokens: file sets it for evaluation too
    _reset_peak_memory(plan)
    teacher = steps.teacher(plan, loaded, timings)  # the dense model, kept aside before pruning changes it
    recovery, stages = None, None
    if spec.recover is not None and spec.recover.iterative > 1:
        report, stages, recovery = steps.iterative(plan, loaded, ids, seqlen, teacher, timings)
    else:
        started = time.perf_counter()
        targets = steps.allocate(plan, loaded.model, ids)
        allocate_s = time.perf_counter() - started
        report = steps.prune(plan, loaded.model, targets, ids, steps.prune_checkpoint(plan))
        steps.quantize_head(plan, loaded.model, report)
        # prune_s is the whole cost of choosing the masks: an allocation's own pass over the model included
        timings["allocate_s"] = allocate_s
        timings["prune_s"] = allocate_s + report.timings["prune_s"]
        if spec.recover is not None:
            recovery = steps.recover(plan, loaded, seqlen, teacher, timings)
    del teacher
    return _measured(plan, loaded, report, seqlen, timings, calibration, recovery, stages)


def evaluate(plan: Plan, loaded, seqlen, timings: dict) -> tuple[Record, object]:
    """Measure the model as it is: the sparsity it has, perplexity and zero-shot accuracy."""
    _reset_peak_memory(plan)
    report = steps.prune(plan, loaded.model, steps.allocate(plan, loaded.model, None), None)  # dense: measures
    return _measured(plan, loaded, report, seqlen, timings)


def recover(plan: Plan, loaded, seqlen, timings: dict) -> tuple[Record, object]:
    """Fine-tune a saved pruned model with its zero pattern locked, then measure it."""
    _reset_peak_memory(plan)
    teacher = steps.teacher(plan, loaded, timings)
    recovery = steps.recover(plan, loaded, seqlen, teacher, timings)
    del teacher
    report = steps.prune(plan, loaded.model, steps.allocate(plan, loaded.model, None), None)  # dense: measures
    return _measured(plan, loaded, report, seqlen, timings, recovery=recovery)


PIPELINES = {"prune": prune, "eval": evaluate, "recover": recover}


def _reset_peak_memory(plan: Plan) -> None:
    if plan.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(plan.device)


def _measured(plan: Plan, loaded, report, seqlen, timings: dict, calibration=None, recovery=None,
              stages=None) -> tuple[Record, object]:
    """Coverage, perplexity and zero-shot accuracy on the model as it now is: (the record, the report)."""
    spec = plan.spec
    coverage = steps.coverage(loaded.model, report, prunes=spec.kind == "prune" and plan.prunes)
    start = time.perf_counter()
    ppl, windows = steps.perplexities(plan, loaded.model, loaded.tokenizer, seqlen)
    timings["eval_s"] = time.perf_counter() - start
    zeroshot = steps.zeroshot(plan, loaded, timings)
    if recovery is not None:
        recovery.ppl_after = dict(ppl)
    if stages:
        stages[-1]["recovery"] = recovery
        stages[-1]["ppl_recovered"] = dict(ppl)
    model = loaded.model
    record = Record(
        model=spec.model, model_source=loaded.source,
        family=getattr(model.config, "model_type", type(model).__name__),
        method=spec.method, pattern=str(plan.pattern), sparsity_target=plan.sparsity,
        sparsity_measured=report.sparsity, sparsity_per_layer=report.layer_sparsity,
        method_notes=report.layer_info, ppl=ppl,
        eval={"windows": windows, "max_windows": spec.eval.samples, "bos_every_window": plan.eval_bos,
              "runtime": spec.eval.runtime},
        zeroshot=zeroshot, calibration=calibration, seed=spec.seed,
        **provenance(plan.device, plan.dtype, timings, spec.to_argv()),
        options=plan.method_options,
        allocation={"name": plan.allocation.name, "options": plan.allocation_options}, sequential=spec.sequential,
        asymmetric=spec.asymmetric, sparsity_target_per_layer=report.layer_target, lineage=plan.lineage, base=plan.base,
        sparsity_block_weights=coverage.sparsity_block_weights, sparsity_model=coverage.sparsity_model,
        block_weights_in_pruned_layers=coverage.prunable_share,
        unpruned_block_weights={kind: dict(seen, share=seen["numel"] / coverage.block_numel)
                                for kind, seen in coverage.unpruned.items()},
        structure=getattr(report, "structure", None), quantization=_quantization(plan, report),
        recovery=recovery, stages=stages,
        settings=dict(to_mapping(spec, keyed_only=True), options={**plan.method_options, **plan.allocation_options}),
    )
    if plan.lineage is not None:  # a saved model: its card says how it was made
        _inherit(record, plan.lineage, spec.kind == "recover")
    return record, report


def _inherit(record: Record, lineage: dict, recovered: bool) -> None:
    """An eval or recover run's record names what the model is: how it was pruned, from its card (and a
    recovered model's card keeps naming the dense base model, the teacher of a later run)."""
    record.method = lineage.get("method", "unknown")
    record.pattern = lineage.get("pattern", "unknown")
    record.sparsity_target = lineage.get("sparsity_target", 0.0)
    if lineage.get("structure"):  # a smaller dense model has no zeros to count: its removed fraction stands
        record.sparsity_measured = lineage.get("sparsity_measured", record.sparsity_measured)
        record.structure = lineage["structure"]
    if recovered:
        record.model, record.model_source = lineage["model"], lineage.get("model_source", lineage["model"])
        record.calibration, record.seed = lineage.get("calibration"), lineage.get("seed", record.seed)
        record.options = lineage.get("options", {})
        record.allocation = lineage.get("allocation", record.allocation)


def _quantization(plan: Plan, report) -> dict | None:
    if plan.grid is None:
        return None
    from .quantize.head import HEAD_KEY, head_grid

    grid, spec = plan.grid, plan.spec
    return {"bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric,
            "scale_dtype": None if grid.scale_dtype is None else str(grid.scale_dtype).replace("torch.", ""),
            "method": plan.quant_method, "grid": grid.describe(), "format": spec.format,
            "layers": len([key for key in getattr(report, "quantized", {}) if key != HEAD_KEY]),
            "head": head_grid(grid.scale_dtype).describe() if spec.quantize_head else None}
