"""The one way a run happens: `run(RunSpec) -> Record`, from the CLI, a sweep, a worker or Python.

    from oneshot import RunSpec, run
    record = run(RunSpec(method="wanda", sparsity=0.5, pattern="2:4"))
    record.ppl["wiki-offline"], record.sparsity_measured

run() validates the spec (spec.validate), loads the model (or takes `loaded`), samples calibration
windows, allocates per-layer targets, prunes through the engine, evaluates, then writes what the spec
asks for (result.json, the saved model). It prints nothing: progress bars aside, it reports through
the `oneshot` logger, and failures are UsageError (bad input) or RunError (the run could not finish).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .errors import RunError, UsageError
from .record import Record, provenance
from .spec import FLAG_NAMES, Plan, RunSpec, validate

log = logging.getLogger("oneshot")


def run(spec: RunSpec, loaded=None, names: dict | None = None) -> Record:
    """Run `spec`; `loaded` is a models.LoadedModel to use instead of loading (a sweep's copy).
    `names` spells fields in messages as the caller's user knows them (flags by default)."""
    plan = validate(spec, names)
    if spec.offline:  # before anything can import datasets or probe the Hub
        from .evaluate.zeroshot import configure_offline

        configure_offline(force=True)
    import torch

    from calibration import SourceError
    from .checkpoint import CheckpointError
    from .engine import ResourceError
    from .evaluate.zeroshot import ZeroShotError
    from .methods import NumericsError, PatternError
    from .models import ModelError
    from .recover import LoraError, TrainCheckpointError
    from .recover.teacher import TeacherError

    try:
        return _run(plan, loaded)
    except (SourceError, ModelError, PatternError, ZeroShotError, LoraError, TeacherError) as exc:
        raise UsageError(str(exc)) from None
    except (NumericsError, ResourceError, CheckpointError, TrainCheckpointError) as exc:
        raise RunError(str(exc)) from None
    except torch.cuda.OutOfMemoryError:
        raise RunError("CUDA ran out of memory; lower --batch-size, --nsamples or --seqlen, or use --device cpu") from None


def _run(plan: Plan, loaded) -> Record:
    from .models import block_weights

    spec = plan.spec
    timings: dict[str, float] = {}
    if loaded is None:
        loaded = _load(spec, plan.dtype, timings)
    else:
        timings["load_s"] = 0.0
    on_disk = block_weights(loaded.model)
    try:
        if on_disk is not None:
            _check_on_disk(plan, on_disk)
        return _run_loaded(plan, loaded, timings)
    finally:
        if on_disk is not None:
            on_disk.close()  # the kept blocks' spill shards: moved into a saved model, or removed


def _check_on_disk(plan: Plan, on_disk) -> None:
    from .spec import weights_on_disk_conflict

    spec = plan.spec
    why = weights_on_disk_conflict(spec, plan.pattern)
    if why:  # only when decided by size: validate() refused it when asked for
        raise UsageError(f"{spec.model} takes more than half the available host memory, so its weights stay on disk, "
                         f"which cannot be used with {why}; leave that out or use a machine with more memory")
    if spec.save_model:
        on_disk.spill_beside(spec.save_model)  # the saved model's shards are then renamed, not copied
    log.info("decoder blocks stay on disk: each is read when the engine reaches it and written back once pruned")


def _run_loaded(plan: Plan, loaded, timings: dict) -> Record:
    import torch

    spec, device = plan.spec, plan.device
    model, tokenizer = loaded.model, loaded.tokenizer
    seqlen = _check_against_model(model, plan)

    calibration, ids = None, None
    if plan.needs_calibration:
        ids, calibration = _calibration(plan, model, tokenizer, seqlen, timings)
        seqlen = seqlen or int(ids.shape[1])  # a tokens: file sets it for evaluation too
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    recovery, stages = None, None
    # Distillation's teacher: the dense model as loaded, kept aside before pruning changes it.
    teacher = _teacher(plan, loaded, timings)
    if spec.kind == "recover":
        recovery = _recover(plan, loaded, seqlen, teacher, timings)
        model = loaded.model
    if spec.recover is not None and spec.recover.iterative > 1:
        report, stages = _iterative(plan, loaded, ids, seqlen, teacher, timings)
        recovery = stages[-1].pop("recovery")
    else:
        started = time.perf_counter()
        targets = _allocate(plan, model, ids)
        allocate_s = time.perf_counter() - started
        report = _prune(plan, model, targets, ids)
        if spec.kind == "prune":  # an eval run only measures the sparsity it finds
            # prune_s is the whole cost of choosing the masks: an allocation's own pass over the model included
            timings["allocate_s"] = allocate_s
            timings["prune_s"] = allocate_s + report.timings["prune_s"]
            if spec.recover is not None:
                recovery = _recover(plan, loaded, seqlen, teacher, timings)
                model = loaded.model
    del teacher
    coverage = _coverage(model, report, prunes=spec.kind == "prune" and plan.method.name != "dense")
    ppl, windows, zeroshot = _evaluate(plan, loaded, seqlen, timings)
    if recovery is not None:
        recovery["ppl_after"] = dict(ppl)
        if stages:
            stages[-1]["ppl_recovered"] = dict(ppl)

    # An eval or recover run's record names what the model is: a saved model's lineage says how it was
    # pruned (and a recovered model's card keeps naming the dense base model, the teacher of a later run).
    lineage = _lineage(spec.model) if spec.kind in ("eval", "recover") else None
    method, pattern, sparsity_target = spec.method, str(plan.pattern), plan.sparsity
    if lineage is not None:
        method = lineage.get("method", "unknown")
        pattern = lineage.get("pattern", "unknown")
        sparsity_target = lineage.get("sparsity_target", 0.0)
    model_name, model_source = spec.model, loaded.source
    if spec.kind == "recover":
        model_name, model_source = lineage["model"], lineage.get("model_source", lineage["model"])
    record = Record(
        model=model_name, model_source=model_source,
        family=getattr(model.config, "model_type", type(model).__name__),
        method=method, pattern=pattern, sparsity_target=sparsity_target,
        sparsity_measured=report.sparsity, sparsity_per_layer=report.layer_sparsity,
        method_notes=report.layer_info, ppl=ppl, eval={"windows": windows, "max_windows": spec.eval.samples},
        zeroshot=zeroshot, calibration=calibration, seed=spec.seed,
        **provenance(device, plan.dtype, timings, spec.to_argv()),
        options=plan.method_options,
        allocation={"name": plan.allocation.name, "options": plan.allocation_options}, sequential=spec.sequential,
        sparsity_target_per_layer=report.layer_target, lineage=lineage,
        sparsity_block_weights=coverage.sparsity_block_weights, sparsity_model=coverage.sparsity_model,
        block_weights_in_pruned_layers=coverage.prunable_share,
        unpruned_block_weights={kind: dict(seen, share=seen["numel"] / coverage.block_numel)
                                for kind, seen in coverage.unpruned.items()},
        structure=getattr(report, "structure", None),
        quantization=_quantization(plan, report),
        recovery=recovery, stages=stages,
    )
    if spec.kind == "recover":
        record.calibration, record.seed = lineage.get("calibration"), lineage.get("seed", spec.seed)
        record.options, record.structure = lineage.get("options", {}), lineage.get("structure")
        record.allocation = lineage.get("allocation", record.allocation)
    if spec.save_model:
        from .export import save_in_format

        saved = save_in_format(model, tokenizer, record.to_dict(), spec.save_model, spec.format,
                               getattr(report, "quantized", None), _source_gguf(spec, plan.model_kind))
        record.saved_model = {"path": spec.save_model, **saved}
        if record.structure is not None:
            record.structure["checkpoint_bytes"] = saved["bytes"]
        log.info(f"saved the pruned model to {spec.save_model} ({spec.format}, {saved['weights_bytes'] / 2**20:.1f} MiB "
                 "of weights)")
    if spec.output:
        path = record.write(spec.output)
        log.info(f"wrote {path}")
    return record


def _quantization(plan: Plan, report) -> dict | None:
    if plan.grid is None:
        return None
    grid, spec = plan.grid, plan.spec
    return {"bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric,
            "scale_dtype": None if grid.scale_dtype is None else str(grid.scale_dtype).replace("torch.", ""),
            "method": plan.quant_method, "grid": grid.describe(), "format": spec.format,
            "layers": len(getattr(report, "quantized", {}))}


def _source_gguf(spec: RunSpec, model_kind: str) -> str | None:
    """The GGUF file the model was read from (its tokenizer metadata is reused), if any."""
    if model_kind == "alias":
        from .models.loading import smollm2_path

        return str(smollm2_path())
    return str(Path(spec.model).expanduser()) if model_kind == "gguf" else None


def _load(spec: RunSpec, dtype, timings: dict):
    from .models import load_model

    log.info(f"loading {spec.model} ({str(dtype).replace('torch.', '')})")
    start = time.perf_counter()
    loaded = load_model(spec.model, dtype=dtype, seed=spec.seed, on_disk=spec.weights_on_disk)
    timings["load_s"] = time.perf_counter() - start
    return loaded


def _check_against_model(model, plan: Plan) -> int | None:
    """Checks that need the model (layer widths, positions); returns the seqlen to use (None: a
    tokens: file's own width)."""
    from .engine import check_pattern

    check_pattern(model, plan.pattern)
    if plan.pattern.is_structured:  # the family can take it, the fraction leaves something: before any work
        from .structured import check_structured

        check_structured(model, plan.method, plan.pattern, plan.sparsity, plan.method_options,
                         FLAG_NAMES["sparsity"])
    spec = plan.spec
    seqlen = spec.calibration.seqlen
    if seqlen is None and spec.kind == "prune" and not spec.calibration.source.startswith("tokens:"):
        seqlen = 2048
    checked = seqlen or (2048 if any(not s.startswith("tokens:") for s in plan.eval_sources) else None)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if checked and limit and checked > limit:
        flag = FLAG_NAMES["calibration.seqlen"]
        raise UsageError(f"{flag} {checked} exceeds the model's {limit} positions; pass {flag} {limit} or less")
    rc = spec.recover
    if rc is not None and not rc.train_data.startswith("tokens:") and limit and rc.seqlen > limit:
        from .spec import RECOVER_FLAG_NAMES

        flag = (RECOVER_FLAG_NAMES if spec.kind == "recover" else FLAG_NAMES)["recover.seqlen"]
        raise UsageError(f"{flag} {rc.seqlen} exceeds the model's {limit} positions; pass {flag} {limit} or less")
    return seqlen


def _calibration(plan: Plan, model, tokenizer, seqlen, timings):
    from calibration import calibration_windows
    from .engine import check_memory

    spec = plan.spec
    source = spec.calibration.source
    if seqlen and not source.startswith("tokens:"):  # before sampling anything
        check_memory(model, spec.calibration.nsamples or 128, seqlen, plan.device, spec.batch_size)
    start = time.perf_counter()
    ids = calibration_windows(source, tokenizer, spec.calibration.nsamples, seqlen, spec.seed)
    check_token_range(ids, model, source)
    if source.startswith("tokens:"):
        check_memory(model, int(ids.shape[0]), int(ids.shape[1]), plan.device, spec.batch_size)
    timings["calibration_s"] = time.perf_counter() - start
    log.info(f"calibration: {ids.shape[0]} windows x {ids.shape[1]} tokens from {source}")
    return ids, {"source": source, "nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "seed": spec.seed}


def _allocate(plan: Plan, model, ids) -> dict[str, float]:
    """Per-layer targets from the plan's allocation (uniform: the target everywhere)."""
    from .engine import stream_statistics
    from .models import decoder_blocks, get_weight, prunable_layers

    layers = {f"{i}.{name}": get_weight(layer).numel()
              for i, block in enumerate(decoder_blocks(model)) for name, layer in prunable_layers(block).items()}

    def statistics(statistic):
        return stream_statistics(model, statistic, ids, plan.device, plan.spec.batch_size, plan.spec.progress)

    targets = plan.allocation.allocate(layers, plan.sparsity, plan.pattern, statistics, **plan.allocation_options)
    if plan.allocation.name != "uniform":
        weighted = sum(targets[k] * n for k, n in layers.items()) / sum(layers.values())
        log.info(f"allocation {plan.allocation.name}: per-layer targets from {min(targets.values()):.3f} to "
                 f"{max(targets.values()):.3f}, parameter-weighted mean {weighted:.4f}")
    return targets


def _prune(plan: Plan, model, targets, ids):
    from .checkpoint import Checkpoint
    from .engine import DEFAULT_STAGES, SEQUENTIAL_STAGES, prune_model

    spec = plan.spec
    if plan.pattern.is_structured:
        from .structured import prune_structured

        return prune_structured(model, plan.method, plan.pattern, plan.sparsity, ids, device=plan.device,
                                batch_size=spec.batch_size, options=plan.method_options, progress=spec.progress)
    checkpoint = None
    if spec.checkpoint_dir and spec.kind == "prune":  # a recover run's checkpoints are its training state
        checkpoint = Checkpoint(spec.checkpoint_dir, {"model": spec.model, "dtype": str(plan.dtype), "seed": spec.seed})
    return prune_model(model, plan.method, targets, plan.pattern, ids if plan.method.statistic else None,
                       device=plan.device, batch_size=spec.batch_size, options=plan.method_options,
                       progress=spec.progress, checkpoint=checkpoint,
                       stages=SEQUENTIAL_STAGES if spec.sequential else DEFAULT_STAGES)


def _teacher(plan: Plan, loaded, timings: dict):
    """The dense teacher for distillation, or None: the model as loaded (a prune run, before pruning), or
    the base model named by the pruned model's lineage card (a recover run), or --teacher."""
    spec = plan.spec
    if spec.recover is None or not spec.recover.distill:
        return None
    from .models import load_model

    start = time.perf_counter()
    if spec.recover.teacher is None and spec.kind == "prune":
        import copy

        teacher = copy.deepcopy(loaded.model)
    else:
        lineage = _lineage(spec.model) if spec.kind == "recover" else {}
        name = spec.recover.teacher or lineage["model"]
        log.info(f"distillation teacher: {name}")
        teacher = load_model(name, dtype=plan.dtype, seed=lineage.get("seed", spec.seed)).model
    timings["teacher_load_s"] = time.perf_counter() - start
    return teacher


def _recover(plan: Plan, loaded, seqlen, teacher, timings: dict, stage: int = 0) -> dict:
    """Fine-tune the pruned model in `loaded` with its zero pattern locked; returns the record's
    `recovery` (ppl_after is filled in by the caller's evaluation)."""
    from calibration import calibration_windows
    from .recover import TrainCheckpoint, TrainSettings, train, zero_fraction

    spec, rc = plan.spec, plan.spec.recover
    from_file = rc.train_data.startswith("tokens:")
    windows = calibration_windows(rc.train_data, loaded.tokenizer,
                                  None if from_file else rc.steps * rc.batch_size * rc.grad_accum,
                                  None if from_file else rc.seqlen, spec.seed + stage)
    check_token_range(windows, loaded.model, rc.train_data)
    sparsity_before = zero_fraction(loaded.model)
    ppl_before = _perplexities(plan, loaded.model, loaded.tokenizer, seqlen)
    settings = TrainSettings(mode=rc.mode, steps=rc.steps, lr=rc.peak_lr, schedule=rc.schedule, warmup=rc.warmup,
                             batch_size=rc.batch_size, grad_accum=rc.grad_accum, seed=spec.seed + stage,
                             temperature=rc.temperature, alpha=rc.alpha, lora_r=rc.lora_r, lora_alpha=rc.lora_alpha,
                             lora_targets=tuple(rc.lora_targets), lora_update=rc.lora_update)
    checkpoint = None
    if spec.checkpoint_dir:
        settings.checkpoint_every = rc.checkpoint_every or max(1, rc.steps // 10)
        fingerprint = dict(settings.fingerprint(), pruned=str(Path(spec.model).expanduser().resolve()),
                           train_data=rc.train_data, seqlen=int(windows.shape[1]), distill=rc.distill,
                           teacher=rc.teacher, dtype=str(plan.dtype))
        checkpoint = TrainCheckpoint(spec.checkpoint_dir, fingerprint)
    log.info(f"recovery ({rc.mode}{', distilled' if teacher is not None else ''}): {rc.steps} steps of "
             f"{rc.batch_size} x {rc.grad_accum} windows of {windows.shape[1]} tokens from {rc.train_data}, "
             f"peak lr {settings.lr:g} ({rc.schedule})")
    result = train(loaded.model, windows, settings, plan.device, teacher, checkpoint, spec.resume, spec.progress,
                   evaluate_at=tuple(rc.eval_at),
                   evaluate=lambda model: _perplexities(plan, model, loaded.tokenizer, seqlen, move=False))
    loaded.model = result.model
    if not result.masks_held:  # cannot happen: train re-applies the masks last; say so loudly if it ever does
        raise RunError("recovery left a pruned weight non-zero; please report this")
    timings["recover_s"] = timings.get("recover_s", 0.0) + result.seconds
    curve, every = result.loss_curve, max(1, -(-len(result.loss_curve) // 1000))  # at most 1000 points
    return {
        "mode": rc.mode, "data": rc.train_data, "steps": rc.steps, "tokens": rc.steps * result.tokens_per_step,
        "tokens_per_step": result.tokens_per_step, "seqlen": int(windows.shape[1]), "batch_size": rc.batch_size,
        "grad_accum": rc.grad_accum, "lr": settings.lr, "schedule": rc.schedule, "warmup": rc.warmup,
        "seed": settings.seed,
        "distill": {"teacher": rc.teacher or (spec.model if spec.kind == "prune" else _lineage(spec.model)["model"]),
                    "temperature": rc.temperature, "alpha": rc.alpha} if rc.distill else None,
        "lora": {"r": rc.lora_r, "alpha": rc.lora_alpha, "dropout": settings.lora_dropout, "update": rc.lora_update,
                 "targets": list(result.lora_targets)} if rc.mode == "lora" else None,
        "loss_curve": curve[::every], "loss_curve_every": every,
        "seconds": result.seconds, "seconds_per_step": result.seconds / max(1, result.steps_run),
        "resumed_from_step": result.resumed_from,
        "ppl_before": ppl_before, "ppl_at": {str(k): v for k, v in result.evaluations.items()},
        "sparsity_before": sparsity_before, "sparsity_after": zero_fraction(loaded.model),
        "masks_locked": result.masks_held,
    }


def _iterative(plan: Plan, loaded, ids, seqlen, teacher, timings: dict):
    """Reach the target in K prune-recover stages (recover/schedule.py's stage_sparsity); returns the
    last stage's pruning report and the stages (the last one still holding its full `recovery`)."""
    from dataclasses import replace

    from .recover import stage_sparsity

    rc = plan.spec.recover
    stages, prune_s = [], 0.0
    for k in range(1, rc.iterative + 1):
        target = stage_sparsity(k, rc.iterative, plan.sparsity, rc.iterative_schedule)
        stage_plan = replace(plan, sparsity=target)
        log.info(f"stage {k} of {rc.iterative}: prune to {target:.4f}, then recover")
        started = time.perf_counter()
        report = _prune(stage_plan, loaded.model, _allocate(stage_plan, loaded.model, ids), ids)
        stage_prune_s = time.perf_counter() - started
        prune_s += stage_prune_s
        recovery = _recover(plan, loaded, seqlen, teacher, timings, stage=k - 1)
        stage = {"stage": k, "sparsity_target": target, "sparsity": recovery["sparsity_after"],
                 "ppl_pruned": recovery["ppl_before"], "loss_curve": recovery["loss_curve"],
                 "prune_s": stage_prune_s, "recover_s": recovery["seconds"]}
        if k < rc.iterative:
            stage["ppl_recovered"] = _perplexities(plan, loaded.model, loaded.tokenizer, seqlen)
        else:
            stage["recovery"] = recovery
        stages.append(stage)
    timings["prune_s"] = prune_s
    return report, stages


def _perplexities(plan: Plan, model, tokenizer, seqlen, move: bool = True) -> dict:
    """Perplexity on each evaluation source (recovery's before and in-between measurements)."""
    from calibration import evaluation_windows
    from .evaluate.perplexity import perplexity

    ppl = {}
    if move:
        model.to(plan.device)
    try:
        for source in plan.eval_sources:
            eval_ids = evaluation_windows(source, tokenizer, seqlen, plan.spec.eval.samples)
            check_token_range(eval_ids, model, source)
            ppl[source] = perplexity(model, eval_ids, plan.device, batch_size=1, progress=plan.spec.progress)
    finally:
        if move:
            model.to("cpu")
    return ppl


def _coverage(model, report, prunes: bool):
    """Sparsity over all block weights and the whole model; a pruning run says, one line per kind,
    which block weights it left dense, and how many layers no calibration token reached."""
    from .engine import measure_coverage
    from .engine.stages import NO_TOKENS_NOTE

    coverage = measure_coverage(model)
    if prunes:
        for line in coverage.unpruned_lines():
            log.warning(line)
        fallbacks = [name for name, info in report.layer_info.items() if info == NO_TOKENS_NOTE]
        if fallbacks:
            log.warning(f"{len(fallbacks)} layer(s) received no calibration tokens (experts the router never chose, "
                        f"e.g. {fallbacks[0]}) and were pruned by magnitude; see method_notes")
    log.info(f"sparsity: {report.sparsity:.4f} of the pruned layers, {coverage.sparsity_block_weights:.4f} of all "
             f"block weights, {coverage.sparsity_model:.4f} of the whole model")
    return coverage


def _evaluate(plan: Plan, loaded, seqlen, timings) -> tuple[dict, dict, dict | None]:
    """Perplexity on each source, then zero-shot tasks, on the model in memory.
    Returns (ppl, windows, zeroshot record or None); adds eval_s and zeroshot_s to timings."""
    from calibration import evaluation_windows
    from .evaluate.perplexity import perplexity
    from .models import block_weights
    from .evaluate.zeroshot import default_batch_size, evaluate_zeroshot

    spec, device = plan.spec, plan.device
    model, tokenizer, progress = loaded.model, loaded.tokenizer, spec.progress
    ppl, windows = {}, {}
    start = time.perf_counter()
    if plan.eval_sources:
        streamed = block_weights(model) is not None  # blocks on disk: read one at a time for every window
        if not streamed:
            model.to(device)
        try:
            for source in plan.eval_sources:
                eval_ids = evaluation_windows(source, tokenizer, seqlen, spec.eval.samples)
                check_token_range(eval_ids, model, source)
                windows[source] = list(eval_ids.shape)
                ppl[source] = perplexity(model, eval_ids, device, batch_size=1, progress=progress, streamed=streamed)
                log.info(f"perplexity {source}: {ppl[source]:.3f} ({eval_ids.shape[0]} windows x {eval_ids.shape[1]})")
        finally:
            if not streamed:
                model.to("cpu")
    timings["eval_s"] = time.perf_counter() - start
    zeroshot = None
    if plan.zeroshot is not None:
        start = time.perf_counter()
        batch = spec.eval.batch_size
        batch = default_batch_size(device) if batch is None else (batch if batch == "auto" else int(batch))
        log.info(f"zero-shot: {', '.join(plan.zeroshot.names)} (lm-eval, batch size {batch}"
                 + (f", at most {spec.eval.limit} documents each)" if spec.eval.limit else ")"))
        try:
            zeroshot = evaluate_zeroshot(model, tokenizer, plan.zeroshot, device=device, batch_size=batch,
                                         limit=spec.eval.limit, progress=progress)
        finally:
            model.to("cpu")
        timings["zeroshot_s"] = time.perf_counter() - start
    return ppl, windows, zeroshot


def _lineage(model: str) -> dict | None:
    path = Path(model).expanduser()
    card = (path.parent if path.is_file() else path) / "oneshot.json"  # a saved .gguf has its card beside it
    if not card.is_file():
        return None
    return json.loads(card.read_text())


def check_token_range(ids, model, source) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise UsageError(f"{source} has token id {int(ids.max())} but the model's vocabulary has {vocab} entries; "
                         "it was tokenised for another model")
