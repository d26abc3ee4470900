"""Quantised runs end to end on a tiny random Llama: each save format is reloaded in a fresh process
(transformers' own loaders: compressed-tensors, GGUF, plain safetensors) and its logits must equal the
in-memory quantised model's. Also: the Q8_0/Q4_0 packing against the gguf package's own dequantiser."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from oneshot import Calibration, Evaluation, RunSpec, run
from oneshot.models import decoder_blocks, load_model

pytest.importorskip("gguf")

LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
for directory, fmt in zip(sys.argv[2::2], sys.argv[3::2]):
    extra = {"gguf_file": "model.gguf"} if fmt == "gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        torch.save(model(ids).logits, directory + ".logits.pt")
"""

CASES = [  # method, pattern, quantize, format, extra spec fields
    ("sparsegpt", "2:4", "int4", "compressed-tensors", dict(group_size=32, symmetric=True)),
    ("wanda", "unstructured", "int8", "compressed-tensors", dict(symmetric=True)),  # per channel, GPTQ
    ("sparsegpt", "unstructured", "int4", "gguf", dict(group_size=32, symmetric=True)),  # Q4_0
    ("magnitude", "2:4", "int8", "gguf", dict(group_size=32, symmetric=True, quant_method="rtn")),  # Q8_0
    ("wanda", "unstructured", None, "gguf", {}),  # F32
    ("sparsegpt", "unstructured", "int4", "hf", dict(group_size=16)),  # dequantised, asymmetric
]
if importlib.util.find_spec("compressed_tensors") is None:  # the test extra installs it
    CASES = [case for case in CASES if case[3] != "compressed-tensors"]
IDS = [f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES]


def _run(directory, method, pattern, quantize, fmt, **extra):
    loaded = load_model("random:tiny-llama", dtype=torch.float32, seed=0)
    spec = RunSpec(model="random:tiny-llama", method=method, pattern=pattern, quantize=quantize, format=fmt,
                   calibration=Calibration(nsamples=4, seqlen=32), eval=Evaluation(ppl=(), samples=1),
                   save_model=str(directory), progress=False, **extra)
    record = run(spec, loaded=loaded)
    return record, loaded.model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case run and saved, in this process."""
    root = tmp_path_factory.mktemp("formats")
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    results = {}
    for case_id, (method, pattern, quantize, fmt, extra) in zip(IDS, CASES):
        record, model = _run(root / case_id, method, pattern, quantize, fmt, **extra)
        with torch.no_grad():
            results[case_id] = (record, model, model(ids).logits)
    return root, results


@pytest.fixture(scope="module")
def reloaded(saved):
    """Every saved case reloaded in one fresh process (one transformers import), which writes its logits."""
    root, _results = saved
    argv = [arg for case_id, case in zip(IDS, CASES) for arg in (str(root / case_id), case[3])]
    done = subprocess.run([sys.executable, "-c", LOAD, str(root / "ids.pt"), *argv], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return saved


@pytest.mark.system  # reloads in a fresh Python process
@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_each_format_reloads_in_a_fresh_process_with_the_same_logits(reloaded, case):
    method, pattern, quantize, fmt, _extra = CASES[case]
    root, results = reloaded
    record, model, want = results[IDS[case]]
    directory = root / IDS[case]
    got = torch.load(str(directory) + ".logits.pt")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # result.json and the card say what was saved and how big it is
    saved_model = record.saved_model
    assert saved_model["format"] == fmt and saved_model["weights_bytes"] > 0
    assert saved_model["bytes"] >= saved_model["weights_bytes"]
    card = json.loads((directory / "oneshot.json").read_text())
    assert card["method"] == method and card["pattern"] == pattern
    if quantize:
        assert card["quantization"]["bits"] == int(quantize[3:]) and record.quantization["layers"] == 14
        # pruned weights stayed exactly zero: the pattern still holds after quantisation
        for block in decoder_blocks(model):
            weight = block.mlp.down_proj.weight
            if pattern == "2:4":
                assert bool(((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
            else:
                assert float((weight == 0).float().mean()) >= 0.5
    if fmt == "gguf":
        import gguf

        reader = gguf.GGUFReader(str(directory / "model.gguf"))
        kinds = {t.tensor_type.name for t in reader.tensors if ".attn_q." in t.name}
        assert kinds == {"F32" if quantize is None else f"Q{quantize[3:]}_0"}
        assert json.loads(reader.fields["oneshot.lineage"].contents())["method"] == method


def test_packed_checkpoints_are_smaller(saved):
    root, results = saved
    model = results[IDS[0]][1]
    total_fp32 = sum(p.numel() * 4 for p in model.parameters())
    block_numel = sum(p.numel() for b in decoder_blocks(model) for p in b.parameters() if p.dim() == 2)
    # int4 with a float32 scale per 32 weights: 0.5 + 0.125 bytes per block weight instead of 4
    for case in (0, 2):
        assert results[IDS[case]][0].saved_model["weights_bytes"] < total_fp32 - block_numel * 3


@pytest.mark.parametrize("bits", [8, 4])
def test_gguf_blocks_dequantise_to_the_codes_times_scales(bits):
    import gguf

    from oneshot.export.gguf import pack_q4_0, pack_q8_0

    g = torch.Generator().manual_seed(bits)
    low, high = (-128, 127) if bits == 8 else (-8, 7)
    codes = torch.randint(low, high + 1, (6, 64), generator=g)
    scale = (torch.rand(6, 2, generator=g) + 0.01).to(torch.float16).float()
    packed = (pack_q8_0 if bits == 8 else pack_q4_0)(codes, scale)
    kind = gguf.GGMLQuantizationType.Q8_0 if bits == 8 else gguf.GGMLQuantizationType.Q4_0
    got = gguf.quants.dequantize(packed, kind)
    want = (codes.float() * scale.repeat_interleave(32, 1)).numpy()
    np.testing.assert_array_equal(got, want)
