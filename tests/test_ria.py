"""Tests of RIA (Relative Importance and Activations): the score by hand, the masks, the channel
permutation, the options, and runs through oneshot.run on the tiny random Llama. Quick: tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY_SPEC

from oneshot import run
from oneshot.methods import METHODS, ActSqNorm, parse_pattern
from oneshot.methods.masks import nm_mask
from oneshot.methods.options import OptionError
from oneshot.methods.ria import (
    RIA_OPTIONS,
    assignment_refine,
    channel_order,
    kept_score,
    reallocate,
    ria_mask,
    ria_prune,
    ria_scores,
)

UNSTRUCTURED = parse_pattern("unstructured")


def layer(seed: int, rows: int = 16, cols: int = 32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    act_sq_norm = torch.rand(cols, generator=g) * 10 + 0.1
    return weight, act_sq_norm


def test_score_by_hand():
    weight = torch.tensor([[1.0, -2.0, 0.0, 4.0],
                           [2.0, 1.0, -1.0, 0.0],
                           [0.0, 3.0, 1.0, 2.0]])
    s = torch.tensor([4.0, 1.0, 16.0, 9.0])  # ||X_j||_2 = 2, 1, 4, 3; to the power 0.5: sqrt 2, 1, 2, sqrt 3
    # |W| row sums 7, 4, 6; column sums 3, 6, 2, 6
    r2, r3 = math.sqrt(2), math.sqrt(3)
    expected = torch.tensor([
        [(1 / 3 + 1 / 7) * r2, (2 / 6 + 2 / 7) * 1, 0.0, (4 / 6 + 4 / 7) * r3],
        [(2 / 3 + 2 / 4) * r2, (1 / 6 + 1 / 4) * 1, (1 / 2 + 1 / 4) * 2, 0.0],
        [0.0, (3 / 6 + 3 / 6) * 1, (1 / 2 + 1 / 6) * 2, (2 / 6 + 2 / 6) * r3],
    ])
    torch.testing.assert_close(ria_scores(weight, s), expected)
    # a = 1: the norm itself; a = 0: relative importance alone
    torch.testing.assert_close(ria_scores(weight, s, a=1.0)[0, 3], torch.tensor((4 / 6 + 4 / 7) * 3))
    torch.testing.assert_close(ria_scores(weight, s, a=0.0)[1, 0], torch.tensor(2 / 3 + 2 / 4))
    # the default unstructured rule: one threshold per matrix, rank floor(12 * 0.5) = 6, inclusive
    mask, _ = ria_mask(weight, s, 0.5, UNSTRUCTURED)
    scores = expected.flatten()
    threshold = scores.sort().values[6]
    assert torch.equal(mask.flatten(), scores <= threshold)


def test_zero_rows_and_columns_score_zero():
    weight, s = layer(0, 6, 8)
    weight[:, 3] = 0
    weight[2] = 0
    scores = ria_scores(weight, s)
    assert torch.isfinite(scores).all()
    assert (scores[:, 3] == 0).all() and (scores[2] == 0).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_counts(sparsity):
    weight, s = layer(1)
    scores = ria_scores(weight, s)
    mask, _ = ria_mask(weight, s, sparsity, UNSTRUCTURED)  # per matrix: floor(numel * p) + 1 (no ties here)
    assert int(mask.sum()) == int(weight.numel() * sparsity) + 1
    assert scores[mask].max() < scores[~mask].min()
    rows, _ = ria_mask(weight, s, sparsity, UNSTRUCTURED, per_outneuron=True)  # per output row: floor(cols * p)
    assert (rows.sum(dim=1) == int(weight.shape[1] * sparsity)).all()
    for i in range(weight.shape[0]):
        assert scores[i][rows[i]].max() <= scores[i][~rows[i]].min()


@pytest.mark.parametrize("text", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("options", [{}, {"reallocation": True}, {"reallocation": True, "lsa": True},
                                     {"reallocation": True, "importance_score": "retained_degree_per_outneuron"}])
def test_nm_valid_in_every_group(text, options):
    pattern = parse_pattern(text)
    weight, s = layer(2, 24, 64)
    mask, notes = ria_mask(weight, s, pattern.sparsity, pattern, **options)
    if options:  # the pattern holds in the permuted column order, which the notes announce
        scores = ria_scores(weight, s)
        index = reallocate(channel_order(scores, pattern.sparsity, options.get("importance_score", "sum")), pattern.m)
        if options.get("lsa"):
            index = assignment_refine(scores, index, pattern)
        mask = mask[:, index]
        assert notes["channel_permutation"] == ("reallocation+lsa" if options.get("lsa") else "reallocation")
    groups = mask.reshape(24, 64 // pattern.m, pattern.m).sum(dim=-1)
    assert (groups == pattern.n).all()


def test_permutation_keeps_layout_and_unpruned_weights():
    pattern = parse_pattern("2:4")
    weight, s = layer(3, 32, 64)
    scores = ria_scores(weight, s)
    result = ria_prune(weight, s, 0.5, pattern, reallocation=True, lsa=True)
    index = assignment_refine(scores, reallocate(channel_order(scores, 0.5), 4), pattern)
    assert sorted(index.tolist()) == list(range(64))
    # the mask is chosen on the permuted columns and put back in the original column order
    assert torch.equal(result.mask[:, index], nm_mask(scores[:, index], pattern))
    assert not torch.equal(result.mask, nm_mask(scores, pattern))
    # unpruned weights stay where they were, untouched; pruned ones are exactly 0
    assert torch.equal(result.weight[~result.mask], weight[~result.mask])
    assert (result.weight[result.mask] == 0).all()
    assert int(result.mask.sum()) == weight.numel() // 2
    # so the layer computes the same as the permuted layer on permuted inputs
    x = torch.randn(5, 64)
    torch.testing.assert_close(x @ result.weight.t(), x[:, index] @ result.weight[:, index].t())


def test_assignment_never_lowers_the_kept_score():
    pattern = parse_pattern("2:4")
    for seed in range(3):
        weight, s = layer(10 + seed, 32, 64)
        scores = ria_scores(weight, s)
        heuristic, _ = ria_mask(weight, s, 0.5, pattern, reallocation=True)
        refined, notes = ria_mask(weight, s, 0.5, pattern, reallocation=True, lsa=True)
        assert kept_score(scores, refined) >= kept_score(scores, heuristic) * (1 - 1e-6)
        direct = nm_mask(scores, pattern)
        assert notes["kept_score_gain"] == pytest.approx(kept_score(scores, refined) / kept_score(scores, direct) - 1,
                                                        abs=1e-5)


def test_assignment_blocks():
    pattern = parse_pattern("2:4")
    weight, s = layer(4, 16, 64)  # 16 groups
    mask, _ = ria_mask(weight, s, 0.5, pattern, reallocation=True, lsa=True, lsa_blocks=4)
    assert int(mask.sum()) == weight.numel() // 2
    with pytest.raises(Exception, match="lsa_blocks=3"):
        ria_mask(weight, s, 0.5, pattern, reallocation=True, lsa=True, lsa_blocks=3)


@pytest.mark.parametrize("given", [{"a": -0.1}, {"a": 5}, {"a": "x"}, {"importance_score": "mean"},
                                   {"lsa_blocks": 0}, {"reallocation": "maybe"}, {"alpha": 0.5}])
def test_options_refused_in_one_line(given):
    with pytest.raises(OptionError) as caught:
        METHODS["ria"].check_options(given)
    assert "\n" not in str(caught.value)


def test_lsa_needs_reallocation():
    weight, s = layer(5)
    with pytest.raises(OptionError, match="reallocation=true") as caught:
        ria_prune(weight, s, 0.5, parse_pattern("2:4"), lsa=True)
    assert "\n" not in str(caught.value)


def test_registered_with_defaults():
    method = METHODS["ria"]
    assert method.statistic is ActSqNorm and method.prune is ria_prune and method.options == RIA_OPTIONS
    assert {o.name: o.default for o in RIA_OPTIONS} == {
        "a": 0.5, "per_outneuron": False, "reallocation": False, "importance_score": "sum", "lsa": False,
        "lsa_blocks": 1}


@pytest.mark.parametrize("pattern,options", [("unstructured", {}), ("2:4", {}),
                                             ("2:4", {"reallocation": "true", "lsa": "true"})])
def test_run_tiny_llama(pattern, options):
    from dataclasses import replace

    spec = replace(TINY_SPEC, method="ria", pattern=pattern, sparsity=None if ":" in pattern else 0.5,
                   options=options)
    result = run(spec)
    assert result.sparsity_measured == pytest.approx(0.5, abs=1e-3)
    if options:  # each layer notes its permutation and what it gained over direct N:M
        assert result.method_notes and all(note["channel_permutation"] == "reallocation+lsa"
                                           for note in result.method_notes.values())
