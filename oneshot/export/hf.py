"""A `from_pretrained`-loadable checkpoint (safetensors) with a lineage card, written then renamed.

The card is `oneshot.json` (machine-readable: base model, method, options, sparsity, calibration,
metrics, versions) and `README.md` (the same for people). The model is written to a hidden temporary
directory beside the target and renamed into place, so a failure leaves no partial model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..paths import share_like_save_pretrained

LINEAGE_KEYS = ("model", "model_source", "base", "method", "pattern", "sparsity_target", "sparsity_measured", "calibration",
                "seed", "ppl", "versions", "options", "allocation", "sparsity_block_weights", "sparsity_model",
                "structure", "quantization", "recovery", "stages")


def lineage_of(record: dict) -> dict:
    lineage = {key: record[key] for key in LINEAGE_KEYS if key in record}
    if record.get("zeroshot"):
        lineage["zeroshot"] = {key: record["zeroshot"][key] for key in ("suite", "limit", "mean_acc", "tasks")}
    return lineage


def read_lineage(path: str | Path) -> dict | None:
    """The lineage card (oneshot.json) of a saved model: a directory, or a file saved into one (a .gguf);
    None when there is none. A damaged card is a UsageError naming it."""
    from ..errors import UsageError

    path = Path(path).expanduser()
    card = (path.parent if path.is_file() else path) / "oneshot.json"
    if not card.is_file():
        return None
    try:
        lineage = json.loads(card.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{card} is damaged (not JSON); save the pruned model again") from None
    return lineage if isinstance(lineage, dict) else None


def save_model(model, tokenizer, record: dict, directory: str | Path, write_weights=None) -> None:
    """Write the model, its tokenizer and its lineage card into `directory`, atomically.
    `write_weights(tmp, lineage)` writes the weights and config (default: save_pretrained)."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        from transformers.utils import logging as hf_logging

        from ..models import block_weights

        lineage = lineage_of(record)
        on_disk = block_weights(model)
        hf_logging.disable_progress_bar()
        try:
            if on_disk is not None:  # blocks on disk: written (or renamed into place) shard by shard
                on_disk.save(tmp)
            elif write_weights is None:
                model.save_pretrained(tmp, safe_serialization=True)
            else:
                write_weights(tmp, lineage)
        finally:
            hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        (tmp / "oneshot.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (tmp / "README.md").write_text(lineage_card(lineage))
        share_like_save_pretrained(tmp)  # mkdtemp made it 0700: give it the user's usual permissions
        old = None
        if final.exists():  # empty, or --overwrite: swap, so a model is in place at every moment
            old = final.with_name(f".{final.name}.old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def directory_bytes(directory: str | Path) -> int:
    """The size on disk of every file under `directory` (a saved model: weights, config, tokenizer, card)."""
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def lineage_card(lineage: dict) -> str:
    calibration = lineage["calibration"] or {}
    lines = [
        f"# {lineage['model']} pruned with {lineage['method']}",
        "",
        "Made by oneshot (one-shot pruning of LLMs). Lineage:",
        "",
        f"- base model: `{lineage['model']}` ({lineage['model_source']})",
        f"- method: {lineage['method']}, pattern: {lineage['pattern']}, target sparsity: {lineage['sparsity_target']}",
    ]
    if lineage.get("options"):
        lines.append("- options: " + ", ".join(f"{k}={v}" for k, v in lineage["options"].items()))
    allocation = lineage.get("allocation") or {}
    if allocation.get("name", "uniform") != "uniform":
        lines.append(f"- allocation: {allocation['name']} {allocation.get('options') or ''}".rstrip())
    structure = lineage.get("structure")
    if structure:
        lines.append(f"- structured: removed {100 * structure['removed_fraction']:.1f}% of the decoder-block "
                     f"parameters ({structure['params_before']:,} -> {structure['params_after']:,} parameters in all); config "
                     + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in structure["config"].items()))
        if structure.get("removed_experts"):  # pattern experts: which went, and the parameters a token reaches
            lines.append("- routed experts removed per MoE block: " + "; ".join(
                f"block {index}: {experts}" for index, experts in structure["removed_experts"].items())
                + f"; active parameters per token {structure['active_params_before']:,} -> "
                f"{structure['active_params_after']:,}")
    else:
        lines.append(f"- measured sparsity of the pruned layers: {lineage['sparsity_measured']:.4f}")
    quantization = lineage.get("quantization")
    if quantization:
        lines.append(f"- quantised: {quantization['grid']} by {quantization['method']}, saved as "
                     f"{quantization.get('format', 'hf')}")
    if lineage.get("sparsity_block_weights") is not None:
        lines.append(f"- sparsity of all decoder-block weights: {lineage['sparsity_block_weights']:.4f}, of the whole "
                     f"model: {lineage['sparsity_model']:.4f}")
    lines += [
        f"- calibration: {calibration.get('source', 'none')}, {calibration.get('nsamples', 0)} x "
        f"{calibration.get('seqlen', 0)} tokens, seed {lineage['seed']}",
    ]
    lines += [f"- perplexity on {source}: {value:.3f}" for source, value in lineage["ppl"].items()]
    recovery = lineage.get("recovery")
    if recovery:
        how = recovery["mode"] + (f", distilled from {recovery['distill']['teacher']}" if recovery.get("distill") else "")
        before = ", ".join(f"{s} {v:.3f}" for s, v in recovery["ppl_before"].items()) or "not measured"
        lines.append(f"- recovered after pruning ({how}): {recovery['steps']} steps, {recovery['tokens']:,} tokens of "
                     f"{recovery['data']}, peak lr {recovery['lr']:g}; perplexity before recovery: {before}; "
                     f"sparsity after {recovery['sparsity_after']:.4f} (the pruned zero pattern kept exactly)")
    for stage in lineage.get("stages") or []:
        lines.append(f"- stage {stage['stage']}: pruned to {stage['sparsity']:.4f}, perplexity "
                     + ", ".join(f"{s} {v:.3f}" for s, v in stage["ppl_pruned"].items()) + " before recovery")
    if lineage.get("zeroshot") and lineage["zeroshot"]["mean_acc"] is not None:
        zeroshot = lineage["zeroshot"]
        limit = f", at most {zeroshot['limit']} documents per task" if zeroshot["limit"] else ""
        lines.append(f"- zero-shot mean accuracy ({zeroshot['suite']}{limit}): {zeroshot['mean_acc']:.4f}")
    lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in lineage["versions"].items()), ""]
    return "\n".join(lines)
