"""Models larger than host memory: decoder blocks left on disk (or drawn, for random presets) until the engine
reaches them, one block in memory at a time, and the pruned model written shard by shard. Every figure must be
bitwise that of the same run held in memory."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oneshot import run
from oneshot.models import PRESETS, block_weights, build_random_model, decoder_blocks, load_model, materialised
from oneshot.models import lazy, loading
from oneshot.spec import Evaluation

from helpers import TINY_SPEC

# Whatever differs between two runs of the same settings: when, how long, how much memory, the command.
VARYING = {"timings", "peak_memory_gib", "finished_at", "command", "model_source",
           "saved_model"}  # its path, and its bytes: one file against shards


def tensors(directory) -> dict:
    found = {}
    for shard in Path(directory).glob("*.safetensors"):
        found.update(load_file(shard))
    return found


def same(record_a, record_b):
    a, b = record_a.to_dict(), record_b.to_dict()
    return {k: v for k, v in a.items() if k not in VARYING} == {k: v for k, v in b.items() if k not in VARYING}


def _one_block_at_a_time(monkeypatch):
    """Fail if the engine ever holds two blocks of a model on disk in memory."""
    seen = []
    real = lazy.BlockWeights.load

    def load(self, index):
        assert not self.loaded - {index}, f"block {index} loaded while {sorted(self.loaded)} still are"
        seen.append(index)
        return real(self, index)

    monkeypatch.setattr(lazy.BlockWeights, "load", load)
    return seen


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_blocks_on_disk_prune_and_save_the_in_memory_model_bitwise(method, tmp_path, monkeypatch):
    whole = run(TINY_SPEC.replace(method=method, save_model=str(tmp_path / "whole")))
    loads = _one_block_at_a_time(monkeypatch)
    streamed = run(TINY_SPEC.replace(method=method, save_model=str(tmp_path / "streamed"), weights_on_disk=True))
    assert loads and sorted(set(loads)) == [0, 1]
    assert same(whole, streamed)  # perplexity, sparsity per layer and over the model, notes: all equal
    a, b = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)
    saved = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    assert "model.safetensors.index.json" in saved and "model-00003-of-00003.safetensors" in saved  # 2 blocks + rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "whole"]  # no spill shards left behind
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == "model-00002-of-00003.safetensors"


def test_a_sharded_checkpoint_opens_with_its_blocks_left_on_disk(tmp_path, monkeypatch):
    run(TINY_SPEC.replace(method="dense", eval=Evaluation(ppl=()), save_model=str(tmp_path / "base"),
                          weights_on_disk=True))
    reference = load_model(str(tmp_path / "base")).model  # transformers' own loader, whole
    opened = load_model(str(tmp_path / "base"), on_disk=True).model
    assert block_weights(opened) is not None
    assert all(p.is_meta for block in decoder_blocks(opened) for p in block.parameters())
    assert not any(p.is_meta for name, p in opened.named_parameters() if ".layers." not in name)
    expected = decoder_blocks(reference)[1].state_dict()
    with materialised(opened, 1) as block:
        assert all(torch.equal(t, expected[name]) for name, t in block.state_dict().items())
    assert all(p.is_meta for p in decoder_blocks(opened)[1].parameters())  # released after

    _one_block_at_a_time(monkeypatch)
    spec = TINY_SPEC.replace(model=str(tmp_path / "base"), method="wanda", pattern="2:4")
    assert same(run(spec), run(spec.replace(weights_on_disk=True)))


def test_real_shape_presets_are_drawn_block_by_block_the_same_either_way(monkeypatch):
    # A real-shape preset (not one of the tiny ones, which keep their whole-model draw), at a test size.
    monkeypatch.setitem(PRESETS, "small-llama", ("llama", dict(PRESETS["tiny-llama"][1], num_hidden_layers=3)))
    whole = build_random_model("small-llama", torch.float32, seed=3)
    on_disk = build_random_model("small-llama", torch.float32, seed=3, on_disk=True)
    assert block_weights(whole) is None and block_weights(on_disk) is not None
    for index in (2, 0):
        expected = decoder_blocks(whole)[index].state_dict()
        with materialised(on_disk, index) as block:
            assert all(torch.equal(t, expected[name]) for name, t in block.state_dict().items())
    weight = decoder_blocks(whole)[0].mlp.up_proj.weight
    assert abs(float(weight.std()) - 0.02) < 0.002  # transformers' own initialisation (normal, std 0.02)
    other = build_random_model("small-llama", torch.float32, seed=4)
    assert not torch.equal(decoder_blocks(other)[0].mlp.up_proj.weight, weight)


def test_weights_stay_on_disk_by_themselves_when_they_would_not_fit(tmp_path, monkeypatch):
    run(TINY_SPEC.replace(method="dense", eval=Evaluation(ppl=()), save_model=str(tmp_path / "base")))
    assert not loading.weights_stay_on_disk(str(tmp_path / "base"), torch.float32)
    monkeypatch.setattr(lazy, "available_host_bytes", lambda: 1000)  # a machine with 1 kB free
    assert loading.weights_stay_on_disk(str(tmp_path / "base"), torch.float32)
    assert block_weights(load_model(str(tmp_path / "base"), on_disk=None).model) is not None


@pytest.mark.parametrize("on_disk, verb", [(False, "load"), (True, "open")])
def test_a_model_transformers_cannot_build_is_one_model_error_and_logging_is_restored(tmp_path, on_disk, verb):
    from transformers.utils import logging as hf_logging

    from oneshot.models import ModelError
    from oneshot.models.random_models import BYTE_TOKENIZER_FILE

    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (tmp_path / BYTE_TOKENIZER_FILE).write_text("{}")
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    before = hf_logging.get_verbosity()
    with pytest.raises(ModelError, match=f"could not {verb} model .*no-such-architecture"):
        load_model(str(tmp_path), on_disk=on_disk)
    assert hf_logging.get_verbosity() == before
