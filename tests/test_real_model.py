"""SmolLM2-135M, the embedded real model: pruning must behave as the papers say on real weights and text."""
import copy

import pytest
import torch

from calibration import calibration_windows, evaluation_windows
from oneshot.engine import prune_model
from oneshot.evaluate.perplexity import perplexity, window_losses
from oneshot.methods import get_method, parse_pattern

pytestmark = pytest.mark.system  # the embedded real model

SEQLEN = 256


@pytest.fixture(scope="module")
def windows(smollm2):
    calib = calibration_windows("wiki-offline", smollm2.tokenizer, 8, SEQLEN, seed=0)
    evaluation = evaluation_windows("wiki-offline", smollm2.tokenizer, SEQLEN, max_windows=8)
    return calib, evaluation


@pytest.fixture(scope="module")
def dense_ppl(smollm2, windows):
    return perplexity(smollm2.model, windows[1], progress=False)


def _pruned_ppl(smollm2, windows, method, pattern="unstructured"):
    model = copy.deepcopy(smollm2.model)
    report = prune_model(model, get_method(method), 0.5, parse_pattern(pattern), windows[0], progress=False)
    return perplexity(model, windows[1], progress=False), report


def test_dense_perplexity_is_sane(dense_ppl):
    # A 135M instruct model on encyclopaedic text: well below a uniform guess (49152) and above 1.
    assert 5 < dense_ppl < 40


def test_sparsegpt_beats_magnitude_by_a_wide_margin(smollm2, windows, dense_ppl):
    sparsegpt_ppl, report = _pruned_ppl(smollm2, windows, "sparsegpt")
    magnitude_ppl, magnitude_report = _pruned_ppl(smollm2, windows, "magnitude")
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert magnitude_report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert dense_ppl < sparsegpt_ppl < 0.5 * magnitude_ppl


def test_wanda_2_4_is_exact_and_better_than_magnitude_2_4(smollm2, windows):
    wanda_ppl, report = _pruned_ppl(smollm2, windows, "wanda", "2:4")
    magnitude_ppl, _ = _pruned_ppl(smollm2, windows, "magnitude", "2:4")
    assert report.sparsity == pytest.approx(0.5, abs=1e-4)  # the Q4 weights hold a few zeros already
    assert wanda_ppl < magnitude_ppl


def test_perplexity_protocol_is_mean_of_window_losses(smollm2, windows):
    losses = window_losses(smollm2.model, windows[1][:3], progress=False)
    batched = window_losses(smollm2.model, windows[1][:3], batch_size=3, progress=False)
    torch.testing.assert_close(losses, batched, rtol=1e-4, atol=1e-4)
    assert perplexity(smollm2.model, windows[1][:3], progress=False) == pytest.approx(float(losses.mean().exp()))


def test_pruned_gguf_model_saves_and_reloads_bitwise(smollm2, tmp_path):
    """The embedded model comes from a GGUF file; its pruned copy must save as a plain checkpoint."""
    from transformers import AutoModelForCausalLM

    from oneshot.export import save_model

    model = copy.deepcopy(smollm2.model)
    prune_model(model, get_method("magnitude"), 0.5, parse_pattern("2:4"), None, progress=False)
    record = {"model": "smollm2-135m", "model_source": smollm2.source, "method": "magnitude", "pattern": "2:4",
              "sparsity_target": 0.5, "sparsity_measured": 0.5, "calibration": None, "seed": 0, "ppl": {},
              "versions": {}}
    save_model(model, smollm2.tokenizer, record, str(tmp_path / "m"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
