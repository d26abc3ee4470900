"""Tests of OWL's outlier ratio and layer-wise sparsities against plain re-derivations.

Expected values are computed here with plain Python loops and the authors' formulas written out line
by line, never by calling the code under test a second way.
"""
from __future__ import annotations

import pytest
import torch

from oneshot.allocation import OWL_OPTIONS, outlier_ratio, owl_sparsities
from oneshot.methods.options import OptionError, check_options, defaults


def block_scores(seed: int, shapes=((24, 16), (8, 16), (40, 24))) -> list[torch.Tensor]:
    """Wanda-like scores |W| * sqrt(s) with heavy-tailed weights, so that a few exceed M x mean."""
    g = torch.Generator().manual_seed(seed)
    scores = []
    for rows, cols in shapes:
        weight = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) ** 3
        act_sq_norm = torch.rand(cols, generator=g) ** 4 * 50
        scores.append(weight.abs() * act_sq_norm.sqrt())
    return scores


def brute_ratio(scores: list[torch.Tensor], m: float) -> float:
    values = [float(v) for s in scores for v in s.flatten().tolist()]
    mean = sum(values) / len(values)
    count = 0
    for v in values:
        if v > m * mean:
            count += 1
    return 100.0 * count / len(values)


def authors_sparsities(ratios, target, lam):
    """luuyin/OWL prune_wanda_outlier, steps written out (without its <= 0 -> 0.01 clip)."""
    low, high = min(ratios), max(ratios)
    values = [(r - low) * (1 / (high - low) * lam * 2) for r in ratios]
    mean = sum(values) / len(values)
    values = [v - mean + (1 - target) for v in values]
    return [1 - v for v in values]


# ---------------------------------------------------------------------------------------------
# outlier_ratio
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m", [2.0, 3.0, 5.0, 7.5])
def test_outlier_ratio_matches_brute_force(seed, m):
    scores = block_scores(seed)
    got = outlier_ratio(scores, m)
    assert got == pytest.approx(brute_ratio(scores, m), abs=1e-12)
    assert 0 < got < 100  # the fixture has outliers at these M, and is in percent


def test_outlier_ratio_is_percent_of_scores_above_m_times_mean():
    # mean 2.8, threshold 5.6: only the 10 is above it -> 1 of 5 = 20 percent
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])], 2.0) == pytest.approx(20.0)


def test_outlier_ratio_uses_one_mean_over_the_whole_block():
    # Each layer is constant, so per layer nothing is above 2x its own mean; over the block it is not.
    small = torch.ones(30)
    large = torch.full((10,), 9.0)
    # block mean = (30 + 90) / 40 = 3; 2 x 3 = 6 < 9: the 10 large scores are outliers -> 25 percent.
    assert outlier_ratio([small, large], 2.0) == pytest.approx(25.0)
    # per-layer means would find none
    assert outlier_ratio([small], 2.0) == 0.0 and outlier_ratio([large], 2.0) == 0.0


def test_outlier_ratio_threshold_is_strict():
    # mean 2, m = 2: a score equal to 4 is not an outlier
    assert outlier_ratio([torch.tensor([0.0, 0.0, 4.0, 4.0])], 2.0) == 0.0


def test_outlier_ratio_weighs_layers_by_size_not_equally():
    scores = block_scores(3, shapes=((64, 64), (2, 4)))
    joined = brute_ratio(scores, 3.0)
    per_layer_average = (brute_ratio(scores[:1], 3.0) + brute_ratio(scores[1:], 3.0)) / 2
    assert outlier_ratio(scores, 3.0) == pytest.approx(joined)
    assert joined != pytest.approx(per_layer_average)


def test_outlier_ratio_half_scores():
    scores = [s.half() for s in block_scores(4)]
    assert outlier_ratio(scores, 5.0) == pytest.approx(brute_ratio(scores, 5.0), abs=1e-12)


def test_outlier_ratio_rejects_empty():
    with pytest.raises(ValueError):
        outlier_ratio([], 5.0)


# ---------------------------------------------------------------------------------------------
# owl_sparsities
# ---------------------------------------------------------------------------------------------

RATIOS = [3.1, 5.7, 4.2, 9.8, 7.7, 2.4, 6.0, 8.3]


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("lam", [0.02, 0.08, 0.15])
def test_owl_sparsities_match_the_authors_in_the_usual_range(target, lam):
    got = owl_sparsities(RATIOS, target, lam)
    want = authors_sparsities(RATIOS, target, lam)
    assert got == pytest.approx(want, abs=1e-12)
    assert sum(got) / len(got) == pytest.approx(target, abs=1e-9)
    assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)


def test_owl_ratio_scale_does_not_matter():
    # the min-max rescaling makes percent vs fraction irrelevant
    assert owl_sparsities([r / 100 for r in RATIOS], 0.7, 0.08) == pytest.approx(owl_sparsities(RATIOS, 0.7, 0.08))


def test_owl_weighted_mean_is_the_target():
    weights = [1e6, 3e6, 2e6, 5e5, 7e6, 1e6, 4e6, 2.5e6]
    for target in (0.3, 0.5, 0.7, 0.8):
        got = owl_sparsities(RATIOS, target, 0.08, weights)
        mean = sum(w * s for w, s in zip(weights, got)) / sum(weights)
        assert mean == pytest.approx(target, abs=1e-9)
        # the spread is the authors' (a pure shift) ...
        assert max(got) - min(got) == pytest.approx(0.16, abs=1e-12)
        # ... so the differences between blocks are the authors' too
        plain = owl_sparsities(RATIOS, target, 0.08)
        diffs = [a - b for a, b in zip(got, plain)]
        assert max(diffs) - min(diffs) == pytest.approx(0.0, abs=1e-12)


def test_owl_equal_weights_reduce_to_the_authors():
    assert owl_sparsities(RATIOS, 0.7, 0.08, [5.0] * len(RATIOS)) == pytest.approx(owl_sparsities(RATIOS, 0.7, 0.08))


def test_owl_lambda_zero_or_equal_ratios_give_uniform():
    assert owl_sparsities(RATIOS, 0.6, 0.0) == [0.6] * len(RATIOS)
    assert owl_sparsities([4.0] * 5, 0.6, 0.08) == [0.6] * 5  # the authors divide by zero here
    assert owl_sparsities([4.0], 0.6, 0.08) == [0.6]


def test_owl_more_outliers_means_lower_sparsity():
    got = owl_sparsities(RATIOS, 0.7, 0.08)
    for i in range(len(RATIOS)):
        for j in range(len(RATIOS)):
            if RATIOS[i] > RATIOS[j]:
                assert got[i] < got[j]


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.1, 0.9, 0.95, 0.985, 0.995])
@pytest.mark.parametrize("lam", [0.08, 0.3, 0.5])
def test_owl_extremes_stay_in_range_with_the_exact_mean(target, lam):
    weights = [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 2.0, 1.0]
    for w in (None, weights):
        got = owl_sparsities(RATIOS, target, lam, w)
        ww = w or [1.0] * len(RATIOS)
        assert all(0.0 <= s < 1.0 for s in got)
        assert all(s <= max(0.99, target) for s in got)
        assert sum(a * s for a, s in zip(ww, got)) / sum(ww) == pytest.approx(target, abs=1e-9)
        # the order of blocks survives the narrowing (ties only when narrowed to nothing)
        for i in range(len(RATIOS)):
            for j in range(len(RATIOS)):
                if RATIOS[i] > RATIOS[j]:
                    assert got[i] <= got[j]


def test_owl_target_zero_is_dense_everywhere():
    assert owl_sparsities(RATIOS, 0.0, 0.08) == [0.0] * len(RATIOS)


def test_owl_rejects_bad_input():
    with pytest.raises(ValueError):
        owl_sparsities([], 0.5, 0.08)
    with pytest.raises(ValueError):
        owl_sparsities(RATIOS, 1.0, 0.08)
    with pytest.raises(ValueError):
        owl_sparsities(RATIOS, 0.5, -0.1)
    with pytest.raises(ValueError):
        owl_sparsities(RATIOS, 0.5, 0.08, [1.0, 2.0])
    with pytest.raises(ValueError):
        owl_sparsities(RATIOS, 0.5, 0.08, [0.0] * len(RATIOS))
    with pytest.raises(ValueError):
        owl_sparsities([1.0, float("nan")], 0.5, 0.08)


def test_owl_options_declared_with_the_authors_defaults():
    assert defaults(OWL_OPTIONS) == {"owl_m": 5.0, "owl_lambda": 0.08}
    assert check_options("owl", OWL_OPTIONS, {"owl_m": "7", "owl_lambda": "0.1"}) == {"owl_m": 7.0, "owl_lambda": 0.1}
    for bad in ({"owl_m": 0}, {"owl_lambda": -0.01}, {"owl_lambda": 0.6}, {"owl_alpha": 1}):
        with pytest.raises(OptionError):
            check_options("owl", OWL_OPTIONS, bad)


# ---------------------------------------------------------------------------------------------
# end to end: run(RunSpec(allocation="owl")) on a tiny model against a brute force from its activations
# ---------------------------------------------------------------------------------------------

def test_owl_run_on_a_tiny_model_equals_brute_force(tmp_path):
    from oneshot import RunSpec, run
    from oneshot.models import load_model
    from oneshot.spec import Calibration, Evaluation

    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "windows.pt")
    loaded = load_model("random:tiny-llama", dtype=torch.float32, seed=0)
    dense = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    # Brute force: each linear layer's input squared norms over the windows, on the dense model.
    linears = {name: m for name, m in loaded.model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in name}
    sq = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    def gather(name):
        def hook(_module, inputs, _output):
            sq[name].add_(inputs[0].double().reshape(-1, inputs[0].shape[-1]).pow(2).sum(0))
        return hook

    hooks = [m.register_forward_hook(gather(name)) for name, m in linears.items()]
    with torch.no_grad():
        for row in ids:
            loaded.model(row[None])
    for hook in hooks:
        hook.remove()
    blocks = sorted({int(name.split(".layers.")[1].split(".")[0]) for name in linears})
    ratios, weights = [], []
    for b in blocks:
        names = [n for n in linears if f".layers.{b}." in n]
        scores = [linears[n].weight.detach().double().abs() * sq[n].sqrt() for n in names]
        ratios.append(brute_ratio(scores, 5.0))
        weights.append(sum(linears[n].weight.numel() for n in names))
    values = [(r - min(ratios)) / (max(ratios) - min(ratios)) * 0.16 for r in ratios]
    center = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    expected = [0.6 - (v - center) for v in values]

    loaded.model.load_state_dict(dense)
    record = run(RunSpec(model="random:tiny-llama", method="wanda", sparsity=0.6, allocation="owl",
                         calibration=Calibration(f"tokens:{tmp_path / 'windows.pt'}"), eval=Evaluation(ppl=()),
                         device="cpu", dtype="float32", progress=False), loaded=loaded)
    per_layer = record.sparsity_target_per_layer
    got = [per_layer[next(k for k in per_layer if k.startswith(f"{b}."))] for b in blocks]
    assert got == pytest.approx(expected, abs=1e-9)
    assert len(set(round(v, 9) for v in got)) > 1  # the blocks really differ
    for b, target in zip(blocks, got):  # every layer of a block gets the block's target
        assert all(v == pytest.approx(target) for k, v in per_layer.items() if k.startswith(f"{b}."))
    total = sum(weights)
    assert sum(t * w for t, w in zip(got, weights)) / total == pytest.approx(0.6, abs=1e-12)
    assert record.timings["allocate_s"] > 0 and record.timings["prune_s"] >= record.timings["allocate_s"]
