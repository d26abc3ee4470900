"""LoRA through `peft`, for recovery that keeps the pruned zero pattern.

Adapters (default r=8, alpha=16 on the query and value projections: Wanda's recipe) train while the
pruned weights stay frozen; at the end they are merged into the weights (`merge_and_unload`) and the
masks are re-applied by the caller, because a dense update B @ A would otherwise refill every pruned
weight (locuslab/wanda#83: 40% sparse became 32.7% after merging). Which layers are "query" and
"value" comes from the family's structure map; peft is imported only when LoRA is used.

Two updates (`update`):
- "masked" (default): each adapted layer computes W x + ((B A s) * keep) dropout(x), the update masked
  to the kept weights in the forward (as SPP, Lu et al. 2024, and SQFT, Munoz et al. 2024, do), so the
  adapters train exactly the model that is saved: the masked merge changes nothing;
- "dense": peft's own layer, W x + B A s dropout(x); the merge then drops the part of B A that falls on
  pruned weights (at 70% sparsity, most of it), so the saved model is not the one that was trained.
"""
from __future__ import annotations

from torch import nn

from ..errors import UsageError
from ..models import ExpertProjection, ModelError, decoder_blocks, layer_parameter, prunable_layers
from ..models.adapter import _is_conv1d
from ..spec import LORA_UPDATES, Recovery

DEFAULT_R, DEFAULT_ALPHA = Recovery().lora_r, Recovery().lora_alpha  # the settings' defaults (spec.py)
DEFAULT_DROPOUT = 0.05
FALLBACK_TARGETS = ("q_proj", "v_proj")
UPDATES = LORA_UPDATES
KEEP = "oneshot_keep"  # the attribute that carries a base layer's mask while it is adapted


class LoraError(UsageError):
    """LoRA settings that cannot apply to this model; the message says what to change."""


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The query and value projections' names inside a block (a fused qkv layer when the family has one)."""
    from ..models import structure_map

    try:
        attention = structure_map(model).attention
    except (ModelError, KeyError, AttributeError):
        return FALLBACK_TARGETS
    names = (attention.qkv,) if attention.qkv else (attention.q, attention.v)
    return tuple(f"{attention.module}.{name}" if not name.startswith(attention.module + ".") else name
                 for name in names)


def adaptable_layers(model: nn.Module) -> list[str]:
    """The prunable layers of a block that peft can adapt (names inside block 0): modules with a weight of
    their own. A fused expert tensor's slices (models.ExpertProjection) are not: peft adapts modules, and
    one expert's projection is a slice of a parameter shared by all experts."""
    return [name for name, layer in prunable_layers(decoder_blocks(model)[0]).items()
            if not isinstance(layer, ExpertProjection)]


def matching_layers(model: nn.Module, targets) -> dict[str, list[str]]:
    """target -> the adaptable block layers (names inside block 0) it matches, as peft matches names: the
    whole name or its ending after a dot."""
    layers = adaptable_layers(model)
    return {target: [n for n in layers if n == target or n.endswith("." + target)] for target in targets}


def check_targets(model: nn.Module, targets, flag: str = "--lora-targets") -> tuple[str, ...]:
    """The targets, each matching at least one adaptable layer of the blocks; else LoraError (before any work:
    a skeleton of the model will do)."""
    targets = tuple(targets) if targets else default_targets(model)
    matched = matching_layers(model, targets)
    missing = [t for t, found in matched.items() if not found]
    if missing:
        experts = [t for t in missing if any(n == t or n.endswith("." + t) for n, layer in
                                             prunable_layers(decoder_blocks(model)[0]).items()
                                             if isinstance(layer, ExpertProjection))]
        choices = ", ".join(adaptable_layers(model))
        if experts:
            raise LoraError(f"{flag} {','.join(experts)}: a fused expert's projection is a slice of one tensor shared "
                            f"by all experts, which LoRA (peft) cannot adapt; choose from: {choices}, or recover the "
                            f"experts with full fine-tuning")
        raise LoraError(f"{flag} {','.join(missing)} match no linear layer of this model's blocks; choose from: "
                        f"{choices}")
    return targets


def wrap(model: nn.Module, targets, r: int = DEFAULT_R, alpha: int = DEFAULT_ALPHA,
         dropout: float = DEFAULT_DROPOUT, masks: dict | None = None, update: str = "masked") -> nn.Module:
    """The model with adapters on `targets` (only they train); the adapters' A draws from torch's RNG.
    `masks` (name -> keep, from locked.capture_masks) is what a "masked" update is restricted to."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LoraError("--mode lora needs the peft package: pip install 'oneshot[recover]'") from None
    import warnings

    if update not in UPDATES:
        raise LoraError(f"unknown LoRA update {update!r}; choose {' or '.join(UPDATES)}")
    conv1d = any(_is_conv1d(layer) for layer in prunable_layers(decoder_blocks(model)[0]).values())
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                        fan_in_fan_out=conv1d)  # GPT-2's Conv1D keeps weights as [in, out]
    if update == "masked" and masks:
        from .locked import masked_layers

        layers = masked_layers(model, masks)
        for layer, keep in layers:  # on the layer's device once, not moved at every forward
            setattr(layer, KEEP, keep.to(layer_parameter(layer).device))
        config._register_custom_module({type(layer): _masked_lora_class() for layer, _ in layers})
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def merge(wrapped: nn.Module) -> nn.Module:
    """The plain model with the adapters added into its weights (dense: re-apply the masks after)."""
    model = wrapped.merge_and_unload()
    for module in model.modules():
        if hasattr(module, KEEP):
            delattr(module, KEEP)
    return model


_MASKED_LORA = None


def _masked_lora_class():
    """peft's LoRA Linear with the update masked in the forward (built once, when peft is first used)."""
    global _MASKED_LORA
    if _MASKED_LORA is None:
        import torch
        from peft.tuners.lora.layer import Linear

        class MaskedLoraLinear(Linear):
            """W x + ((B A s) * keep) dropout(x): the adapters can only move weights the mask keeps."""

            def forward(self, x, *args, **kwargs):
                base = self.get_base_layer()
                keep = getattr(base, KEEP, None)
                if keep is None or self.disable_adapters or self.merged or "adapter_names" in kwargs:
                    return super().forward(x, *args, **kwargs)
                result = base(x, *args, **kwargs)
                for adapter in self.active_adapters:
                    if adapter not in self.lora_A:
                        continue
                    delta = self.get_delta_weight(adapter) * keep  # in the weight's own layout
                    inputs = self.lora_dropout[adapter](x.to(delta.dtype))
                    update = inputs @ delta if self.fan_in_fan_out else torch.nn.functional.linear(inputs, delta)
                    result = result + update.to(result.dtype)
                return result

        _MASKED_LORA = MaskedLoraLinear
    return _MASKED_LORA
