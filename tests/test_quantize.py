"""Quantisation cores against a plain column-by-column re-derivation written here (float64).

The reference below is the SparseGPT paper's joint sweep and GPTQ written the slow, obvious way: one
column at a time, the whole remaining matrix updated after each column, no blocks, no lazy updates,
its own grid arithmetic. The code under test runs blocked (several blocks, lazy batch updates).
"""
from __future__ import annotations

import math

import pytest
import torch

from oneshot.methods import parse_pattern, sparsegpt_prune
from oneshot.quantize import Grid, gptq, joint_prune_quantize, rtn


def make_layer(seed: int, rows: int = 24, cols: int = 64, samples: int = 256):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols) + torch.eye(cols, dtype=torch.float64)
    x = torch.randn(samples, cols, generator=g, dtype=torch.float64) @ mix
    x = x * (torch.rand(cols, generator=g, dtype=torch.float64) + 0.2)
    hessian = 2 * x.t() @ x / samples
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return weight, hessian


def ref_params(values: torch.Tensor, bits: int, symmetric: bool):
    """Per-row (scale, zero) of values [rows, k], as the grid is defined in the module docstring."""
    if symmetric:
        scale = values.abs().max(dim=1).values / (2 ** (bits - 1) - 1)
        scale[scale == 0] = 1
        return scale, torch.zeros_like(scale)
    low = values.min(dim=1).values.clamp(max=0)
    high = values.max(dim=1).values.clamp(min=0)
    scale = (high - low) / (2 ** bits - 1)
    scale[scale == 0] = 1
    zero = torch.clamp(torch.round(-low / scale), 0, 2 ** bits - 1)
    return scale, zero


def ref_round(x, scale, zero, bits, symmetric):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    return (torch.clamp(torch.round(x / scale) + zero, lo, hi) - zero) * scale


def reference_sweep(weight, hessian, sparsity, n, m, bits, group, symmetric, fixed=None, percdamp=0.01):
    """Column by column: choose the mask (one threshold over the whole matrix, or adaptive N:M, or
    `fixed`), then each column is masked, quantised, and its error spread over all later columns."""
    W = weight.clone()
    rows, cols = W.shape
    H = hessian + percdamp * torch.diag(hessian).mean() * torch.eye(cols, dtype=hessian.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d = torch.diag(U)
    if fixed is not None:
        mask = fixed.clone()
    elif m:
        mask = torch.zeros_like(W, dtype=torch.bool)
    else:
        scores = (W ** 2 / d[None, :] ** 2).flatten()
        threshold = torch.sort(scores).values[int(scores.numel() * sparsity)]
        mask = (W ** 2 / d[None, :] ** 2) <= threshold
    if group is None:
        scale, zero = ref_params(W, bits, symmetric)
    for j in range(cols):
        if fixed is None and m and j % m == 0:
            scores = W[:, j:j + m] ** 2 / d[None, j:j + m] ** 2
            for r in range(rows):
                for k in torch.argsort(scores[r])[:n]:
                    mask[r, j + int(k)] = True
        if group is not None and j % group == 0:
            values = W[:, j:j + group].clone()
            values[mask[:, j:j + group]] = 0
            scale, zero = ref_params(values, bits, symmetric)
        w = W[:, j].clone()
        q = ref_round(w, scale, zero, bits, symmetric)
        q[mask[:, j]] = 0
        err = (w - q) / d[j]
        W[:, j:] -= torch.outer(err, U[j, j:])
        W[:, j] = q
    return W, mask


JOINT_CASES = [  # pattern, sparsity, bits, group, symmetric, blocksize
    ("unstructured", 0.5, 4, 16, False, 64),
    ("unstructured", 0.5, 4, 16, True, 64),
    ("unstructured", 0.6, 8, None, False, 64),
    ("2:4", 0.5, 4, 8, False, 16),     # four blocks: lazy updates between them
    ("2:4", 0.5, 4, 16, True, 32),
    ("4:8", 0.5, 8, None, True, 24),   # blocksize rounded to a multiple of M
]


@pytest.mark.parametrize("pattern,sparsity,bits,group,symmetric,blocksize", JOINT_CASES)
def test_joint_sweep_equals_column_by_column(pattern, sparsity, bits, group, symmetric, blocksize):
    weight, hessian = make_layer(0)
    pat = parse_pattern(pattern)
    grid = Grid(bits, group, symmetric)
    result, params = joint_prune_quantize(weight, hessian, sparsity, pat, grid, blocksize=blocksize, kernel="torch")
    want, want_mask = reference_sweep(weight, hessian, sparsity, pat.n, pat.m, bits, group, symmetric)
    assert torch.equal(result.mask, want_mask)
    torch.testing.assert_close(result.weight, want, rtol=0, atol=1e-10)
    # Zeros stay zero; every value lies on its group's grid (codes read back exactly).
    assert torch.all(result.weight[result.mask] == 0)
    scale, zero = params.expanded(weight.shape[1])
    codes = params.codes(result.weight).double()
    assert torch.equal((codes - zero) * scale, result.weight)
    lo, hi = grid.code_range
    assert codes.min() >= lo and codes.max() <= hi
    # Not trivial: quantisation moved the kept weights, and differently from pruning alone.
    pruned_only = sparsegpt_prune(weight, hessian, sparsity, pat, blocksize=blocksize, kernel="torch").weight
    assert (result.weight - pruned_only).abs().max() > 1e-3


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, False), (8, 32, True), (4, None, True)])
def test_gptq_on_pruned_weights_keeps_zeros_and_equals_reference(bits, group, symmetric):
    weight, hessian = make_layer(1)
    pruned = sparsegpt_prune(weight, hessian, 0.5, parse_pattern("2:4"), kernel="torch").weight
    grid = Grid(bits, group, symmetric)
    before = pruned.clone()  # a transposed view, as SparseGPT returns it: must not be written into
    quantised, params = gptq(pruned, hessian, grid, blocksize=32)
    assert torch.equal(pruned, before)
    want, _ = reference_sweep(pruned, hessian, 0.0, 0, 0, bits, group, symmetric, fixed=pruned == 0)
    torch.testing.assert_close(quantised, want, rtol=0, atol=1e-10)
    assert torch.equal(quantised == 0, (pruned == 0) | (params.codes(quantised) == params.expanded(64)[1].int()))
    assert torch.all(quantised[pruned == 0] == 0)
    scale, zero = params.expanded(weight.shape[1])
    assert torch.equal((params.codes(quantised).double() - zero) * scale, quantised)

    # GPTQ's point: a smaller layer-output error than rounding each weight to nearest.
    def error(q):
        delta = q - pruned
        return float(torch.trace(delta @ hessian @ delta.t()))
    rounded, _ = rtn(pruned, grid)
    assert error(quantised) < error(rounded)


@pytest.mark.parametrize("group,symmetric,scale_dtype", [(8, False, None), (None, True, None), (32, True, torch.float16)])
def test_rtn_on_grid_and_zeros_stay_zero(group, symmetric, scale_dtype):
    weight, _ = make_layer(2, cols=72)  # 72 = two groups of 32 and a narrower last one
    weight[weight.abs() < 0.5] = 0
    grid = Grid(4, group, symmetric, scale_dtype)
    quantised, params = rtn(weight.float(), grid)
    assert quantised.dtype == torch.float32
    assert torch.all(quantised[weight == 0] == 0)
    scale, zero = params.expanded(72)
    assert torch.equal((params.codes(quantised).float() - zero) * scale, quantised)
    if scale_dtype is not None:
        assert torch.equal(params.scale.to(scale_dtype).float(), params.scale)
    # at most 2^bits levels per (row, group), and each level is the nearest to its weight
    size = 72 if group is None else group
    for start in range(0, 72, size):
        assert all(len(set(row.tolist())) <= 16 for row in quantised[:, start:start + size])
    assert (quantised - weight.float()).abs().max() <= scale.max() * 0.5 + 1e-6 or not symmetric


@pytest.mark.parametrize("method_name,how,sequential", [("wanda", "gptq", False), ("sparsegpt", "joint", True),
                                                         ("magnitude", "rtn", False), ("admm", "gptq", True)])
def test_quantising_methods_through_the_engine(method_name, how, sequential):
    """Every layer of a tiny model ends on its grid with its pruned weights at zero, whichever stages run."""
    from oneshot.engine import DEFAULT_STAGES, prune_model
    from oneshot.engine.sequential import SEQUENTIAL_STAGES
    from oneshot.methods import get_method
    from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers
    from oneshot.quantize import quantizing

    model = load_model("random:tiny-llama", dtype=torch.float32).model
    ids = torch.randint(0, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    method = quantizing(get_method(method_name), Grid(4, 16, True), how)
    options = {"iterations": 4, "phase_steps": 2} if method_name == "admm" else {}
    report = prune_model(model, method, 0.5, parse_pattern("unstructured"), ids if method.statistic else None,
                         options=options, progress=False, stages=SEQUENTIAL_STAGES if sequential else DEFAULT_STAGES)
    layers = {f"{i}.{name}": layer for i, block in enumerate(decoder_blocks(model))
              for name, layer in prunable_layers(block).items()}
    assert set(report.quantized) == set(layers)
    for name, layer in layers.items():
        weight, params = get_weight(layer), report.quantized[name]
        scale, zero = params.expanded(weight.shape[1])
        assert torch.equal((params.codes(weight).float() - zero) * scale, weight), name
        assert report.layer_sparsity[name] >= 0.5
