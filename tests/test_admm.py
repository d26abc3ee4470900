"""Tests of ADMM layer reconstruction: error against SparseGPT, exact patterns, options, numerics.

Reference values (errors, masks, least-squares optima) are computed here in float64 with plain
formulas. The layers are small and seeded; the file runs in well under a minute on a CPU.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from oneshot.methods import (
    ADMM_OPTIONS,
    NumericsError,
    Pattern,
    admm_prune,
    parse_pattern,
    prepare_admm,
    sparsegpt_prune,
)
from oneshot.methods.options import OptionError, defaults

UNSTRUCTURED = parse_pattern("unstructured")


def layer(seed: int, rows: int, cols: int, tokens: int = 512, dead=()):
    """(weight, inputs X [tokens, cols], H = 2/N X^T X) with correlated features of uneven scale and
    a few outlier features, like an LLM layer's inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x = x * (torch.rand(cols, generator=g) + 0.2)
    x[:, :3] *= 8  # outlier features
    for j in dead:
        x[:, j] = 0
    hessian = 2 * x.t() @ x / tokens
    weight = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
    return weight, x, hessian


def output_error(weight, new_weight, x) -> float:
    """||X (W - W')^T||^2 in float64."""
    return float(((x.double() @ (weight.double() - new_weight.double()).t()) ** 2).sum())


CASES = [  # (seed, rows, cols)
    (0, 64, 64),
    (1, 192, 128),
    (2, 128, 256),
]


@pytest.mark.parametrize("seed,rows,cols", CASES)
@pytest.mark.parametrize("sparsity,pattern", [
    (0.5, "unstructured"), (0.6, "unstructured"), (0.7, "unstructured"), (0.8, "unstructured"),
    (0.5, "2:4"), (0.5, "4:8"),
])
def test_admm_error_at_most_sparsegpt(seed, rows, cols, sparsity, pattern):
    weight, x, hessian = layer(seed, rows, cols)
    pattern = parse_pattern(pattern)
    ours = admm_prune(weight, hessian, sparsity, pattern)
    reference = sparsegpt_prune(weight, hessian, sparsity, pattern, kernel="torch")
    assert output_error(weight, ours.weight, x) <= output_error(weight, reference.weight, x)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9])
def test_admm_unstructured_prunes_exactly_the_count_per_matrix(sparsity):
    weight, _, hessian = layer(3, 96, 160)
    result = admm_prune(weight, hessian, sparsity, UNSTRUCTURED)
    assert int(result.mask.sum()) == int(weight.numel() * sparsity)
    assert torch.all(result.weight[result.mask] == 0)
    assert torch.all(result.weight[~result.mask] != 0)
    # one budget per matrix, not per row: the rows' counts differ
    per_row = result.mask.sum(1)
    assert per_row.max() > per_row.min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_admm_nm_pattern_holds_in_every_group(pattern):
    pattern = parse_pattern(pattern)
    weight, _, hessian = layer(4, 80, 128)
    result = admm_prune(weight, hessian, 0.0, pattern)
    groups = result.mask.reshape(80, 128 // pattern.m, pattern.m)
    assert torch.all(groups.sum(-1) == pattern.n)
    assert torch.all(result.weight[result.mask] == 0)
    assert torch.all(result.weight[~result.mask] != 0)


def test_admm_nm_width_must_divide():
    weight, _, hessian = layer(5, 16, 66)
    with pytest.raises(ValueError, match="multiple of 4"):
        admm_prune(weight, hessian, 0.5, Pattern(2, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_keeps_the_weight_dtype_and_exact_zeros(dtype, pattern):
    weight, x, hessian = layer(6, 64, 96)
    result = admm_prune(weight.to(dtype), hessian.to(dtype) if dtype == torch.float64 else hessian, 0.5,
                        parse_pattern(pattern))
    assert result.weight.dtype == dtype
    assert torch.all(result.weight[result.mask] == 0)
    assert output_error(weight, result.weight, x) < output_error(weight, weight.masked_fill(result.mask, 0), x)


def test_admm_float64_is_computed_in_float64():
    weight, _, hessian = layer(7, 48, 64)
    w64, h64 = weight.double(), hessian.double()
    options = dict(iterations=3, phase_steps=0, refit_iters=0, rho=1.0, relaxation=1.0)
    got = admm_prune(w64, h64, 0.5, UNSTRUCTURED, **options).weight
    # the same three steps written out in float64 from the module's formulas
    H = h64 + 0.01 * torch.diag(h64).mean() * torch.eye(64, dtype=torch.float64)
    d = torch.sqrt(torch.diag(H))
    A = H / d[:, None] / d[None, :]
    B = (w64 * d).t()
    k = int(B.numel() * 0.5)
    mask = torch.zeros(B.numel(), dtype=torch.bool)
    mask[torch.argsort(B.abs().flatten())[:k]] = True
    mask = mask.reshape(B.shape)
    X, U = B.clone(), torch.zeros_like(B)
    inverse = torch.linalg.inv(A + torch.eye(64, dtype=torch.float64))
    for _ in range(3):
        Z = (X + U).masked_fill(mask, 0)
        U = U + X - Z
        X = inverse @ (A @ B + (Z - U))
    want = ((X + U).masked_fill(mask, 0) / d[:, None]).t()
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-10)


def test_admm_without_iterations_is_the_normalised_magnitude_mask():
    weight, _, hessian = layer(8, 64, 96)
    result = admm_prune(weight, hessian, 0.6, UNSTRUCTURED, iterations=0, refit_iters=0)
    H = hessian.double() + 0.01 * torch.diag(hessian.double()).mean() * torch.eye(96, dtype=torch.float64)
    scores = weight.double().abs() * torch.sqrt(torch.diag(H))  # |W| sqrt(H_jj): one budget per matrix
    k = int(weight.numel() * 0.6)
    order = torch.argsort(scores.flatten())
    want = torch.zeros(weight.numel(), dtype=torch.bool)
    want[order[:k]] = True
    assert int(result.mask.sum()) == k
    differ = (result.mask.flatten() != want).nonzero().flatten()
    # fp32 and fp64 scores may order near-ties at the threshold differently: only those may differ
    threshold = scores.flatten()[order[k]]
    assert torch.allclose(scores.flatten()[differ], threshold.expand(len(differ)), rtol=1e-5, atol=0)
    assert torch.allclose(result.weight, weight.masked_fill(result.mask, 0), rtol=1e-6, atol=0)
    assert torch.all(result.weight[result.mask] == 0)


def test_admm_refit_reaches_the_least_squares_optimum_on_its_support():
    weight, _, hessian = layer(9, 24, 48)
    percdamp = 0.01
    result = admm_prune(weight, hessian, 0.5, UNSTRUCTURED, iterations=4, refit_iters=200, percdamp=percdamp)
    H = hessian.double() + percdamp * torch.diag(hessian.double()).mean() * torch.eye(48, dtype=torch.float64)
    want = torch.zeros(24, 48, dtype=torch.float64)
    for r in range(24):  # min (w - w0) H (w - w0)^T with w = 0 off the support: H_SS w_S = (H w0)_S
        keep = ~result.mask[r]
        rhs = (H @ weight[r].double())[keep]
        want[r, keep] = torch.linalg.solve(H[keep][:, keep], rhs)
    assert torch.allclose(result.weight.double(), want, atol=1e-4, rtol=1e-4)


def test_admm_options_are_honoured():
    weight, x, hessian = layer(10, 64, 96)
    base = admm_prune(weight, hessian, 0.6, UNSTRUCTURED).weight
    for options in ({"iterations": 0}, {"refit_iters": 5}, {"relaxation": 1.0}, {"phase_steps": 0}, {"rho": 0.3},
                    {"rho_growth": 1.2}, {"percdamp": 0.1}, {"iterations": 5}):
        other = admm_prune(weight, hessian, 0.6, UNSTRUCTURED, **options).weight
        assert not torch.equal(other, base), options
    # strings, as from the command line, are typed
    assert torch.equal(admm_prune(weight, hessian, 0.6, UNSTRUCTURED, iterations="20", rho="1.0").weight,
                       admm_prune(weight, hessian, 0.6, UNSTRUCTURED, iterations=20, rho=1.0).weight)
    # more iterations reconstruct better than none
    none = admm_prune(weight, hessian, 0.6, UNSTRUCTURED, iterations=0, refit_iters=0).weight
    assert output_error(weight, base, x) < output_error(weight, none, x)


@pytest.mark.parametrize("bad", [
    {"iterations": -1}, {"iterations": 2.5}, {"rho": 0}, {"rho": "fast"}, {"rho_growth": 0.5},
    {"percdamp": -0.01}, {"refit_iters": -3}, {"relaxation": 2.5}, {"phase_steps": True}, {"blocksize": 128},
])
def test_admm_refuses_bad_options(bad):
    weight, _, hessian = layer(11, 16, 32)
    with pytest.raises(OptionError):
        admm_prune(weight, hessian, 0.5, UNSTRUCTURED, **bad)


def test_admm_options_are_declared():
    assert {o.name for o in ADMM_OPTIONS} == set(defaults(ADMM_OPTIONS))
    assert defaults(ADMM_OPTIONS)["percdamp"] == 0.01


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_dead_inputs_are_zeroed_and_pruned_first(pattern):
    dead = (5, 17, 40)
    weight, x, hessian = layer(12, 48, 64, dead=dead)
    result = admm_prune(weight, hessian, 0.5, parse_pattern(pattern))
    assert torch.all(result.weight[:, list(dead)] == 0)
    assert torch.all(result.mask[:, list(dead)])
    assert result.info["dead_inputs"] == len(dead)
    assert torch.isfinite(result.weight).all()


def test_admm_prepared_hessian_is_shared_and_equal():
    weight, _, hessian = layer(13, 64, 96)
    other = layer(14, 32, 96)[0]
    prepared = prepare_admm(hessian)
    for w in (weight, other):
        assert torch.equal(admm_prune(w, prepared, 0.5, UNSTRUCTURED).weight,
                           admm_prune(w, hessian, 0.5, UNSTRUCTURED).weight)
    assert len(prepared.factors) == 1  # one factorisation for both layers


def test_admm_zero_sparsity_keeps_the_weights():
    weight, _, hessian = layer(15, 32, 48)
    result = admm_prune(weight, hessian, 0.0, UNSTRUCTURED)
    assert not result.mask.any()
    assert torch.equal(result.weight, weight)


def test_admm_does_not_modify_its_inputs():
    weight, _, hessian = layer(16, 32, 48)
    w0, h0 = weight.clone(), hessian.clone()
    admm_prune(weight, hessian, 0.5, UNSTRUCTURED)
    admm_prune(weight, hessian, 0.5, Pattern(2, 4))
    assert torch.equal(weight, w0) and torch.equal(hessian, h0)


def test_admm_is_deterministic():
    weight, _, hessian = layer(17, 64, 64)
    a = admm_prune(weight, hessian, 0.7, UNSTRUCTURED)
    b = admm_prune(weight, hessian, 0.7, UNSTRUCTURED)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_admm_non_finite_hessian_raises(bad):
    weight, _, hessian = layer(18, 16, 32)
    hessian[3, 4] = bad
    with pytest.raises(NumericsError):
        admm_prune(weight, hessian, 0.5, UNSTRUCTURED)


def test_admm_indefinite_hessian_escalates_damping_and_warns():
    weight, _, hessian = layer(19, 16, 32)
    shift = torch.linalg.eigvalsh(hessian).min() + 0.05 * torch.diag(hessian).mean()
    hessian = hessian - shift * torch.eye(32)  # one eigenvalue below -1% of the mean diagonal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = admm_prune(weight, hessian, 0.5, UNSTRUCTURED)
    assert any("damping" in str(w.message) for w in caught)
    assert result.info["percdamp"] > 0.01
    assert torch.isfinite(result.weight).all()


def test_admm_singular_hessian_works():
    weight, x, _ = layer(20, 32, 64, tokens=16)  # rank 16 < 64 inputs
    hessian = 2 * x.t() @ x / 16
    result = admm_prune(weight, hessian, 0.5, UNSTRUCTURED)
    assert torch.isfinite(result.weight).all()
    assert int(result.mask.sum()) == 32 * 32


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_admm_counts_stay_exact_when_all_scores_tie(pattern):
    pattern = parse_pattern(pattern)
    g = torch.Generator().manual_seed(21)
    weight = torch.where(torch.rand(40, 64, generator=g) < 0.5, -1.0, 1.0)  # every |w| equal
    hessian = torch.eye(64)  # every input equally loud: every score ties
    result = admm_prune(weight, hessian, 0.55, pattern, iterations=0)
    if pattern.is_nm:
        groups = result.mask.reshape(40, 64 // pattern.m, pattern.m)
        assert torch.all(groups.sum(-1) == pattern.n)
        assert torch.all(groups[..., :pattern.n])  # ties go to the lower input
    else:
        assert int(result.mask.sum()) == int(weight.numel() * 0.55)
    assert torch.all(result.weight[result.mask] == 0)
