"""Tests of the pure pruning methods in oneshot.methods against brute-force re-derivations.

Every expected value here is computed independently in the test (plain loops, float64, the
papers' formulas), never by calling the code under test a second way. The inputs are small and
seeded, so the whole file runs in a few seconds on CPU.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from oneshot.methods import (
    METHODS,
    ActSqNorm,
    Hessian,
    NumericsError,
    Pattern,
    PatternError,
    check_sparsity,
    magnitude_prune,
    parse_pattern,
    sparsegpt_prune,
    wanda_prune,
)

UNSTRUCTURED = parse_pattern("unstructured")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(seed: int, nseq: int = 8, tokens: int = 64, cols: int = 256, dead=()) -> torch.Tensor:
    """Calibration inputs [sequences, tokens, features] with correlated features of uneven scale,
    so that OBS updates move the kept weights a lot and the adaptive N:M masks differ from static
    ones. Features listed in `dead` are zero in every token."""
    g = gen(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    x = torch.randn(nseq, tokens, cols, generator=g) @ mix
    x = x * (torch.rand(cols, generator=g) + 0.2)
    for j in dead:
        x[..., j] = 0
    return x


def brute_hessian(x: torch.Tensor) -> torch.Tensor:
    """(2/N) * sum over sequences of X X^T, X = features x tokens, in float64."""
    x = x.double()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    h = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
    for s in range(x.shape[0]):
        xs = x[s].t()  # features x tokens
        h += xs @ xs.t()
    return h * (2.0 / x.shape[0])


def make_layer(seed: int, rows: int = 48, cols: int = 256, dead=()):
    x = make_inputs(seed, cols=cols, dead=dead)
    weight = torch.randn(rows, cols, generator=gen(seed + 1000))
    return weight, brute_hessian(x).float()


def obs_reference(weight, hessian, sparsity, n, m, blocksize, percdamp=0.01):
    """Straightforward SparseGPT in float64: visit columns one at a time and, after each column,
    update *all* remaining columns at once (no lazy block updates).

    Unstructured: when j % blocksize == 0, choose the mask of columns [j, j+B) from the current
    weights with score w^2 / U_jj^2 and the inclusive threshold at rank floor(numel * p).
    N:M: when j % m == 0, prune the n lowest scores of W[:, j:j+m] per row, from current weights.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        H[j, j] = 1.0
        W[:, j] = 0.0
    H = H + percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d = torch.diag(U)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if m == 0 and j % blocksize == 0:
            end = min(j + blocksize, cols)
            scores = W[:, j:end] ** 2 / d[j:end] ** 2
            threshold = torch.sort(scores.flatten()).values[int(scores.numel() * sparsity)]
            mask[:, j:end] = scores <= threshold
        if m and j % m == 0:
            scores = W[:, j:j + m] ** 2 / d[j:j + m] ** 2
            lowest = torch.argsort(scores, dim=1)[:, :n]
            for r in range(rows):
                mask[r, j + lowest[r]] = True
        w = W[:, j].clone()
        q = torch.where(mask[:, j], torch.zeros_like(w), w)
        err = (w - q) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
        W[:, j] = q
    return W, mask, U


def assert_nm(mask: torch.Tensor, weight: torch.Tensor, n: int, m: int):
    rows, cols = mask.shape
    assert cols % m == 0
    assert torch.all(mask.reshape(rows, cols // m, m).sum(-1) == n)
    zeros = (weight == 0).reshape(rows, cols // m, m).sum(-1)
    assert torch.all(zeros == n), "every group of M must hold exactly N zeros"


# --------------------------------------------------------------------------------------------
# 1. SparseGPT against a column-by-column OBS implementation
# --------------------------------------------------------------------------------------------

SPARSEGPT_CASES = [
    # (pattern, sparsity, blocksize)
    ("unstructured", 0.5, 64),
    ("unstructured", 0.7, 64),
    ("unstructured", 0.5, 128),
    ("unstructured", 0.7, 128),
    ("unstructured", 0.5, 96),   # last block narrower than the others
    ("2:4", 0.5, 64),
    ("2:4", 0.5, 128),
    ("4:8", 0.5, 64),
    ("4:8", 0.5, 128),
    ("4:8", 0.5, 60),            # blocksize not a multiple of M
]


@pytest.mark.parametrize("pattern,sparsity,blocksize", SPARSEGPT_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_matches_column_by_column_obs(pattern, sparsity, blocksize, seed):
    weight, hessian = make_layer(seed)
    pat = parse_pattern(pattern)
    result = sparsegpt_prune(weight, hessian, sparsity, pat, blocksize=blocksize)
    ref_w, ref_mask, _ = obs_reference(weight, hessian, sparsity, pat.n, pat.m, blocksize)

    # The comparison is not trivial: OBS moved the kept weights far from where they started.
    kept = ~ref_mask
    moved = (ref_w - weight.double())[kept].norm() / weight.double()[kept].norm()
    assert moved > 0.1

    assert result.weight.dtype == weight.dtype and result.weight.shape == weight.shape
    assert result.mask.dtype == torch.bool
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=1e-5, atol=5e-5)
    # Pruned entries are exactly zero, and only those (random data has no zero weights).
    assert torch.all(result.weight[result.mask] == 0)
    assert torch.equal(result.weight == 0, result.mask)
    assert torch.isfinite(result.weight).all()
    assert "percdamp" not in result.info  # noted only when damping had to grow

    rows, cols = weight.shape
    if pat.is_nm:
        assert_nm(result.mask, result.weight, pat.n, pat.m)
    else:
        # Inclusive threshold at rank floor(numel*p) in each block: with no ties among the
        # scores, each block prunes floor(numel*p) + 1 entries.
        for b0 in range(0, cols, blocksize):
            b1 = min(b0 + blocksize, cols)
            block = result.mask[:, b0:b1]
            assert int(block.sum()) == int(block.numel() * sparsity) + 1


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sparsegpt_nm_mask_is_adaptive(pattern):
    """The N:M mask follows the weights as updated so far, not the original weights."""
    weight, hessian = make_layer(3)
    pat = parse_pattern(pattern)
    result = sparsegpt_prune(weight, hessian, 0.5, pat, blocksize=128)
    _, _, U = obs_reference(weight, hessian, 0.5, pat.n, pat.m, 128)
    static_scores = weight.double() ** 2 / torch.diag(U) ** 2
    rows, cols = weight.shape
    groups = static_scores.reshape(rows, cols // pat.m, pat.m)
    static = torch.zeros_like(groups, dtype=torch.bool)
    static.scatter_(-1, torch.argsort(groups, dim=-1)[..., :pat.n], True)
    static = static.reshape(rows, cols)
    assert (static != result.mask).sum() > 100


def test_sparsegpt_zero_sparsity_keeps_weights():
    weight, hessian = make_layer(4)
    result = sparsegpt_prune(weight, hessian, 0.0, UNSTRUCTURED)
    assert not result.mask.any()
    assert torch.equal(result.weight, weight)


# --------------------------------------------------------------------------------------------
# 2. Dead inputs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.1), ("2:4", 0.5)])
def test_sparsegpt_dead_inputs(pattern, sparsity):
    dead = (5, 130)
    weight, hessian = make_layer(5, dead=dead)
    assert torch.all(torch.diag(hessian)[list(dead)] == 0)
    # Large weights on dead inputs: without the dead-input rule they would survive pruning.
    weight[:, list(dead)] = 1000.0
    pat = parse_pattern(pattern)
    result = sparsegpt_prune(weight, hessian, sparsity, pat, blocksize=64)
    assert torch.isfinite(result.weight).all()
    for j in dead:
        assert torch.all(result.weight[:, j] == 0)
    assert result.info["dead_inputs"] == len(dead)
    ref_w, ref_mask, _ = obs_reference(weight, hessian, sparsity, pat.n, pat.m, 64)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=1e-5, atol=5e-5)


# --------------------------------------------------------------------------------------------
# 3. Damping
# --------------------------------------------------------------------------------------------

def spectral(seed: int, eigenvalues: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen(seed), dtype=torch.float64))
    return ((q * eigenvalues) @ q.t()).float()


def test_sparsegpt_well_conditioned_uses_default_damping_without_warning():
    weight, hessian = make_layer(6, cols=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = sparsegpt_prune(weight, hessian, 0.5, UNSTRUCTURED)
    assert "percdamp" not in result.info  # noted only when damping had to grow


def test_sparsegpt_indefinite_hessian_escalates_damping():
    cols = 64
    eig = torch.linspace(0.5, 1.5, cols, dtype=torch.float64)
    eig[0] = -0.05  # mean(diag) ~ 1, so 1% damping leaves it indefinite and 10% fixes it
    hessian = spectral(7, eig)
    damped = hessian.double() + 0.01 * torch.diag(hessian).double().mean() * torch.eye(cols, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):  # the premise: 1% damping is not enough
        torch.linalg.cholesky(damped)
    weight = torch.randn(16, cols, generator=gen(7))
    with pytest.warns(UserWarning, match="damping"):
        result = sparsegpt_prune(weight, hessian, 0.5, UNSTRUCTURED)
    assert result.info["percdamp"] > 0.01
    assert result.info["percdamp"] == pytest.approx(0.1)
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[result.mask] == 0)


def test_sparsegpt_singular_hessian_with_rounding_negative_eigenvalues_escalates():
    cols = 64
    eig = torch.zeros(cols, dtype=torch.float64)
    eig[:8] = torch.linspace(4.0, 8.0, 8, dtype=torch.float64)  # rank 8 of 64
    eig[8:] = -0.02 * eig.mean()  # singular part pushed just below zero, beyond 1% damping
    hessian = spectral(8, eig)
    weight = torch.randn(16, cols, generator=gen(8))
    with pytest.warns(UserWarning, match="damping"):
        result = sparsegpt_prune(weight, hessian, 0.5, parse_pattern("2:4"))
    assert result.info["percdamp"] > 0.01
    assert torch.isfinite(result.weight).all()
    assert_nm(result.mask, result.weight, 2, 4)


@pytest.mark.parametrize("rank", [1, 16])
def test_sparsegpt_singular_psd_hessian_does_not_crash(rank):
    cols = 64
    x = torch.randn(rank, cols, generator=gen(9)) + 0.5  # fewer tokens than features
    hessian = (2.0 * x.t() @ x).float()
    assert torch.all(torch.diag(hessian) > 0)
    weight = torch.randn(16, cols, generator=gen(10))
    result = sparsegpt_prune(weight, hessian, 0.5, UNSTRUCTURED)
    assert result.info.get("percdamp", 0.01) >= 0.01
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[result.mask] == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sparsegpt_non_finite_hessian_raises_numerics_error(bad):
    weight, hessian = make_layer(11, cols=64)
    hessian[3, 7] = bad
    with pytest.raises(NumericsError):
        sparsegpt_prune(weight, hessian, 0.5, UNSTRUCTURED)
    hessian2 = make_layer(11, cols=64)[1]
    hessian2[10, 10] = bad
    with pytest.raises(NumericsError):
        sparsegpt_prune(weight, hessian2, 0.5, parse_pattern("2:4"))


def test_sparsegpt_hopeless_hessian_raises_numerics_error():
    """Negative-definite H: no damping proportional to mean(diag H) can help; a clear error."""
    hessian = -torch.eye(32)
    with pytest.raises(NumericsError):
        sparsegpt_prune(torch.randn(4, 32, generator=gen(12)), hessian, 0.5, UNSTRUCTURED)


# --------------------------------------------------------------------------------------------
# 4. Statistics
# --------------------------------------------------------------------------------------------

def batches(seed: int, features: int, dtype=torch.float32, scale: float = 1.0):
    g = gen(seed)
    shapes = [(3, 16, features), (1, 16, features), (16, features), (4, 16, features)]  # 2-D = one sequence
    return [(torch.randn(*s, generator=g) * scale).to(dtype) for s in shapes]


def running_average_hessian(xs):
    """The reference's update: H *= n/(n+b); n += b; H += (sqrt(2/n) X)(sqrt(2/n) X)^T."""
    h, n = None, 0
    for x in xs:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b = x.shape[0]
        inp = x.reshape(-1, x.shape[-1]).t().float()
        h = torch.zeros(inp.shape[0], inp.shape[0]) if h is None else h
        h *= n / (n + b)
        n += b
        inp = math.sqrt(2 / n) * inp
        h += inp @ inp.t()
    return h, n


def running_average_sq_norm(xs):
    """The reference's update: s *= n/(n+b); n += b; s += ||X_j||^2 / n."""
    s, n = None, 0
    for x in xs:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b = x.shape[0]
        inp = x.reshape(-1, x.shape[-1]).t().float()
        s = torch.zeros(inp.shape[0]) if s is None else s
        s *= n / (n + b)
        n += b
        s += torch.norm(inp, p=2, dim=1) ** 2 / n
    return s, n


def brute_sq_norm(xs):
    total = None
    n = 0
    for x in xs:
        x = x.double()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        n += x.shape[0]
        part = (x ** 2).sum(dim=(0, 1))
        total = part if total is None else total + part
    return total / n, n


def brute_hessian_batches(xs):
    total = None
    n = 0
    for x in xs:
        x = x.double()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        n += x.shape[0]
        part = brute_hessian(x) * (x.shape[0] / 2.0)  # undo the average to get the raw sum
        total = part if total is None else total + part
    return total * (2.0 / n), n


def close_to(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_hessian_matches_brute_force_and_running_average():
    features = 24
    xs = batches(20, features)
    acc = Hessian(features, "cpu")
    for x in xs:
        acc.add(x)
    value = acc.value()
    assert value.dtype == torch.float32 and value.shape == (features, features)
    assert acc.sequences == 9  # 3 + 1 + 1 (2-D batch) + 4
    expected, n = brute_hessian_batches(xs)
    assert n == 9
    close_to(value, expected)
    running, n_ref = running_average_hessian(xs)
    assert n_ref == 9
    close_to(value, running)
    # N counts sequences, not tokens or batches: a wrong N changes the scale well beyond rtol.
    assert not torch.allclose(value.double(), expected * 9 / 4, rtol=1e-3)


@pytest.mark.parametrize("features", [200, 577, 1000])  # 1, 3 (uneven) and 4 tiles
def test_hessian_tiled_lower_triangle_is_exactly_symmetric_and_exact(features):
    """Only tiles on and below the diagonal are computed; the mirrored result is the full Gram."""
    xs = batches(22, features)
    acc = Hessian(features, "cpu")
    for x in xs:
        acc.add(x)
    value = acc.value()
    assert torch.equal(value, value.t())
    expected, _ = brute_hessian_batches(xs)
    close_to(value, expected)


def test_act_sq_norm_matches_brute_force_and_running_average():
    features = 24
    xs = batches(21, features)
    acc = ActSqNorm(features, "cpu")
    for x in xs:
        acc.add(x)
    value = acc.value()
    assert value.dtype == torch.float32 and value.shape == (features,)
    expected, n = brute_sq_norm(xs)
    assert n == 9 and acc.sequences == 9
    close_to(value, expected)
    running, _ = running_average_sq_norm(xs)
    close_to(value, running)


def test_statistics_of_float64_inputs_stay_float64():
    """A float64 model (for numerical studies) keeps float64 statistics, to float64 accuracy."""
    features = 12
    xs = batches(5, features, dtype=torch.float64)
    hess, sq = Hessian(features, "cpu", torch.float64), ActSqNorm(features, "cpu", torch.float64)
    for x in xs:
        hess.add(x)
        sq.add(x)
    assert hess.value().dtype == torch.float64 and sq.value().dtype == torch.float64
    expected_h, _ = brute_hessian_batches(xs)
    expected_s, _ = brute_sq_norm(xs)
    torch.testing.assert_close(hess.value(), expected_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sq.value(), expected_s, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", 0.5)])
def test_sparsegpt_float64_matches_obs_to_float64_precision(pattern, sparsity):
    """In float64 the blocked, transposed implementation equals the column-by-column OBS to ~1e-12:
    the fp32 tolerance above is rounding, not a difference in the algorithm."""
    weight, hessian = make_layer(0)
    pat = parse_pattern(pattern)
    result = sparsegpt_prune(weight.double(), hessian.double(), sparsity, pat, blocksize=64)
    ref_w, ref_mask, _ = obs_reference(weight, hessian, sparsity, pat.n, pat.m, 64)
    assert result.weight.dtype == torch.float64
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight, ref_w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_statistics_accumulate_half_inputs_in_float32(dtype):
    """Values large enough that a float16 sum overflows, and a bfloat16 sum loses ~1e-2."""
    features = 16
    xs = batches(22, features, dtype=dtype, scale=40.0)
    hess, sq = Hessian(features, "cpu"), ActSqNorm(features, "cpu")
    for x in xs:
        hess.add(x)
        sq.add(x)
    h, s = hess.value(), sq.value()
    assert h.dtype == torch.float32 and s.dtype == torch.float32
    assert torch.isfinite(h).all() and torch.isfinite(s).all()
    expected_h, _ = brute_hessian_batches(xs)  # float64 of the very same half values
    expected_s, n = brute_sq_norm(xs)
    assert float(expected_s.max()) * n > 65504  # a float16 running sum would overflow
    close_to(h, expected_h)
    close_to(s, expected_s)
    # inputs are not modified in place
    assert all(x.dtype == dtype for x in xs)


# --------------------------------------------------------------------------------------------
# 5. Wanda
# --------------------------------------------------------------------------------------------

def brute_wanda_mask(weight, act_sq_norm, sparsity=None, n=0, m=0):
    rows, cols = weight.shape
    w = weight.double().tolist()
    s = act_sq_norm.double().tolist()
    mask = [[False] * cols for _ in range(rows)]
    for r in range(rows):
        scores = [abs(w[r][c]) * math.sqrt(s[c]) for c in range(cols)]
        if m:
            for g0 in range(0, cols, m):
                order = sorted(range(g0, g0 + m), key=lambda c: (scores[c], c))
                for c in order[:n]:
                    mask[r][c] = True
        else:
            k = int(cols * sparsity)
            order = sorted(range(cols), key=lambda c: (scores[c], c))  # stable: ties -> lower index
            for c in order[:k]:
                mask[r][c] = True
    return torch.tensor(mask, dtype=torch.bool)


def wanda_inputs(seed, rows=12, cols=96):
    g = gen(seed)
    weight = torch.randn(rows, cols, generator=g)
    act = torch.rand(cols, generator=g) * 10 + 0.01
    return weight, act


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.33, 0.5, 0.7, 0.9])
def test_wanda_unstructured_matches_brute_force(sparsity):
    weight, act = wanda_inputs(30)
    result = wanda_prune(weight, act, sparsity, UNSTRUCTURED)
    rows, cols = weight.shape
    k = int(cols * sparsity)
    assert torch.all(result.mask.sum(1) == k)
    assert torch.all((result.weight == 0).sum(1) == k)
    assert torch.equal(result.mask, brute_wanda_mask(weight, act, sparsity))
    # kept weights are untouched, pruned ones exactly zero
    assert torch.equal(result.weight[~result.mask], weight[~result.mask])
    assert torch.all(result.weight[result.mask] == 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_wanda_nm_matches_brute_force(pattern):
    weight, act = wanda_inputs(31)
    pat = parse_pattern(pattern)
    result = wanda_prune(weight, act, pat.sparsity, pat)
    assert_nm(result.mask, result.weight, pat.n, pat.m)
    assert torch.equal(result.mask, brute_wanda_mask(weight, act, n=pat.n, m=pat.m))


def test_wanda_ties_go_to_lower_index():
    weight = torch.ones(3, 8)
    act = torch.ones(8)
    result = wanda_prune(weight, act, 0.5, UNSTRUCTURED)
    expected = torch.zeros(3, 8, dtype=torch.bool)
    expected[:, :4] = True
    assert torch.equal(result.mask, expected)


def test_wanda_is_per_row_not_per_matrix():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    result = wanda_prune(weight, torch.ones(4), 0.5, UNSTRUCTURED)
    expected = torch.tensor([[True, True, False, False], [True, True, False, False]])
    assert torch.equal(result.mask, expected)


def test_wanda_score_uses_sqrt_of_act_sq_norm():
    weight = torch.tensor([[1.0, 3.0]])
    # sqrt: 1*2 < 3*1 -> prune column 0.   Without sqrt: 1*4 > 3*1 -> would prune column 1.
    r = wanda_prune(weight, torch.tensor([4.0, 1.0]), 0.5, UNSTRUCTURED)
    assert torch.equal(r.mask, torch.tensor([[True, False]]))
    # sqrt: 1*4 > 3*1 -> prune column 1.   Ignoring activations: 1 < 3 -> would prune column 0.
    r = wanda_prune(weight, torch.tensor([16.0, 1.0]), 0.5, UNSTRUCTURED)
    assert torch.equal(r.mask, torch.tensor([[False, True]]))
    # the same rules in N:M form
    weight = torch.tensor([[1.0, 3.0, 5.0, 6.0, 1.0, 3.0, 5.0, 6.0]])
    act = torch.tensor([4.0, 1.0, 100.0, 100.0, 16.0, 1.0, 100.0, 100.0])
    r = wanda_prune(weight, act, 0.25, parse_pattern("1:4"))
    assert torch.equal(r.mask, torch.tensor([[True, False, False, False, False, True, False, False]]))


def test_wanda_via_registry():
    weight, act = wanda_inputs(32)
    method = METHODS["wanda"]
    assert method.statistic is ActSqNorm
    result = method.prune(weight, act, 0.5, UNSTRUCTURED)
    assert torch.equal(result.mask, brute_wanda_mask(weight, act, 0.5))


# --------------------------------------------------------------------------------------------
# 6. Magnitude
# --------------------------------------------------------------------------------------------

def test_magnitude_one_threshold_per_matrix():
    weight = torch.tensor([[1.0, -2.0, 3.0, 4.0], [10.0, 20.0, -30.0, 40.0]])
    result = magnitude_prune(weight, 0.5, UNSTRUCTURED)
    # sorted |W| = 1 2 3 4 10 20 30 40; threshold at rank floor(8*0.5)=4 is 10, inclusive.
    # Per row it would have been [[T,T,F,F],[T,T,F,F]].
    expected = torch.tensor([[True, True, True, True], [True, False, False, False]])
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, weight.masked_fill(expected, 0))


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_magnitude_matches_brute_force_threshold(sparsity):
    weight = torch.randn(16, 40, generator=gen(40)) * torch.linspace(0.1, 3.0, 16).reshape(-1, 1)
    values = sorted(abs(v) for v in weight.flatten().tolist())
    threshold = values[int(len(values) * sparsity)]
    expected = torch.tensor([[abs(v) <= threshold for v in row] for row in weight.tolist()])
    result = magnitude_prune(weight, sparsity, UNSTRUCTURED)
    assert torch.equal(result.mask, expected)
    assert int(result.mask.sum()) == int(weight.numel() * sparsity) + 1
    # rows of very different scale: the per-row counts differ, as a matrix threshold implies
    assert len(set(result.mask.sum(1).tolist())) > 1


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_magnitude_nm(pattern):
    pat = parse_pattern(pattern)
    weight = torch.randn(10, 64, generator=gen(41))
    result = magnitude_prune(weight, pat.sparsity, pat)
    assert_nm(result.mask, result.weight, pat.n, pat.m)
    expected = brute_wanda_mask(weight, torch.ones(64), n=pat.n, m=pat.m)  # |W| * 1
    assert torch.equal(result.mask, expected)


def test_magnitude_zero_sparsity_prunes_nothing():
    weight = torch.randn(8, 16, generator=gen(42))
    weight[0, 0] = 0.0  # even an exact zero is not "pruned"
    result = magnitude_prune(weight, 0.0, UNSTRUCTURED)
    assert not result.mask.any()
    assert torch.equal(result.weight, weight)
    assert torch.equal(METHODS["magnitude"].prune(weight, None, 0.0, UNSTRUCTURED).weight, weight)
    assert METHODS["magnitude"].statistic is None


# --------------------------------------------------------------------------------------------
# 7. Patterns
# --------------------------------------------------------------------------------------------

def test_parse_pattern_accepts():
    assert parse_pattern("unstructured") == Pattern()
    assert not parse_pattern("unstructured").is_nm
    p = parse_pattern("2:4")
    assert (p.n, p.m, p.is_nm, p.sparsity) == (2, 4, True, 0.5)
    p = parse_pattern("4:8")
    assert (p.n, p.m, p.sparsity) == (4, 8, 0.5)
    assert str(parse_pattern("2:4")) == "2:4"
    assert parse_pattern(Pattern(2, 4)) == Pattern(2, 4)


@pytest.mark.parametrize("text", ["abc", "4:2", "0:4", "2:0", "2-4", "4:4", "", "2:4:8", "-2:4"])
def test_parse_pattern_rejects(text):
    with pytest.raises(PatternError):
        parse_pattern(text)


def test_pattern_error_is_value_error():
    assert issubclass(PatternError, ValueError)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_check_sparsity_rejects(bad):
    with pytest.raises(PatternError):
        check_sparsity(bad)


@pytest.mark.parametrize("good", [0.0, 0.5, 0.99])
def test_check_sparsity_accepts(good):
    assert check_sparsity(good) == good


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_width_not_divisible_names_width(method):
    weight = torch.randn(16, 250, generator=gen(50))
    pat = parse_pattern("4:8")
    with pytest.raises(PatternError, match="250"):
        if method == "magnitude":
            magnitude_prune(weight, 0.5, pat)
        elif method == "wanda":
            wanda_prune(weight, torch.ones(250), 0.5, pat)
        else:
            sparsegpt_prune(weight, torch.eye(250), 0.5, pat)


# --------------------------------------------------------------------------------------------
# 8. Dtypes and inputs left alone
# --------------------------------------------------------------------------------------------

HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_half_weights(dtype, pattern):
    weight, hessian = make_layer(60, rows=16, cols=128)
    weight = weight.to(dtype)
    pat = parse_pattern(pattern)
    result = sparsegpt_prune(weight, hessian, 0.5, pat, blocksize=64)
    assert result.weight.dtype == dtype
    assert torch.all(result.weight[result.mask] == 0)
    assert torch.isfinite(result.weight).all()
    # The maths runs in float32: identical to pruning the upcast weight and casting back.
    full = sparsegpt_prune(weight.float(), hessian, 0.5, pat, blocksize=64)
    assert torch.equal(result.mask, full.mask)
    assert torch.equal(result.weight, full.weight.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("pattern", ["unstructured", "4:8"])
def test_wanda_and_magnitude_half_weights(dtype, pattern):
    pat = parse_pattern(pattern)
    weight, act = wanda_inputs(61, cols=64)
    weight = weight.to(dtype)
    for result in (wanda_prune(weight, act, 0.5, pat), magnitude_prune(weight, 0.5, pat)):
        assert result.weight.dtype == dtype
        assert torch.all(result.weight[result.mask] == 0)
        assert torch.equal(result.weight[~result.mask], weight[~result.mask])
    # half weights give the same mask as their exact float32 upcast
    assert torch.equal(wanda_prune(weight, act, 0.5, pat).mask, wanda_prune(weight.float(), act, 0.5, pat).mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_methods_do_not_modify_inputs(dtype):
    weight, hessian = make_layer(62, rows=16, cols=128, dead=(7,))  # dead input: H gets patched inside
    weight = weight.to(dtype)
    act = torch.diag(hessian).clone()
    w0, h0, a0 = weight.clone(), hessian.clone(), act.clone()
    for pattern in ("unstructured", "2:4"):
        pat = parse_pattern(pattern)
        sparsegpt_prune(weight, hessian, 0.5, pat, blocksize=64)
        wanda_prune(weight, act, 0.5, pat)
        magnitude_prune(weight, 0.5, pat)
    assert torch.equal(weight, w0)
    assert torch.equal(hessian, h0)
    assert torch.equal(act, a0)


# --------------------------------------------------------------------------------------------
# 9. Determinism
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_determinism(pattern):
    pat = parse_pattern(pattern)
    weight, hessian = make_layer(70, rows=32, cols=128)
    act = torch.rand(128, generator=gen(71))
    runs = []
    for _ in range(2):
        runs.append((
            sparsegpt_prune(weight, hessian, 0.5, pat, blocksize=64),
            wanda_prune(weight, act, 0.5, pat),
            magnitude_prune(weight, 0.5, pat),
        ))
    for a, b in zip(*runs):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.mask, b.mask)
        assert a.info == b.info

    xs = batches(72, 24)
    values = []
    for _ in range(2):
        h, s = Hessian(24, "cpu"), ActSqNorm(24, "cpu")
        for x in xs:
            h.add(x)
            s.add(x)
        values.append((h.value(), s.value()))
    assert torch.equal(values[0][0], values[1][0]) and torch.equal(values[0][1], values[1][1])
