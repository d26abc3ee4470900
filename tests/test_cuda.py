"""On a CUDA machine, the same run on the GPU as on the CPU: each method, pattern and quantised path gives the
same masks (and nearly the same weights) in float64, the GPU holds one block at a time, and the Triton
kernel agrees with the torch one. Skipped where no GPU is present (CI); run it on a GPU with
`python -m pytest -q tests/test_cuda.py`."""
import pytest
import torch

from oneshot import RunSpec, run
from oneshot.engine import check_memory, prune_model
from oneshot.methods import get_method, parse_pattern
from oneshot.models import build_random_model, decoder_blocks, prunable_layers
from oneshot.spec import Calibration, Evaluation

from helpers import random_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _pruned(method: str, pattern: str, device: str, options=None, dtype=torch.float64):
    model = build_random_model("tiny-llama", dtype, seed=0)
    prune_model(model, get_method(method), 0.5, parse_pattern(pattern), random_ids(8, 64), device=device,
                progress=False, options=options or {})
    return {name: layer.weight.detach().cpu().clone() for name, layer in prunable_layers(model).items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_the_gpu_prunes_like_the_cpu(method, pattern):
    on_cpu, on_gpu = _pruned(method, pattern, "cpu"), _pruned(method, pattern, "cuda")
    for name, weight in on_cpu.items():
        assert torch.equal(weight == 0, on_gpu[name] == 0), name
        torch.testing.assert_close(on_gpu[name], weight, rtol=1e-6, atol=1e-8)


def test_sparsegpt_triton_kernel_matches_torch_on_the_gpu():
    pytest.importorskip("triton")
    # the fused kernel serves float32 only
    torch_kernel = _pruned("sparsegpt", "unstructured", "cuda", {"kernel": "torch"}, torch.float32)
    triton_kernel = _pruned("sparsegpt", "unstructured", "cuda", {"kernel": "auto"}, torch.float32)
    for name, weight in torch_kernel.items():
        agree = (weight == 0).eq(triton_kernel[name] == 0).float().mean().item()
        assert agree > 0.999, (name, agree)


@pytest.mark.parametrize("extra", [
    dict(method="sparsegpt", quantize="int4", group_size=16, symmetric=True),
    dict(method="wanda", pattern="width", sparsity=0.25),
    dict(method="taylor", pattern="channels", sparsity=0.25),
])
def test_whole_runs_agree_between_cpu_and_gpu(extra, tmp_path):
    # Text of our own (file:), not the default wiki-offline: GPU images lack that optional package.
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{(i * 7919) % 613} of line {i}." for i in range(3000)))
    spec = RunSpec(model="random:tiny-llama", calibration=Calibration(source=f"file:{text}", nsamples=4, seqlen=64),
                   eval=Evaluation(ppl=(f"file:{text}",), samples=2), progress=False, dtype="float64", **extra)
    on_cpu, on_gpu = run(spec.replace(device="cpu")), run(spec.replace(device="cuda"))
    assert on_gpu.device != on_cpu.device  # the GPU's name, not "cpu"
    assert on_gpu.sparsity_measured == pytest.approx(on_cpu.sparsity_measured, abs=1e-9)
    for source, value in on_cpu.ppl.items():
        assert on_gpu.ppl[source] == pytest.approx(value, rel=1e-6)


def test_sequential_asymmetric_and_refit_agree_between_cpu_and_gpu(tmp_path):
    # The dense stream, the per-sequence slices of the block's call and Adam's steps, all on the device. Adam
    # divides by the root of its second moment, so rounding in a tiny gradient can move a weight by up to one
    # step: the perplexities agree to 1e-4, not to rounding.
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{(i * 7919) % 613} of line {i}." for i in range(3000)))
    spec = RunSpec(model="random:tiny-llama", method="sparsegpt", sparsity=0.6, sequential=True, asymmetric=True,
                   refit=1, calibration=Calibration(source=f"file:{text}", nsamples=4, seqlen=64),
                   eval=Evaluation(ppl=(f"file:{text}",), samples=2), progress=False, dtype="float64")
    on_cpu, on_gpu = run(spec.replace(device="cpu")), run(spec.replace(device="cuda"))
    assert on_gpu.sparsity_measured == pytest.approx(on_cpu.sparsity_measured, abs=1e-9)
    for source, value in on_cpu.ppl.items():
        assert on_gpu.ppl[source] == pytest.approx(value, rel=1e-4)


def test_the_gpu_holds_one_block_at_a_time():
    model = build_random_model("opt-125m", torch.float32, seed=0)  # 12 blocks of 7M weights beside 39M embeddings
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in decoder_blocks(model)[0].parameters())
    outside = model_bytes - len(decoder_blocks(model)) * block_bytes  # embeddings, head: on the GPU during the capture
    estimate = check_memory(model, 4, 128, "cuda")
    bound = (estimate["activations_gib"] + estimate["block_gib"]) * 2 ** 30  # one block visit (engine/memory.py)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    after_each = []
    prune_model(model, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), random_ids(4, 128),
                device="cuda", progress=False,
                on_block_done=lambda index: after_each.append(torch.cuda.memory_allocated()))
    assert all(p.device.type == "cpu" for p in model.parameters())  # every block went back
    # nothing accumulates from block to block: a block left on the GPU would add block_bytes each time
    assert max(after_each) - min(after_each) < block_bytes / 2, (after_each, block_bytes)
    # The peak is one block visit under check_memory's bound (SparseGPT's fp32 Hessians and the transient copies of
    # the widest one's factorisation, 3072 x 3072 here, outweigh the block itself), or the capture's embeddings.
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= bound + outside, (peak, bound, outside, estimate)
    assert bound < model_bytes  # and the bound itself stays below the whole model (12 blocks)
