"""The recovery loop: AdamW over the block linears (full) or LoRA adapters, with the masks locked.

One optimiser step reads batch_size x grad_accum windows; window order is a function of the step alone
(step s, micro-batch m read rows (s * grad_accum + m) * batch_size ...), so a resumed run reads exactly
what an uninterrupted one would. Training is in fp32 (a half-precision model is cast up for the loop
and back after: the fp32 weights are the master copy). Every `checkpoint_every` steps the trainable
tensors, the optimiser, the scheduler, the RNG states, the step and the loss curve are written
atomically (state.json last), and `resume` continues from there to a result bitwise equal, on the CPU,
to the run that was never interrupted.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import write_atomic
from ..errors import RunError
from ..models import ExpertProjection, decoder_blocks, prunable_layers
from ..spec import Recovery
from . import lora
from .locked import apply_masks, capture_masks, mask_gradients, masks_hold
from .losses import recovery_loss
from .schedule import lr_factor


# The loop's own constants; the user's settings are spec.Recovery.
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0


def training_fingerprint(recovery: Recovery, seed: int) -> dict:
    """What a resumed recovery must share with the run it continues (its checkpoint's fingerprint)."""
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(recovery).items()
            if k not in ("checkpoint_every", "eval_at")}
    return dict(data, lr=recovery.peak_lr, seed=seed, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                lora_dropout=lora.DEFAULT_DROPOUT)


@dataclass
class TrainResult:
    model: nn.Module  # the same object for full; for lora, the plain model the adapters were merged into
    loss_curve: list[float]
    seconds: float  # of this process's steps, evaluations excluded (a resumed run counts only its own)
    steps_run: int
    resumed_from: int
    tokens_per_step: int
    masks_held: bool
    lora_targets: tuple = ()
    evaluations: dict = field(default_factory=dict)  # step -> what `evaluate` returned at recovery.eval_at
    lora_dropout: float = lora.DEFAULT_DROPOUT
    trained: dict = field(default_factory=dict)  # trained_summary of what the optimiser updated


class TrainCheckpointError(RunError):
    """A recovery checkpoint that does not belong to this run, or cannot be read."""


class TrainCheckpoint:
    """train.pt (tensors and states) then state.json (fingerprint, step), each written atomically."""

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return (self.directory / "state.json").is_file()

    def save(self, step: int, trainable: dict, optimizer, scheduler, curve: list[float]) -> None:
        state = {"trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": _rng_states(), "step": step, "loss_curve": list(curve)}
        write_atomic(self.directory / "train.pt", lambda f: torch.save(state, f))
        info = {"fingerprint": self.fingerprint, "step": step}
        write_atomic(self.directory / "state.json", json.dumps(info, indent=1).encode())

    def load(self) -> dict:
        try:
            info = json.loads((self.directory / "state.json").read_text())
            if info.get("fingerprint") != self.fingerprint:
                theirs = info.get("fingerprint") or {}
                differ = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
                raise TrainCheckpointError(f"the checkpoint in {self.directory} belongs to another recovery run "
                                           f"({', '.join(differ)} differ); use a new --checkpoint-dir")
            state = torch.load(self.directory / "train.pt", map_location="cpu", weights_only=False)
        except (OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, TrainCheckpointError):
                raise
            raise TrainCheckpointError(f"cannot read the checkpoint in {self.directory}: "
                                       f"{' '.join(str(exc).split())[:200]}") from None
        if state["step"] != info["step"]:
            raise TrainCheckpointError(f"the checkpoint in {self.directory} is incomplete; use a new --checkpoint-dir")
        return state


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def full_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Full mode trains what the engine prunes: every prunable layer of the blocks, with its bias, fused
    expert tensors included (their masks locked like any other); embeddings, norms, routers and the head
    stay frozen."""
    chosen = set()
    for block in decoder_blocks(model):
        for layer in prunable_layers(block).values():
            if isinstance(layer, ExpertProjection):
                chosen.add(id(layer.fused))
                bias = getattr(layer.experts, f"{layer.parameter}_bias", None) if layer.experts.has_bias else None
                if bias is not None:
                    chosen.add(id(bias))
            else:
                chosen.update(id(p) for p in layer.parameters())
    return {n: p for n, p in model.named_parameters() if id(p) in chosen}


def trained_summary(trainable: dict[str, nn.Parameter]) -> dict:
    """What a recovery trained, for its record: tensors and parameters, by the kind of tensor."""
    kinds: dict[str, dict] = {}
    for name, parameter in trainable.items():
        kind = ".".join(part for part in name.split(".")[-3:] if not part.isdigit())
        seen = kinds.setdefault(kind, {"tensors": 0, "numel": 0})
        seen["tensors"] += 1
        seen["numel"] += parameter.numel()
    return {"tensors": len(trainable), "numel": sum(p.numel() for p in trainable.values()), "kinds": kinds}


def batch_rows(step: int, micro: int, batch_size: int, grad_accum: int, nrows: int) -> torch.Tensor:
    first = (step * grad_accum + micro) * batch_size
    return torch.arange(first, first + batch_size) % nrows


def train(model: nn.Module, windows: torch.Tensor, settings: Recovery, device: str = "cpu",
          teacher: nn.Module | None = None, checkpoint: TrainCheckpoint | None = None, resume: bool = False,
          progress: bool = True, evaluate: Callable[[nn.Module], dict] | None = None,
          stop_after: int | None = None, seed: int = 0, checkpoint_every: int | None = None) -> TrainResult:
    """Recover `model` (pruned, on CPU) on `windows` [n, seqlen] as `settings` say; returns it with the
    masks exact. `evaluate(plain_model)` runs after the steps in settings.eval_at, on the model as it
    would be saved. `stop_after` ends the loop early after that step (an interruption, for tests)."""
    masks = capture_masks(model)
    dtype = next(model.parameters()).dtype
    model.to(device=device, dtype=torch.float32)
    if teacher is not None:
        teacher.to(device).eval()
        teacher.requires_grad_(False)
    torch.manual_seed(seed)
    targets = ()
    model.requires_grad_(False)
    if settings.mode == "lora":
        targets = lora.check_targets(model, settings.lora_targets)
        model = lora.wrap(model, targets, settings.lora_r, settings.lora_alpha, lora.DEFAULT_DROPOUT, masks,
                          settings.lora_update)
        trainable = {n: p for n, p in model.named_parameters() if "lora_" in n}
    else:
        trainable = full_trainable(model)
    for p in trainable.values():
        p.requires_grad_(True)
    trained = trained_summary(trainable)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=settings.peak_lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.steps, settings.warmup, settings.schedule))
    start, curve = 0, []
    if resume:
        state = checkpoint.load()
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                trainable[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"])
        start, curve = int(state["step"]), list(state["loss_curve"])

    tokens_per_step = settings.batch_size * settings.grad_accum * int(windows.shape[1])
    evaluations = {}
    model.train()
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, desc=f"recover {settings.mode}",
               unit="step", disable=not progress, leave=False)
    started = time.perf_counter()
    last, eval_seconds = start, 0.0  # evaluations inside the loop are not training time
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(settings.grad_accum):
            ids = windows[batch_rows(step, micro, settings.batch_size, settings.grad_accum, len(windows))].to(device)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            logits = model(input_ids=ids, use_cache=False).logits
            loss = recovery_loss(logits, ids, teacher_logits, settings.temperature, settings.alpha) / settings.grad_accum
            loss.backward()
            total += float(loss.detach())
            del logits, teacher_logits, loss
        if settings.mode == "full":
            mask_gradients(model, masks)
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        if settings.mode == "full":
            apply_masks(model, masks)  # pruned weights back to exactly 0 after every step
        curve.append(total)
        last = step + 1
        elapsed = time.perf_counter() - started - eval_seconds
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{(last - start) * tokens_per_step / max(elapsed, 1e-9):.0f}")
        if checkpoint is not None and checkpoint_every and last % checkpoint_every == 0 \
                and last < settings.steps:
            checkpoint.save(last, trainable, optimizer, scheduler, curve)
        if evaluate is not None and last in settings.eval_at and last < settings.steps:
            evaluated = time.perf_counter()
            evaluations[last] = _evaluate_as_saved(model, masks, settings.mode, evaluate)
            eval_seconds += time.perf_counter() - evaluated
            model.train()
        if stop_after is not None and last >= stop_after:
            break
    seconds = time.perf_counter() - started - eval_seconds
    bar.close()
    model.eval()
    if settings.mode == "lora":
        model = lora.merge(model)
        apply_masks(model, masks)  # the merged update is dense: the pruned zero pattern comes back exactly
    model.requires_grad_(False)
    model.to(device="cpu", dtype=dtype)
    if teacher is not None:
        teacher.to("cpu")
    return TrainResult(model, curve, seconds, last - start, start, tokens_per_step, masks_hold(model, masks),
                       targets, evaluations, trained=trained)


def _evaluate_as_saved(model: nn.Module, masks: dict, mode: str, evaluate) -> dict:
    """`evaluate` on the model as it would be saved now: for LoRA, a copy with the adapters merged and
    the masks applied (the adapters in place would measure a dense update the saved model lacks)."""
    model.eval()
    if mode != "lora":
        with torch.no_grad():
            return evaluate(model)
    import copy

    merged = lora.merge(copy.deepcopy(model))
    apply_masks(merged, masks)
    with torch.no_grad():
        result = evaluate(merged)
    del merged
    return result
