"""The steps api.py's pipelines share: load, check against the loaded model, calibration windows,
per-layer targets, pruning, recovery, perplexity, zero-shot accuracy, sparsity coverage and saving.

Each step takes the Plan and what earlier steps produced; none prints (they log through the `oneshot`
logger) and none knows which pipeline calls it.
"""
from __future__ import annotations

import logging
import time

from .errors import RunError, UsageError
from .plan import Plan
from .record import RecoveryRecord
from .settings import spelled

log = logging.getLogger("oneshot")


def load(plan: Plan, timings: dict):
    from .models import load_model

    spec = plan.spec
    log.info(f"loading {spec.model} ({str(plan.dtype).replace('torch.', '')})")
    start = time.perf_counter()
    loaded = load_model(spec.model, dtype=plan.dtype, seed=spec.seed, on_disk=spec.weights_on_disk)
    timings["load_s"] = time.perf_counter() - start
    return loaded


def check_on_disk(plan: Plan, on_disk) -> None:
    """A model whose blocks stay on disk because of its size: refuse what needs it whole (validation
    refused the same when --weights-on-disk was asked for), and spill beside the saved model."""
    from .models.placement import whole_model_needed

    spec = plan.spec
    why = whole_model_needed(spec, plan.pattern)
    if why:
        raise UsageError(f"{spec.model} takes more than half the available host memory, so its weights stay on disk, "
                         f"which cannot be used with {why}; leave that out or use a machine with more memory")
    if spec.save_model:
        on_disk.spill_beside(spec.save_model)  # the saved model's shards are then renamed, not copied
    log.info("decoder blocks stay on disk: each is read when the engine reaches it and written back once pruned")


def adapt(plan: Plan, loaded) -> Plan:
    """The plan with what the loaded model's family decides where the settings leave it open."""
    from dataclasses import replace

    from .models import bos_every_window

    bos = plan.spec.eval.bos
    if bos is None:  # the family's convention, where the tokenizer has the token (random presets read bytes)
        bos = bos_every_window(loaded.model) and getattr(loaded.tokenizer, "bos_token_id", None) is not None
    return replace(plan, eval_bos=bos)


def check_against_model(loaded, plan: Plan) -> int | None:
    """Checks that need the loaded model and its tokenizer (layer widths, positions), before any work;
    returns the seqlen to use (None: a tokens: file's own width)."""
    from .engine import check_pattern

    model = loaded.model
    check_pattern(model, plan.pattern)
    if plan.pattern.is_structured:  # the family can take it, the fraction leaves something: before any work
        from .structured import check_structured

        check_structured(model, plan.method, plan.pattern, plan.sparsity, plan.method_options, spelled("sparsity"))
    spec = plan.spec
    seqlen = spec.calibration.seqlen
    if seqlen is None and spec.kind == "prune" and not spec.calibration.source.startswith("tokens:"):
        seqlen = 2048
    checked = seqlen or (2048 if any(not s.startswith("tokens:") for s in plan.eval_sources) else None)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if checked and limit and checked > limit:
        flag = spelled("calibration.seqlen")
        raise UsageError(f"{flag} {checked} exceeds the model's {limit} positions; pass {flag} {limit} or less")
    if plan.eval_bos and plan.eval_sources and getattr(loaded.tokenizer, "bos_token_id", None) is None:
        raise UsageError(f"{spelled('eval.bos')}: this model's tokenizer has no beginning-of-text token; leave it out")
    rc = spec.recover
    if rc is not None and rc.window and limit and rc.window > limit:
        flag = spelled("recover.seqlen")
        raise UsageError(f"{flag} {rc.window} exceeds the model's {limit} positions; pass {flag} {limit} or less")
    return seqlen


def calibration(plan: Plan, model, tokenizer, seqlen, timings: dict):
    """(token windows [n, seqlen], the record's calibration entry)."""
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


def allocate(plan: Plan, model, ids) -> dict[str, float]:
    """Per-layer targets from the plan's allocation (uniform: the target everywhere)."""
    from .engine import stream_statistics
    from .models import decoder_blocks, get_weight, prunable_layers

    layers = {f"{i}.{name}": get_weight(layer).numel()
              for i, block in enumerate(decoder_blocks(model)) for name, layer in prunable_layers(block).items()}

    def statistics(statistic):
        return stream_statistics(model, statistic, ids, plan.device, plan.spec.batch_size, plan.spec.progress)

    targets = plan.allocation.allocate(layers, plan.sparsity, plan.pattern, statistics, **plan.allocation_options)
    if plan.allocation.statistic is not None:
        weighted = sum(targets[k] * n for k, n in layers.items()) / sum(layers.values())
        log.info(f"allocation {plan.allocation.name}: per-layer targets from {min(targets.values()):.3f} to "
                 f"{max(targets.values()):.3f}, parameter-weighted mean {weighted:.4f}")
    return targets


def prune(plan: Plan, model, targets, ids, checkpoint=None):
    """The engine's pass (or the structured driver's); returns its report."""
    from .engine import Refit, prune_model, sequential_stages

    spec = plan.spec
    if plan.pattern.is_structured:
        from .structured import prune_structured

        return prune_structured(model, plan.method, plan.pattern, plan.sparsity, ids, device=plan.device,
                                batch_size=spec.batch_size, options=plan.method_options, progress=spec.progress)
    return prune_model(model, plan.method, targets, plan.pattern, ids if plan.method.statistic else None,
                       device=plan.device, batch_size=spec.batch_size, options=plan.method_options,
                       progress=spec.progress, checkpoint=checkpoint,
                       stages=sequential_stages(spec.asymmetric, Refit(spec.refit, spec.refit_lr, spec.seed))
                       if spec.sequential else None)


def prune_checkpoint(plan: Plan):
    from .checkpoint import Checkpoint

    spec = plan.spec
    if not spec.checkpoint_dir:
        return None
    from .plan import checkpoint_fingerprint

    return Checkpoint(spec.checkpoint_dir, checkpoint_fingerprint(spec, plan.source, plan.dtype))


def teacher(plan: Plan, loaded, timings: dict):
    """The dense teacher for distillation, or None: the model as loaded, before pruning changes it (a
    prune run of a dense model), else the plan's teacher (the saved model's base, or recover.teacher)."""
    from .models import load_model

    spec = plan.spec
    if spec.recover is None or not spec.recover.distill:
        return None
    start = time.perf_counter()
    if plan.teacher is None:
        import copy

        model = copy.deepcopy(loaded.model)
    else:
        log.info(f"distillation teacher: {plan.teacher}")
        model = load_model(plan.teacher, dtype=plan.dtype, seed=(plan.base or {}).get("seed", spec.seed)).model
    timings["teacher_load_s"] = time.perf_counter() - start
    return model


def recover(plan: Plan, loaded, seqlen, teacher_model, timings: dict, stage: int = 0) -> RecoveryRecord:
    """Fine-tune the pruned model in `loaded` with its zero pattern locked; its `ppl_after` is filled in by
    the caller's evaluation."""
    from calibration import calibration_windows

    from .plan import checkpoint_fingerprint
    from .recover import TrainCheckpoint, train, zero_fraction

    spec, rc = plan.spec, plan.spec.recover
    from_file = rc.train_data.startswith("tokens:")
    seed = spec.seed + stage
    windows = calibration_windows(rc.train_data, loaded.tokenizer,
                                  None if from_file else rc.steps * rc.batch_size * rc.grad_accum,
                                  rc.window, seed)
    check_token_range(windows, loaded.model, rc.train_data)
    sparsity_before = zero_fraction(loaded.model)
    ppl_before, _ = perplexities(plan, loaded.model, loaded.tokenizer, seqlen, quiet=True)
    checkpoint, every = None, None
    if spec.checkpoint_dir:
        every = rc.checkpoint_every or max(1, rc.steps // 10)
        fingerprint = dict(checkpoint_fingerprint(spec, plan.source, plan.dtype), window=int(windows.shape[1]))
        checkpoint = TrainCheckpoint(spec.checkpoint_dir, fingerprint)
    log.info(f"recovery ({rc.mode}{', distilled' if teacher_model is not None else ''}): {rc.steps} steps of "
             f"{rc.batch_size} x {rc.grad_accum} windows of {windows.shape[1]} tokens from {rc.train_data}, "
             f"peak lr {rc.peak_lr:g} ({rc.schedule})")
    result = train(loaded.model, windows, rc, plan.device, teacher_model, checkpoint, spec.resume, spec.progress,
                   evaluate=lambda model: perplexities(plan, model, loaded.tokenizer, seqlen, move=False,
                                                       quiet=True)[0],
                   seed=seed, checkpoint_every=every)
    loaded.model = result.model
    if not result.masks_held:  # cannot happen: train re-applies the masks last; say so loudly if it ever does
        raise RunError("recovery left a pruned weight non-zero; please report this")
    timings["recover_s"] = timings.get("recover_s", 0.0) + result.seconds
    curve, every_point = result.loss_curve, max(1, -(-len(result.loss_curve) // 1000))  # at most 1000 points
    teacher_name = plan.teacher or spec.model
    return RecoveryRecord(
        mode=rc.mode, data=rc.train_data, steps=rc.steps, tokens=rc.steps * result.tokens_per_step,
        tokens_per_step=result.tokens_per_step, seqlen=int(windows.shape[1]), batch_size=rc.batch_size,
        grad_accum=rc.grad_accum, lr=rc.peak_lr, schedule=rc.schedule, warmup=rc.warmup, seed=seed,
        distill={"teacher": teacher_name, "temperature": rc.temperature, "alpha": rc.alpha} if rc.distill else None,
        lora={"r": rc.lora_r, "alpha": rc.lora_alpha, "dropout": result.lora_dropout, "update": rc.lora_update,
              "targets": list(result.lora_targets)} if rc.mode == "lora" else None,
        loss_curve=curve[::every_point], loss_curve_every=every_point,
        seconds=result.seconds, seconds_per_step=result.seconds / max(1, result.steps_run),
        resumed_from_step=result.resumed_from,
        ppl_before=ppl_before, ppl_at={str(k): v for k, v in result.evaluations.items()},
        sparsity_before=sparsity_before, sparsity_after=zero_fraction(loaded.model), masks_locked=result.masks_held,
        trained=result.trained)


def iterative(plan: Plan, loaded, ids, seqlen, teacher_model, timings: dict):
    """Reach the target in K prune-recover stages (recover/schedule.py's stage_sparsity); returns the last
    stage's pruning report, the stages, and the last stage's recovery."""
    from dataclasses import replace

    from .recover import stage_sparsity

    rc = plan.spec.recover
    stages, prune_s, recovery = [], 0.0, None
    for k in range(1, rc.iterative + 1):
        target = stage_sparsity(k, rc.iterative, plan.sparsity, rc.iterative_schedule)
        stage_plan = replace(plan, sparsity=target)
        log.info(f"stage {k} of {rc.iterative}: prune to {target:.4f}, then recover")
        started = time.perf_counter()
        report = prune(stage_plan, loaded.model, allocate(stage_plan, loaded.model, ids), ids)
        stage_prune_s = time.perf_counter() - started
        prune_s += stage_prune_s
        recovery = recover(plan, loaded, seqlen, teacher_model, timings, stage=k - 1)
        stage = {"stage": k, "sparsity_target": target, "sparsity": recovery.sparsity_after,
                 "ppl_pruned": recovery.ppl_before, "loss_curve": recovery.loss_curve,
                 "prune_s": stage_prune_s, "recover_s": recovery.seconds}
        if k < rc.iterative:
            stage["ppl_recovered"] = perplexities(plan, loaded.model, loaded.tokenizer, seqlen, quiet=True)[0]
        stages.append(stage)
    timings["prune_s"] = prune_s
    return report, stages, recovery


def perplexities(plan: Plan, model, tokenizer, seqlen, move: bool = True, quiet: bool = False) -> tuple[dict, dict]:
    """(perplexity per evaluation source, [windows, seqlen] per source); a model whose blocks stay on
    disk is streamed block by block for every window."""
    from calibration import evaluation_windows

    from .evaluate.perplexity import perplexity
    from .models import block_weights

    ppl, windows = {}, {}
    if not plan.eval_sources:
        return ppl, windows
    streamed = block_weights(model) is not None
    bos = tokenizer.bos_token_id if plan.eval_bos else None  # each window starts with it
    if move and not streamed:
        model.to(plan.device)
    try:
        for source in plan.eval_sources:
            eval_ids = evaluation_windows(source, tokenizer, seqlen, plan.spec.eval.samples, bos=bos)
            check_token_range(eval_ids, model, source)
            windows[source] = list(eval_ids.shape)
            if plan.spec.eval.runtime == "llama.cpp":  # the GGUF file itself, run by llama.cpp
                from .evaluate import llamacpp
                from .models import gguf_file

                ppl[source] = llamacpp.perplexity(str(gguf_file(plan.spec.model)), eval_ids, plan.spec.progress)
                continue
            ppl[source] = perplexity(model, eval_ids, plan.device, batch_size=1, progress=plan.spec.progress,
                                     streamed=streamed)
            if not quiet:
                log.info(f"perplexity {source}: {ppl[source]:.3f} ({eval_ids.shape[0]} windows x {eval_ids.shape[1]})")
    finally:
        if move and not streamed:
            model.to("cpu")
    return ppl, windows


def quantize_head(plan: Plan, model, report) -> None:
    """--quantize-head: the output head rounded onto Q8_0's grid after the blocks; export finds its codes."""
    if not plan.spec.quantize_head:
        return
    from .quantize.head import HEAD_KEY
    from .quantize.head import quantize_head as round_head

    report.quantized[HEAD_KEY] = round_head(model)
    log.info("quantised the output head: int8, symmetric, groups of 32 (Q8_0)")


def zeroshot(plan: Plan, loaded, timings: dict) -> dict | None:
    """lm-eval's tasks on the model in memory, or None when the run asks for none."""
    from .evaluate.zeroshot import default_batch_size, evaluate_zeroshot

    if plan.zeroshot is None:
        return None
    spec = plan.spec
    start = time.perf_counter()
    batch = spec.eval.batch_size
    batch = default_batch_size(plan.device) if batch is None else (batch if batch == "auto" else int(batch))
    log.info(f"zero-shot: {', '.join(plan.zeroshot.names)} (lm-eval, batch size {batch}"
             + (f", at most {spec.eval.limit} documents each)" if spec.eval.limit else ")"))
    try:
        result = evaluate_zeroshot(loaded.model, loaded.tokenizer, plan.zeroshot, device=plan.device,
                                   batch_size=batch, limit=spec.eval.limit, progress=spec.progress)
    finally:
        loaded.model.to("cpu")
    timings["zeroshot_s"] = time.perf_counter() - start
    return result


def coverage(model, report, prunes: bool):
    """Sparsity over all block weights and the whole model; a pruning run says, one line per kind, which
    block weights it left dense, and how many layers no calibration token reached."""
    from .engine import measure_coverage
    from .engine.stages import NO_TOKENS_NOTE

    found = measure_coverage(model)
    if prunes:
        for line in found.unpruned_lines():
            log.warning(line)
        fallbacks = [name for name, info in report.layer_info.items() if info == NO_TOKENS_NOTE]
        if fallbacks:
            log.warning(f"{len(fallbacks)} layer(s) received no calibration tokens (experts the router never chose, "
                        f"e.g. {fallbacks[0]}) and were pruned by magnitude; see method_notes")
    log.info(f"sparsity: {report.sparsity:.4f} of the pruned layers, {found.sparsity_block_weights:.4f} of all "
             f"block weights, {found.sparsity_model:.4f} of the whole model")
    return found


def save(plan: Plan, loaded, record, report) -> None:
    """--save-model in the chosen format; the record learns where and how large."""
    from .export import save_in_format

    spec = plan.spec
    saved = save_in_format(loaded.model, loaded.tokenizer, record.to_dict(), spec.save_model, spec.format,
                           getattr(report, "quantized", None), source_gguf(plan))
    record.saved_model = {"path": spec.save_model, **saved}
    if record.structure is not None:
        record.structure["checkpoint_bytes"] = saved["bytes"]
    log.info(f"saved the model to {spec.save_model} ({spec.format}, {saved['weights_bytes'] / 2**20:.1f} MiB of "
             "weights)")


def source_gguf(plan: Plan) -> str | None:
    """The GGUF file the model was read from (its tokenizer metadata is reused), if any."""
    if plan.model_kind not in ("alias", "gguf"):
        return None
    from .models import gguf_file

    return str(gguf_file(plan.spec.model))


def check_token_range(ids, model, source) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and int(ids.max()) >= vocab:
        raise UsageError(f"{source} has token id {int(ids.max())} but the model's vocabulary has {vocab} entries; "
                         "it was tokenised for another model")
