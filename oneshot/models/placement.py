"""The model and device settings, checked before any weight is read: the model names something loadable,
the device exists, the dtype is resolved, and a model whose blocks stay on disk is asked for nothing
that needs it whole in memory."""
from __future__ import annotations

import re

from ..errors import UsageError
from ..settings import spelled
from .loading import can_stay_on_disk, check_model_spec


def check_device_text(text) -> None:
    if not isinstance(text, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise UsageError(f"unknown {spelled('device')} {text!r}; choose auto, cpu, cuda or cuda:N")


def resolve_device(text: str) -> str:
    import torch

    check_device_text(text)
    flag = spelled("device")
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if not torch.cuda.is_available():
        raise UsageError(f"{flag} {text} was asked for but no CUDA GPU is visible; use {flag} cpu")
    index = int(text[5:]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return text


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


def whole_model_needed(spec, pattern) -> str | None:
    """What in `spec` needs the whole model in memory (so its blocks cannot stay on disk), or None."""
    if pattern.is_structured:
        return f"a structured {spelled('pattern')} (it rewrites the model whole)"
    if spec.eval.tasks not in ("", "none"):
        return f"{spelled('eval.tasks')} (lm-eval needs the whole model in memory)"
    if spec.checkpoint_dir:
        return spelled("checkpoint_dir") + " (the kept blocks are already on disk)"
    if spec.quantize is not None or spec.format != "hf":
        return f"{spelled('quantize')} or {spelled('format')} other than hf (the writers take the whole model)"
    if spec.recover is not None:
        return f"{spelled('recover.steps')} (recovery trains the whole model in memory)"
    return None


def check(spec, pattern) -> tuple[str, str, object]:
    """(model kind, device, dtype): the model names something loadable and the device exists."""
    device = resolve_device(spec.device)
    model_kind = check_model_spec(spec.model)
    dtype = resolve_dtype(spec.dtype, device, spec.model, model_kind)
    if spec.weights_on_disk:
        if not can_stay_on_disk(spec.model):
            raise UsageError(f"{spelled('weights_on_disk')}: {spec.model} is not a local safetensors checkpoint or a "
                             "random:<preset>; only those can keep their weights on disk")
        why = whole_model_needed(spec, pattern)
        if why:
            raise UsageError(f"{spelled('weights_on_disk')} (a model larger than host memory) cannot be used with "
                             f"{why}; leave one out")
    return model_kind, device, dtype
