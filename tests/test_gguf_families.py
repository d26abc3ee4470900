"""GGUF export beyond Llama (issue 26): every family llama.cpp reads that oneshot writes, read back by
transformers' GGUF loader to exactly the perplexity the run measured (F32, Q8_0 and Q4_0), and what the
format cannot hold refused before any work with the reason."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # optional (the GPU image lacks it): skip here, never break the suite's collection

from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.errors import UsageError

RUN = RunSpec(method="wanda", sparsity=0.5, calibration=Calibration(nsamples=2, seqlen=32),
              eval=Evaluation(samples=4), format="gguf", progress=False)
GRIDS = {"f32": {}, "q8_0": dict(quantize="int8", symmetric=True, group_size=32),
         "q4_0": dict(quantize="int4", symmetric=True, group_size=32)}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("preset,arch", [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2"),
                                         ("tiny-gemma3-1kv", "gemma3")])
def test_each_family_reloads_from_gguf_with_the_runs_perplexity(preset, arch, grid, tmp_path):
    record = run(RUN.replace(model=f"random:{preset}", save_model=str(tmp_path / "m"), **GRIDS[grid]))
    path = tmp_path / "m" / "model.gguf"
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == arch
    again = run(RunSpec(kind="eval", method="dense", model=str(path), calibration=Calibration(seqlen=32),
                        eval=Evaluation(samples=4), progress=False))
    assert again.ppl == record.ppl  # the file holds exactly the weights the run evaluated
    if arch == "gemma3":  # llama.cpp's Gemma stores RMSNorm weights as 1 + w
        norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        assert float(np.asarray(norm.data).mean()) > 0.5


def test_qwen3_is_written_for_llama_cpp_with_its_head_length(tmp_path):
    """Qwen3 keeps head_dim apart from hidden / heads: the file says so (attention.key_length), as llama.cpp
    reads it (transformers' own GGUF reader ignores that key for qwen3, so it is checked here in the file)."""
    run(RUN.replace(model="random:tiny-qwen3", save_model=str(tmp_path / "m")))
    fields = gguf.GGUFReader(str(tmp_path / "m" / "model.gguf")).fields
    assert fields["general.architecture"].contents() == "qwen3"
    assert fields["qwen3.attention.key_length"].contents() == 16
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "m" / "model.gguf")).tensors]
    assert "blk.0.attn_q_norm.weight" in names and "blk.0.attn_k_norm.weight" in names


@pytest.mark.parametrize("preset,reason", [
    ("tiny-gemma3", "llama.cpp's fixed gemma3 pattern"),  # a global layer where llama.cpp expects a sliding one
    ("tiny-mistral", "a sliding window of 16 tokens"),
    ("tiny-opt", "gguf writes the llama, mistral, qwen2, qwen3, gemma3_text families"),
])
def test_what_gguf_cannot_hold_is_refused_before_any_work(preset, reason, tmp_path):
    with pytest.raises(UsageError, match=reason):
        run(RUN.replace(model=f"random:{preset}", save_model=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_removing_gemma3_blocks_breaks_llama_cpps_pattern_and_is_refused(tmp_path):
    with pytest.raises(UsageError, match="blocks removed from its sliding/global pattern"):
        run(RUN.replace(model="random:tiny-gemma3-1kv", method="magnitude", pattern="layers", sparsity=0.2,
                        save_model=str(tmp_path / "m")))


def test_a_model_that_lost_heads_says_its_head_length(tmp_path):
    """llama.cpp takes a head's length as hidden / heads unless the file says otherwise, and then refuses the
    file (n_rot 64, expected 96 on SmolLM2 width 25%): with heads removed, key/value_length are written."""
    record = run(RUN.replace(model="random:tiny-llama", method="magnitude", pattern="heads", sparsity=0.2,
                             save_model=str(tmp_path / "m")))
    assert record.structure["removal"]["heads_per_block"]
    fields = gguf.GGUFReader(str(tmp_path / "m" / "model.gguf")).fields
    heads = fields["llama.attention.head_count"].contents()
    hidden = fields["llama.embedding_length"].contents()
    assert fields["llama.attention.key_length"].contents() == fields["llama.rope.dimension_count"].contents()
    assert fields["llama.attention.key_length"].contents() * heads != hidden


@pytest.mark.parametrize("preset,head_tensor", [("tiny-llama", "output.weight"),  # untied: its own head
                                                ("tiny-gemma3-1kv", "token_embd.weight")])  # tied: the embeddings
def test_quantize_head_writes_the_runs_own_q8_0_head_and_reloads_with_its_perplexity(preset, head_tensor, tmp_path):
    """--quantize-head rounds the head onto Q8_0's grid in the run (so the run's perplexity is the file's) and the
    writer packs those codes: the head is Q8_0 in the file, the blocks Q4_0, and nothing is re-quantised."""
    plain = run(RUN.replace(model=f"random:{preset}", save_model=str(tmp_path / "plain"), **GRIDS["q4_0"]))
    record = run(RUN.replace(model=f"random:{preset}", save_model=str(tmp_path / "m"), quantize_head=True,
                             **GRIDS["q4_0"]))
    assert record.quantization["head"] == "int8 symmetric, groups of 32"
    assert record.quantization["layers"] == plain.quantization["layers"]
    assert record.ppl != plain.ppl  # the head moved onto the grid before the evaluation
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "m" / "model.gguf")).tensors}
    assert types[head_tensor] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert ("output.weight" in types) == (head_tensor == "output.weight")
    again = run(RunSpec(kind="eval", method="dense", model=str(tmp_path / "m" / "model.gguf"),
                        calibration=Calibration(seqlen=32), eval=Evaluation(samples=4), progress=False))
    assert again.ppl == record.ppl


@pytest.mark.parametrize("changes,reason", [
    (dict(quantize_head=True), "quantize_head applies to quantisation; add quantize"),
    (dict(quantize_head=True, format="compressed-tensors", **GRIDS["q8_0"]),
     "quantize_head is written by format gguf or hf"),
])
def test_quantize_head_without_a_grid_or_in_compressed_tensors_is_refused_before_any_work(changes, reason, tmp_path):
    with pytest.raises(UsageError, match=reason):
        run(RUN.replace(model="random:tiny-llama", save_model=str(tmp_path / "m"), **changes))
    assert not (tmp_path / "m").exists()
