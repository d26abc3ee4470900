"""`oneshot prune` and `oneshot eval`: flags (over an optional `--config RUN.yaml`) into a RunSpec,
then `api.run`, then the table. Flags given on the command line override the config's values."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import UsageError
from ..spec import DTYPES, Recovery, RunSpec, source_list, spec_from_mapping

# flag dest -> RunSpec field ("calibration.x" and "eval.x" for the nested ones)
_FIELDS = {
    "model": "model", "method": "method", "sparsity": "sparsity", "pattern": "pattern", "allocation": "allocation", "sequential": "sequential",
    "calibration": "calibration.source", "nsamples": "calibration.nsamples", "seqlen": "calibration.seqlen",
    "seed": "seed", "eval_ppl": "eval.ppl", "eval_samples": "eval.samples", "eval_tasks": "eval.tasks",
    "eval_limit": "eval.limit", "eval_batch_size": "eval.batch_size", "device": "device", "dtype": "dtype",
    "batch_size": "batch_size", "output": "output", "save_model": "save_model", "overwrite": "overwrite",
    "checkpoint_dir": "checkpoint_dir", "resume": "resume", "offline": "offline", "quantize": "quantize",
    "group_size": "group_size", "symmetric": "symmetric", "quant_method": "quant_method", "format": "format",
    "weights_on_disk": "weights_on_disk",
    # recovery: `prune` spells them --recover-*, `recover` without the prefix (same dests)
    "recover_mode": "recover.mode", "recover_steps": "recover.steps", "recover_lr": "recover.lr",
    "recover_schedule": "recover.schedule", "recover_warmup": "recover.warmup",
    "recover_batch_size": "recover.batch_size", "recover_seqlen": "recover.seqlen",
    "recover_grad_accum": "recover.grad_accum", "recover_data": "recover.train_data", "distill": "recover.distill",
    "temperature": "recover.temperature", "distill_alpha": "recover.alpha", "teacher": "recover.teacher",
    "lora_r": "recover.lora_r", "lora_alpha": "recover.lora_alpha", "lora_targets": "recover.lora_targets",
    "lora_update": "recover.lora_update",
    "checkpoint_every": "recover.checkpoint_every", "recover_eval_at": "recover.eval_at",
    "iterative": "recover.iterative", "iterative_schedule": "recover.iterative_schedule",
}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-ppl", help="comma-separated perplexity sources (same names as --calibration); 'none' to "
                                      "skip (default wiki-offline)")
    p.add_argument("--eval-samples", type=int, help="evaluate at most this many windows per source (default: all)")
    p.add_argument("--eval-tasks",
                   help="zero-shot accuracy through lm-eval on the model in memory: a suite (offline | wanda | "
                        "sparsegpt) or comma-separated lm-eval task names; 'none' to skip (default)")
    p.add_argument("--eval-limit", type=int, help="evaluate at most this many documents per zero-shot task")
    p.add_argument("--eval-batch-size", help="lm-eval batch size: a whole number or auto (default: 8 on CPU, 32 on CUDA)")
    p.add_argument("--offline", action="store_true",
                   help="never contact the Hugging Face Hub (also automatic when it is unreachable)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", help=" | ".join(DTYPES) + " (default auto: float32 on CPU)")
    p.add_argument("--output", help="directory for result.json")
    p.add_argument("--weights-on-disk", action="store_true",
                   help="models larger than host memory: read each decoder block from disk (a local safetensors "
                        "checkpoint; a random: preset draws it) when the engine reaches it, and write the pruned "
                        "model shard by shard (default: when the weights exceed half the available memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_prune_parser(commands) -> None:
    p = commands.add_parser("prune", help="prune a model and measure it", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="RUN.yaml", help="read the run from a YAML file; flags override its values")
    p.add_argument("--model", help="built-in alias (smollm2-135m, the default), random:<preset>, a .gguf file, a "
                                   "local directory or a Hub id")
    p.add_argument("--method", help="dense | magnitude | wanda | sparsegpt | admm (default sparsegpt); with a structured "
                                    "--pattern: magnitude | wanda | flap | taylor | gradient (heads, channels, "
                                    "width) or magnitude | taylor | gradient | block-influence | angular (layers)")
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a method or allocation option, e.g. percdamp=0.1 (repeatable)")
    p.add_argument("--sparsity", type=float,
                   help="fraction of weights to prune, in [0, 1); default 0.5 (N:M patterns fix it to N/M); for a "
                        "structured pattern, the fraction of decoder-block parameters to remove")
    p.add_argument("--pattern", help="unstructured (default) or N:M (N of every M inputs pruned), e.g. 2:4; or "
                                     "remove whole units: layers (blocks), heads (KV groups), channels (MLP), "
                                     "width (heads and channels)")
    p.add_argument("--allocation", help="per-layer sparsity: uniform (default) | owl (outlier-weighted, unstructured "
                                        "only; options owl_m, owl_lambda)")
    p.add_argument("--sequential", action="store_true",
                   help="sublayer-sequential calibration: each group of layers (q/k/v, o, gate/up, down) is pruned "
                        "before calibration data passes through it; the block runs once")
    p.add_argument("--calibration", help="wiki-offline (default) | c4 | wikitext2 | ptb | file:PATH | tokens:PATH")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 128; all rows for tokens:)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default 2048; the file's for tokens:)")
    p.add_argument("--seed", type=int, help="seed for calibration sampling and random models (default 0)")
    p.add_argument("--batch-size", type=int,
                   help="sequences per block forward (default: about 16k tokens per batch on CUDA, 4k on CPU)")
    _common_arguments(p)
    p.add_argument("--quantize", help="also quantise the pruned weights: int8 | int4 (default: no)")
    p.add_argument("--group-size", type=int, help="inputs per quantisation group (default: one group per output row)")
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (zero point 0); default asymmetric")
    p.add_argument("--quant-method", help="auto (default: joint with sparsegpt, gptq otherwise) | joint (quantise "
                                          "inside SparseGPT's sweep) | gptq (after pruning, with the layer's Hessian) | "
                                          "rtn (round to nearest)")
    p.add_argument("--save-model", help="directory for the pruned model and its card")
    p.add_argument("--format", help="how --save-model writes it: hf (default; safetensors in the model's dtype) | "
                                    "compressed-tensors (packed int8/int4, needs --quantize) | gguf (one .gguf "
                                    "file; Q8_0/Q4_0 when quantised)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of existing output directories")
    p.add_argument("--checkpoint-dir", help="save each finished block here, so that a killed run can continue "
                                            "with --resume")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    recovery = p.add_argument_group("recovery after pruning (oneshot recover takes the same without --recover-)")
    recovery.add_argument("--recover-steps", type=int, help="fine-tune this many steps after pruning, the zero "
                                                            "pattern locked (per stage with --iterative)")
    recovery.add_argument("--recover-mode", help="full (default: the block linears train) | lora (adapters, merged "
                                                 "back sparse)")
    recovery.add_argument("--recover-lr", type=float, help="peak learning rate (default 5e-5 full, 1e-4 lora)")
    recovery.add_argument("--recover-schedule", help="constant | linear | cosine (default)")
    recovery.add_argument("--recover-warmup", type=int, help="warm-up steps (default 0)")
    recovery.add_argument("--recover-batch-size", type=int, help="windows per micro-batch (default 8)")
    recovery.add_argument("--recover-seqlen", type=int, help="tokens per training window (default 512)")
    recovery.add_argument("--recover-grad-accum", type=int, help="micro-batches per step (default 1)")
    recovery.add_argument("--recover-data", help="training text, as --calibration (default wiki-offline: its "
                                                 "calibration split, never the evaluation split)")
    recovery.add_argument("--recover-eval-at", help="also measure perplexity after these steps, e.g. 50,100")
    recovery.add_argument("--iterative", type=int, help="reach --sparsity in K prune-recover stages (default 1)")
    recovery.add_argument("--iterative-schedule", help="stage sparsities: linear (default) | cubic (Zhu & Gupta)")
    _recovery_arguments(recovery)
    p.set_defaults(handler=prune_command)


def _recovery_arguments(p) -> None:
    """Flags that `prune` and `recover` spell alike."""
    p.add_argument("--distill", action="store_true",
                   help="loss: KL to the dense base model's logits (the lineage card's model; --teacher to override)")
    p.add_argument("--temperature", type=float, help="distillation temperature T; the KL is scaled by T^2 (default 1)")
    p.add_argument("--distill-alpha", type=float,
                   help="distillation's share of the loss, the rest next-token cross-entropy (default 1)")
    p.add_argument("--teacher", help="the dense model to distil from, instead of the base model")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", help="comma-separated layer names inside a block (default: the query and value "
                                          "projections, e.g. self_attn.q_proj,self_attn.v_proj)")
    p.add_argument("--lora-update", help="masked (default: the adapters' update is masked to the kept weights in the "
                                         "forward, so they train the model that is saved) | dense (peft's plain "
                                         "update; the pruned part of it is dropped at the merge)")


def add_recover_parser(commands) -> None:
    p = commands.add_parser("recover", help="fine-tune a saved pruned model with its zero pattern locked",
                            argument_default=argparse.SUPPRESS)
    p.add_argument("--pruned", required=True, metavar="DIR", help="a directory written by `oneshot prune --save-model`")
    p.add_argument("--save-model", help="directory for the recovered model and its card")
    p.add_argument("--mode", dest="recover_mode", metavar="MODE", help="full (default: the block linears train) | lora (peft "
                                                      "adapters on the query and value projections, merged back sparse)")
    p.add_argument("--steps", dest="recover_steps", metavar="N", type=int, help="optimiser steps (default 100)")
    p.add_argument("--lr", dest="recover_lr", metavar="LR", type=float, help="peak learning rate (default 5e-5 full, 1e-4 lora)")
    p.add_argument("--schedule", dest="recover_schedule", metavar="SCHEDULE", help="constant | linear | cosine (default)")
    p.add_argument("--warmup", dest="recover_warmup", metavar="W", type=int, help="warm-up steps (default 0)")
    p.add_argument("--batch-size", dest="recover_batch_size", metavar="B", type=int, help="windows per micro-batch (default 8)")
    p.add_argument("--train-seqlen", dest="recover_seqlen", metavar="L", type=int, help="tokens per training window (default 512)")
    p.add_argument("--grad-accum", dest="recover_grad_accum", metavar="A", type=int, help="micro-batches per step (default 1)")
    p.add_argument("--train-data", dest="recover_data", metavar="SOURCE",
                   help="training text, as --calibration: wiki-offline (default; its calibration split, never the "
                        "evaluation split) | c4 | wikitext2 | ptb | file:PATH | tokens:PATH")
    p.add_argument("--eval-at", dest="recover_eval_at", metavar="S,S", help="also measure perplexity after these steps, e.g. 50,100")
    _recovery_arguments(p)
    p.add_argument("--seqlen", type=int, help="tokens per perplexity window (default 2048)")
    p.add_argument("--seed", type=int, help="seed of the training windows and of LoRA's initial adapters (default 0)")
    p.add_argument("--checkpoint-dir", help="write the training state here every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: a tenth of the steps)")
    p.add_argument("--resume", action="store_true", help="continue the recovery saved in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of existing output directories")
    _common_arguments(p)
    p.set_defaults(handler=recover_command)


def add_eval_parser(commands) -> None:
    p = commands.add_parser("eval", help="measure a dense or saved pruned model (perplexity, zero-shot accuracy)",
                            argument_default=argparse.SUPPRESS)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="as for prune (default smollm2-135m): alias, random:<preset>, .gguf, "
                                       "directory or Hub id")
    which.add_argument("--pruned", help="a directory written by `oneshot prune --save-model`")
    p.add_argument("--seqlen", type=int, help="tokens per perplexity window (default 2048)")
    p.add_argument("--seed", type=int, help="seed for random models (default 0)")
    _common_arguments(p)
    p.set_defaults(handler=eval_command)


def spec_from_args(args: argparse.Namespace, base: RunSpec) -> RunSpec:
    """`base` with every flag that was given applied on top."""
    given = vars(args)
    top, calibration, evaluation = {}, dataclasses.replace(base.calibration), dataclasses.replace(base.eval)
    for dest, field in _FIELDS.items():
        if dest not in given or field.startswith("recover."):  # recovery: _recovery_from_args
            continue
        value = given[dest]
        if dest == "eval_ppl":
            value = tuple(source_list(value, "--eval-ppl"))
        if field.startswith("calibration."):
            setattr(calibration, field.split(".")[1], value)
        elif field.startswith("eval."):
            setattr(evaluation, field.split(".")[1], value)
        else:
            top[field] = value
    if "option" in given:
        options = dict(base.options)
        for item in given["option"]:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise UsageError(f"--option {item!r} is not NAME=VALUE (for example --option percdamp=0.1)")
            options[name.strip()] = value.strip()
        top["options"] = options
    if given.get("quiet"):
        top["progress"] = False
    recover = _recovery_from_args(given, base)
    if recover is not None:
        top["recover"] = recover
    return base.replace(calibration=calibration, eval=evaluation, **top)


def _recovery_from_args(given: dict, base: RunSpec) -> Recovery | None:
    """The recovery flags applied to the base's settings; a prune run recovers only with --recover-steps."""
    changes = {field.split(".")[1]: given[dest] for dest, field in _FIELDS.items()
               if field.startswith("recover.") and dest in given}
    if not changes:
        return None
    if base.recover is None and "steps" not in changes and "iterative" not in changes:
        first = next(dest for dest, field in _FIELDS.items() if field.startswith("recover.") and dest in given)
        raise UsageError(f"--{first.replace('_', '-')} applies to recovery; add --recover-steps N")
    for key in ("lora_targets", "eval_at"):
        if key in changes:
            items = [item.strip() for item in str(changes[key]).split(",") if item.strip()]
            if key == "eval_at":
                if not all(item.isdigit() for item in items):
                    raise UsageError(f"--{'recover-' if base.kind == 'prune' else ''}eval-at takes step numbers, "
                                     f"e.g. 50,100 (got {changes[key]!r})")
                items = [int(item) for item in items]
            changes[key] = tuple(items)
    return dataclasses.replace(base.recover or Recovery(), **changes)


def prune_command(args) -> int:
    from ..api import run
    from ..yamlio import read_yaml

    base = RunSpec()
    if "config" in vars(args):
        path = Path(args.config).expanduser()
        base = spec_from_mapping(read_yaml(path, "run config"), f"run config {path}", relative_to=path.parent.resolve())
    record = run(spec_from_args(args, base))
    print_table(record.to_dict())
    return 0


def recover_command(args) -> int:
    from ..api import run
    from ..spec import RECOVER_FLAG_NAMES

    args.model = args.pruned
    spec = spec_from_args(args, RunSpec(kind="recover", method="dense", recover=Recovery()))
    record = run(spec, names=RECOVER_FLAG_NAMES)
    print_table(record.to_dict())
    return 0


def eval_command(args) -> int:
    from ..api import run

    given = vars(args)
    if "pruned" in given:
        if not (Path(args.pruned) / "config.json").is_file():
            raise UsageError(f"--pruned {args.pruned} is not a model directory written by --save-model "
                             "(no config.json)")
        args.model = args.pruned
    spec = spec_from_args(args, RunSpec(kind="eval", method="dense"))
    record = run(spec)
    print_table(record.to_dict())
    return 0


def print_table(result: dict) -> None:
    sources = list(result["ppl"])
    zeroshot = result.get("zeroshot")
    header = ["method", "pattern", "sparsity"]
    row = [result["method"], result["pattern"], f"{result['sparsity_measured']:.4f}"]
    # Honest sparsity: over every block weight and over the whole model, beside the pruned layers'.
    for key, label in (("sparsity_block_weights", "block weights"), ("sparsity_model", "whole model")):
        if result.get(key) is not None:
            header.append(label)
            row.append(f"{result[key]:.4f}")
    header += [f"ppl {s}" for s in sources]
    row += [f"{result['ppl'][s]:.3f}" for s in sources]
    if zeroshot is not None:
        header.append("mean acc")
        row.append("-" if zeroshot["mean_acc"] is None else f"{zeroshot['mean_acc']:.4f}")
    if result.get("quantization"):
        header.append("quantised")
        row.append(f"int{result['quantization']['bits']} {result['quantization']['method']}")
    if result.get("saved_model"):
        header.append(f"{result['saved_model']['format']} MiB")
        row.append(f"{result['saved_model']['weights_bytes'] / 2**20:.1f}")
    if result["timings"].get("prune_s"):
        header.append("prune s")
        row.append(f"{result['timings']['prune_s']:.1f}")
    recovery = result.get("recovery")
    if recovery:  # the perplexity columns above are after recovery; before it, beside
        header += [f"before recovery {s}" for s in recovery["ppl_before"]] + ["recover s/step"]
        row += [f"{v:.3f}" for v in recovery["ppl_before"].values()] + [f"{recovery['seconds_per_step']:.2f}"]
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if zeroshot is not None:
        from ..evaluate.zeroshot import format_table

        print()
        print("\n".join(format_table(zeroshot)))
