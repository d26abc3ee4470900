"""Tests of ALPS (oneshot.methods.alps): error against SparseGPT and magnitude, exact counts and N:M
patterns, the CG refit, options, numerics, and a run through oneshot.run on the tiny random Llama.

Layers are small and seeded; expected values are computed here in float64 with plain formulas.
"""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.methods import (
    ALPS_OPTIONS,
    METHODS,
    Hessian,
    NumericsError,
    alps_prune,
    magnitude_prune,
    parse_pattern,
    prepare_alps,
    sparsegpt_prune,
)
from oneshot.methods.alps import objective
from oneshot.methods.options import OptionError, defaults
from oneshot.models import decoder_blocks, get_weight, load_model, prunable_layers

UNSTRUCTURED = parse_pattern("unstructured")


def layer(seed: int, rows: int, cols: int, tokens: int = 512):
    """(weight, inputs X [tokens, cols], H = 2/N X^T X): correlated inputs of uneven scale, a few outliers."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x = x * (torch.rand(cols, generator=g) + 0.2)
    x[:, :3] *= 8
    weight = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    return weight, x, 2 * x.t() @ x / tokens


def output_error(weight, new_weight, x) -> float:
    """||(W - W') X||^2 in float64."""
    return float(((x.double() @ (weight.double() - new_weight.double()).t()) ** 2).sum())


@pytest.mark.parametrize("seed,rows,cols", [(0, 64, 64), (1, 96, 128), (2, 64, 192)])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_error_below_sparsegpt_and_magnitude(seed, rows, cols, pattern):
    weight, x, hessian = layer(seed, rows, cols)
    pattern = parse_pattern(pattern)
    ours = output_error(weight, alps_prune(weight, hessian, 0.7, pattern).weight, x)
    assert ours < output_error(weight, sparsegpt_prune(weight, hessian, 0.7, pattern, kernel="torch").weight, x)
    assert ours < output_error(weight, magnitude_prune(weight, 0.7, pattern).weight, x)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_alps_unstructured_meets_the_target_per_matrix(sparsity):
    weight, _, hessian = layer(3, 48, 80)
    result = alps_prune(weight, hessian, sparsity, UNSTRUCTURED)
    numel = weight.numel()
    pruned = int(result.mask.sum())
    assert pruned == numel - round((1 - sparsity) * numel)  # the authors' count: round((1 - p) numel) kept
    assert abs(pruned - sparsity * numel) <= 0.5
    assert torch.all(result.weight[result.mask] == 0)
    assert torch.all(result.weight[~result.mask] != 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_alps_nm_pattern_holds_in_every_group(pattern):
    pattern = parse_pattern(pattern)
    weight, _, hessian = layer(4, 40, 64)
    result = alps_prune(weight, hessian, 0.0, pattern)
    groups = result.mask.reshape(40, 64 // pattern.m, pattern.m)
    assert torch.all(groups.sum(-1) == pattern.n)
    assert torch.all(result.weight[result.mask] == 0)
    assert torch.all(result.weight[~result.mask] != 0)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_refit_never_increases_the_objective_and_keeps_the_support(pattern):
    weight, _, hessian = layer(5, 48, 96)
    pattern = parse_pattern(pattern)
    damped = hessian.double() + 0.01 * torch.diag(hessian.double()).mean() * torch.eye(96, dtype=torch.float64)
    results = [alps_prune(weight, hessian, 0.7, pattern, cg_iters=steps) for steps in (0, 1, 2, 5, 10)]
    errors = [objective(weight, r.weight, damped) for r in results]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0]
    assert all(torch.equal(r.mask, results[0].mask) for r in results)


def test_alps_refit_reaches_the_least_squares_optimum_on_its_support():
    weight, _, hessian = layer(6, 16, 48)
    result = alps_prune(weight.double(), hessian.double(), 0.5, UNSTRUCTURED, cg_iters=200, cg_rtol=1e-12)
    H = hessian.double() + 0.01 * torch.diag(hessian.double()).mean() * torch.eye(48, dtype=torch.float64)
    for r in range(16):  # min (w - w0) H (w - w0)^T with w = 0 off the support: H_SS w_S = (H w0)_S
        keep = ~result.mask[r]
        want = torch.linalg.solve(H[keep][:, keep], (H @ weight[r].double())[keep])
        assert torch.allclose(result.weight[r, keep], want, atol=1e-8, rtol=1e-8)


def test_alps_without_iterations_is_the_normalised_magnitude_mask():
    weight, _, hessian = layer(7, 32, 64)
    w64, h64 = weight.double(), hessian.double()
    result = alps_prune(w64, h64, 0.6, UNSTRUCTURED, max_iter=0, cg_iters=0)
    H = h64 + 0.01 * torch.diag(h64).mean() * torch.eye(64, dtype=torch.float64)
    scores = w64.abs() * torch.sqrt(torch.diag(H))  # |W| sqrt(H_jj), one count over the matrix
    want = torch.zeros(weight.numel(), dtype=torch.bool)
    want[torch.argsort(scores.flatten())[: weight.numel() - round(0.4 * weight.numel())]] = True
    assert torch.equal(result.mask, want.reshape(weight.shape))
    assert torch.allclose(result.weight, w64.masked_fill(want.reshape(weight.shape), 0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [
    {"rho": 0}, {"rho": "fast"}, {"max_iter": -1}, {"max_iter": 2.5}, {"update_iter": 0}, {"switch_iter": -1},
    {"percdamp": -0.01}, {"cg_iters": -3}, {"cg_rtol": 0}, {"cg_rtol": 2}, {"iterations": 10},
])
def test_alps_refuses_bad_options_in_one_line(bad):
    weight, _, hessian = layer(8, 16, 32)
    with pytest.raises(OptionError) as caught:
        alps_prune(weight, hessian, 0.5, UNSTRUCTURED, **bad)
    assert "\n" not in str(caught.value) and "alps" in str(caught.value)
    with pytest.raises(OptionError):
        METHODS["alps"].check_options({k: str(v) for k, v in bad.items()})


def test_alps_options_are_declared_with_the_authors_defaults():
    assert defaults(ALPS_OPTIONS) == {"rho": 0.1, "max_iter": 300, "update_iter": 3, "switch_iter": 30,
                                      "percdamp": 0.01, "cg_iters": 10, "cg_rtol": 1e-4}
    method = METHODS["alps"]
    assert method.statistic is Hessian and method.prepare is prepare_alps
    assert method.check_options({"max_iter": "50", "rho": "0.2"}) == {"max_iter": 50, "rho": 0.2}


def test_alps_options_change_the_result():
    weight, _, hessian = layer(9, 32, 64)
    base = alps_prune(weight, hessian, 0.7, UNSTRUCTURED).weight
    for options in ({"rho": 0.5}, {"max_iter": 6}, {"update_iter": 5}, {"cg_iters": 0}, {"percdamp": 0.1}):
        assert not torch.equal(alps_prune(weight, hessian, 0.7, UNSTRUCTURED, **options).weight, base), options


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_alps_keeps_the_weight_dtype_and_exact_zeros(dtype):
    weight, x, hessian = layer(10, 32, 64)
    result = alps_prune(weight.to(dtype), hessian, 0.5, parse_pattern("2:4"))
    assert result.weight.dtype == dtype
    assert torch.all(result.weight[result.mask] == 0)
    assert output_error(weight, result.weight, x) < output_error(weight, weight.masked_fill(result.mask, 0), x)


def test_alps_prepared_hessian_is_shared_and_equal():
    weight, _, hessian = layer(11, 32, 64)
    other = layer(12, 24, 64)[0]
    prepared = prepare_alps(hessian)
    for w in (weight, other):
        assert torch.equal(alps_prune(w, prepared, 0.6, UNSTRUCTURED).weight,
                           alps_prune(w, hessian, 0.6, UNSTRUCTURED).weight)


def test_alps_zero_sparsity_and_inputs_untouched_and_deterministic():
    weight, _, hessian = layer(13, 24, 48)
    w0, h0 = weight.clone(), hessian.clone()
    assert torch.equal(alps_prune(weight, hessian, 0.0, UNSTRUCTURED).weight, weight)
    a = alps_prune(weight, hessian, 0.7, UNSTRUCTURED)
    b = alps_prune(weight, hessian, 0.7, UNSTRUCTURED)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    assert torch.equal(weight, w0) and torch.equal(hessian, h0)


def test_alps_dead_inputs_are_handled_as_the_authors_do():
    weight, x, _ = layer(14, 24, 48)
    x[:, [5, 17]] = 0
    hessian = 2 * x.t() @ x / x.shape[0]
    result = alps_prune(weight, hessian, 0.5, UNSTRUCTURED)  # damping alone keeps H positive-definite
    assert torch.isfinite(result.weight).all() and int(result.mask.sum()) == 24 * 24


def test_alps_all_zero_inputs_and_nothing_kept():
    weight = layer(17, 16, 32)[0]
    result = alps_prune(weight, torch.zeros(32, 32), 0.5, UNSTRUCTURED)  # no input reaches it: H = I
    assert int(result.mask.sum()) == 256  # the kept weights stay as they are (the optimum for H = I)
    assert torch.allclose(result.weight, weight.masked_fill(result.mask, 0), rtol=1e-5, atol=0)
    tiny = layer(18, 2, 8)[0]
    nothing = alps_prune(tiny, torch.eye(8), 0.99, UNSTRUCTURED)  # round(0.01 * 16) = 0 kept
    assert nothing.mask.all() and torch.all(nothing.weight == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_alps_non_finite_hessian_raises(bad):
    weight, _, hessian = layer(15, 16, 32)
    hessian[3, 4] = bad
    with pytest.raises(NumericsError):
        alps_prune(weight, hessian, 0.5, UNSTRUCTURED)


def test_alps_indefinite_hessian_escalates_damping_and_warns():
    weight, _, hessian = layer(16, 16, 32)
    shift = torch.linalg.eigvalsh(hessian).min() + 0.05 * torch.diag(hessian).mean()
    hessian = hessian - shift * torch.eye(32)  # one eigenvalue below -1% of the mean diagonal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = alps_prune(weight, hessian, 0.5, UNSTRUCTURED)
    assert any("damping" in str(w.message) for w in caught)
    assert result.info["percdamp"] > 0.01
    assert torch.isfinite(result.weight).all()


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.7), ("2:4", None)])
def test_alps_runs_end_to_end_on_the_tiny_model(pattern, sparsity):
    spec = RunSpec(model="random:tiny-llama", method="alps", pattern=pattern, sparsity=sparsity,
                   calibration=Calibration(nsamples=4, seqlen=32), eval=Evaluation(samples=1), device="cpu",
                   progress=False)
    loaded = load_model(spec.model, dtype=torch.float32)
    record = run(spec, loaded=loaded)
    assert record.method == "alps" and all(math.isfinite(v) for v in record.ppl.values())
    target = 0.5 if pattern == "2:4" else 0.7
    assert abs(record.sparsity_measured - target) < 1e-3
    for block in decoder_blocks(loaded.model):
        for name, module in prunable_layers(block).items():
            zeros = get_weight(module) == 0
            if pattern == "2:4":
                assert torch.all(zeros.reshape(zeros.shape[0], -1, 4).sum(-1) == 2), name
            else:  # the authors' count per layer: round(0.3 numel) kept
                assert int(zeros.sum()) == zeros.numel() - round(0.3 * zeros.numel()), name
