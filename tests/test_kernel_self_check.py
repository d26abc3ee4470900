"""The fused SparseGPT block's self-check compares by tolerance (mask overlap, reconstruction error), not by
exact equality, and says why when it falls back. Run on the CPU with PyTorch stand-ins for the kernel."""
import warnings

import pytest
import torch

from oneshot.methods import sparsegpt
from oneshot.methods.sparsegpt import (SELF_CHECK_OVERLAP, _obs_block_torch, block_agreement, fused_block_status,
                                       self_check)


def test_the_loop_agrees_with_itself():
    outcome = self_check(_obs_block_torch, "cpu")
    assert outcome["ok"], outcome
    for pattern in ("unstructured", "2:4"):
        assert outcome[pattern]["mask_overlap"] == 1.0
        assert outcome[pattern]["error"] == outcome[pattern]["error_torch"] > 0


def test_a_few_flipped_near_ties_pass():
    def nudged(W1, U1, d, sparsity, n, m, **extra):  # float noise far below the weights' scale
        noise = torch.randn(W1.shape, generator=torch.Generator().manual_seed(1)) * 1e-4
        return _obs_block_torch(W1 + noise, U1, d, sparsity, n, m, **extra)

    outcome = self_check(nudged, "cpu")
    assert outcome["ok"], outcome
    assert min(outcome[p]["mask_overlap"] for p in ("unstructured", "2:4")) >= SELF_CHECK_OVERLAP


def test_a_wrong_block_fails_with_the_reason():
    def largest(W1, U1, d, sparsity, n, m, **extra):  # prunes the largest weights instead of the smallest
        Q1, E1, mask = _obs_block_torch(-1 / (W1 + 1e-3), U1, d, sparsity, n, m, **extra)
        q = W1.masked_fill(mask, 0)
        return q, (W1 - q) / d.reshape(-1, 1), mask

    outcome = self_check(largest, "cpu")
    assert not outcome["ok"]
    assert "mask overlap" in outcome["reason"] and "unstructured" in outcome["reason"]


def test_no_reconstruction_costs_error():
    def no_update(W1, U1, d, sparsity, n, m, **extra):  # the same mask, without the OBS update
        _q, _e, mask = _obs_block_torch(W1.clone(), U1, d, sparsity, n, m, **extra)
        q = W1.masked_fill(mask, 0)
        return q, torch.zeros_like(W1), mask

    W = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    X = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(X.t() @ X / 256 + 0.01 * torch.eye(64))),
                              upper=True)
    got, mask_got = sparsegpt._sweep(no_update, W, U, 0.5, 0, 0, 32)
    want, mask_want = sparsegpt._sweep(_obs_block_torch, W, U, 0.5, 0, 0, 32)
    numbers = block_agreement(got, want, mask_got, mask_want, W, X)
    assert numbers["error"] > numbers["error_torch"]
    assert not self_check(no_update, "cpu")["ok"]


def test_the_fallback_records_its_reason(monkeypatch):
    """Without CUDA (or Triton) the fused block cannot pass; the warning and the status say why."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the fused block may well pass here")
    monkeypatch.setattr(sparsegpt, "_FUSED", None)
    monkeypatch.setattr(sparsegpt, "_FUSED_STATUS", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sparsegpt._fused_block() is _obs_block_torch
    status = fused_block_status()
    assert status["kernel"] == "torch" and not status["ok"] and status["reason"]
    assert any(status["reason"] in str(w.message) for w in caught)
