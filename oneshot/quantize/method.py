"""A pruning method that also quantises: the same Method interface, so the engine learns no maths.

`quantizing(method, grid, how)` returns a Method whose statistic, prepare and prune wrap the base
method's:

- joint (SparseGPT only): the SparseGPT sweep masks and quantises each column (quantize/columns.py);
- gptq: the base method prunes, then GPTQ quantises the pruned weight with the layer's Hessian; a
  method that reads the Hessian shares it, any other gets one gathered beside its own statistic
  (Wanda's norms and the Hessian from the same forward);
- rtn: the base method prunes, then each weight is rounded to the nearest grid value.

Each layer's result carries its grid parameters (PruneResult.quantized), which export reads. The
quantisation settings are checked here too, before any work: their own values (`check_settings`), then
against the model's architecture (`check_model`).
"""
from __future__ import annotations

from dataclasses import replace

from ..methods import Method
from ..methods.magnitude import magnitude_prune
from ..methods.sparsegpt import prepare_hessian
from ..methods.statistics import Hessian
from ..settings import entries, spelled
from .columns import gptq, joint_prune_quantize
from .grid import BITS, Grid, QuantizationError, check_group_size, rtn
from .head import check_head

QUANT_METHODS = ("auto", "joint", "gptq", "rtn")


def resolve_quant_method(method_name: str, how: str) -> str:
    """auto: joint for SparseGPT, GPTQ after any other method."""
    if how == "auto":
        return "joint" if method_name == "sparsegpt" else "gptq"
    return how


def _rtn_without_data(grid: Grid):
    def fallback(weight, sparsity, pattern):
        result = magnitude_prune(weight, sparsity, pattern)
        quantised, params = rtn(result.weight, grid)
        return result._replace(weight=quantised, quantized=params)
    return fallback


class _WithHessian:
    """Accumulates a base statistic and SparseGPT's Hessian from the same layer inputs."""

    base: type | None = None

    def __init__(self, features, device, dtype):
        self.parts = ([self.base(features, device, dtype)] if self.base else []) + [Hessian(features, device, dtype)]

    def add(self, x, sequences=None):
        for part in self.parts:
            part.add(x, sequences)

    @property
    def tokens(self):
        return self.parts[-1].tokens

    def value(self):
        return tuple(part.value() for part in self.parts)


def _with_hessian(base: type | None) -> type:
    return type(f"{base.__name__ if base else 'No'}WithHessian", (_WithHessian,), {"base": base})


def quantizing(method: Method, grid: Grid, how: str) -> Method:
    """`method` followed (or, for joint, accompanied) by quantisation onto `grid`."""
    how = resolve_quant_method(method.name, how)
    without_data = _rtn_without_data(grid)
    if how == "joint":
        if method.name != "sparsegpt":
            raise ValueError("joint quantisation is SparseGPT's sweep")

        def prune(weight, inverse, sparsity, pattern, **options):
            result, params = joint_prune_quantize(weight, inverse, sparsity, pattern, grid, **options)
            return result._replace(quantized=params)
        return replace(method, prune=prune, without_data=without_data)

    if how == "rtn":
        def prune(weight, prepared, sparsity, pattern, **options):
            result = method.prune(weight, prepared, sparsity, pattern, **options)
            quantised, params = rtn(result.weight, grid)
            return result._replace(weight=quantised, quantized=params)
        return replace(method, prune=prune, without_data=without_data)

    if how != "gptq":
        raise ValueError(f"unknown quantisation method {how!r}")
    shares_hessian = method.statistic is Hessian
    statistic = Hessian if shares_hessian else _with_hessian(method.statistic)

    def prepare(value, **options):
        hessian = value if shares_hessian else value[-1]
        base_value = value if shares_hessian else (value[0] if method.statistic else None)
        base = method.prepare(base_value, **options) if method.prepare and base_value is not None else base_value
        # SparseGPT's prepared statistic is already the inverse factor; others get their own.
        inverse = base if method.name == "sparsegpt" else prepare_hessian(hessian, **_damping(options))
        return base, inverse

    def prune(weight, prepared, sparsity, pattern, **options):
        base, inverse = prepared
        result = method.prune(weight, base, sparsity, pattern, **options)
        quantised, params = gptq(result.weight, inverse, grid, **_damping(options))
        return result._replace(weight=quantised, quantized=params)

    return replace(method, statistic=statistic, prepare=prepare, prune=prune, without_data=without_data)


def _damping(options: dict) -> dict:
    return {k: options[k] for k in ("percdamp", "max_percdamp") if k in options}


# ---- checks before any work ------------------------------------------------------------------------

def check_settings(spec, method, pattern) -> tuple[Grid | None, str | None]:
    """(the grid, the resolved quantisation method), or (None, None) for a run that does not quantise."""
    if spec.quant_method not in QUANT_METHODS:
        raise QuantizationError(f"unknown {spelled('quant_method')} {spec.quant_method!r}; choose "
                                f"{', '.join(QUANT_METHODS)}")
    if spec.quantize is None:
        # every setting quantisation owns means nothing without a grid, but the grid itself and the format
        # (which any saved model has); derived from the table, so a new one is refused here without a list
        for e in entries():
            if e.setting.owner == "quantize" and e.path not in ("quantize", "format") and \
                    getattr(spec, e.path) != e.default:
                raise QuantizationError(f"{spelled(e.path)} applies to quantisation; add {spelled('quantize')} "
                                        "int8|int4")
        return None, None
    if spec.quantize not in BITS:
        raise QuantizationError(f"{spelled('quantize')} {spec.quantize!r} is not supported; choose "
                                f"{' or '.join(BITS)}")
    if spec.kind in ("eval", "recover"):
        raise QuantizationError(f"an {spec.kind} run takes the model as it is; leave out {spelled('quantize')}")
    if spec.recover is not None:
        raise QuantizationError(f"recovery would move the weights off the {spelled('quantize')} grid; prune and "
                                f"recover with {spelled('save_model')}, then quantise in a second run")
    if pattern.is_structured:
        raise QuantizationError(f"{spelled('quantize')} is not available with a structured {spelled('pattern')} yet; "
                                "save the structured model and quantise it in a second run")
    how = resolve_quant_method(method.name, spec.quant_method)
    if how == "joint" and method.name != "sparsegpt":
        raise QuantizationError(f"{spelled('quant_method')} joint is SparseGPT's sweep; use gptq or rtn with "
                                f"{method.name}")
    if spec.checkpoint_dir:
        raise QuantizationError(f"{spelled('checkpoint_dir')} cannot keep quantisation parameters yet; leave it out "
                                f"with {spelled('quantize')}")
    if spec.quantize_head and spec.format == "compressed-tensors":
        raise QuantizationError(f"{spelled('quantize_head')} is written by {spelled('format')} gguf or hf; "
                                "compressed-tensors packs the blocks' linear layers only")
    if spec.format == "gguf":  # Q8_0 and Q4_0 blocks store their scale as float16: use exactly those scales
        import torch

        return Grid(BITS[spec.quantize], spec.group_size, spec.symmetric, torch.float16), how
    return Grid(BITS[spec.quantize], spec.group_size, spec.symmetric), how


def check_model(skeleton, grid: Grid, head: bool = False) -> None:
    """Against the model's architecture (its config, no weights): every quantised layer takes the group size,
    and the head, when it is quantised too, its groups of 32."""
    check_group_size(skeleton, grid, spelled("group_size"))
    if head:
        check_head(skeleton, spelled("quantize_head"))
