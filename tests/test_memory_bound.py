"""The one-block memory bound of oneshot/engine/memory.py (check_memory's docstring), measured on the CPU.

torch's CPU allocator keeps no statistics and tracemalloc does not see its memory, so a dispatch mode
counts the bytes of every storage an operator creates and drops them when the storage is freed: its
peak over one block visit is what the visit allocated, op by op (an operator's internal workspace is
not seen). The block's weights are counted too: the models keep their blocks out of memory (a lazily
drawn random model, a tiny one held aside) and the engine draws or copies each block when it reaches it,
as a GPU run moves it to the device. SparseGPT is the heaviest default method (fp32 Hessians and their
inverse factors).
"""
from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from oneshot.engine import check_memory, prune_model
from oneshot.methods import get_method, parse_pattern
from oneshot.models import block_weights, build_random_model

from helpers import random_ids


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while the mode is active and still alive; `peak` is their maximum."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def sweep(self) -> None:
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **kwargs)
        fresh = []
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in inputs and storage._cdata not in self.live:  # not a view, not in place
                    fresh.append(storage)
        if fresh:
            self.sweep()  # what was freed before this op, then what it created
            for storage in fresh:
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        return out


class _Stop(Exception):
    pass


def _medium_llama(seed: int = 0):
    """A Llama with the 7B's proportions at 1/16 the width, drawn block by block like the real-shape presets."""
    from transformers import AutoConfig

    from oneshot.models.lazy import random_model

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=256, intermediate_size=688,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=256)
    return random_model(config, torch.float32, seed, keep_on_disk=True)


SHAPES = {
    "tiny-llama": lambda: build_random_model("tiny-llama", torch.float32, seed=0, on_disk=True),
    "medium-llama (256 x 688)": _medium_llama,
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_block_visit_stays_under_the_bound(shape):
    model = SHAPES[shape]()
    nsamples, seqlen = 8, 64
    ids = random_ids(nsamples, seqlen)
    estimate = check_memory(model, nsamples, seqlen, "cpu")
    bound = (estimate["activations_gib"] + estimate["block_gib"]) * 2 ** 30
    counter = LiveBytes()

    def stop(index):
        raise _Stop  # one block visit is enough: every block has the same shapes

    try:
        with counter:
            prune_model(model, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), ids, progress=False,
                        on_block_done=stop)
    except _Stop:
        pass
    finally:
        block_weights(model).close()
    mib = 2 ** 20
    print(f"{shape}: measured peak {counter.peak / mib:.2f} MiB, bound {bound / mib:.2f} MiB "
          f"(weights {estimate['weights_gib'] * 1024:.2f}, statistics {estimate['statistics_gib'] * 1024:.2f}, "
          f"scratch {estimate['scratch_gib'] * 1024:.2f}, activations {estimate['activations_gib'] * 1024:.2f})")
    assert counter.peak > 0  # the counter saw the visit
    assert counter.peak <= bound, (shape, counter.peak / mib, bound / mib, estimate)


def test_the_counter_sees_allocations_and_frees():
    counter = LiveBytes()
    with counter:
        a = torch.empty(1000, 250)  # 1 MB
        b = a * 2  # 1 MB more
        del a
        c = b + 1  # a freed first: the peak stays at 2 MB
        view = c.t()  # a view allocates nothing
        c.add_(1)  # nor does an op in place
        del b, c, view
        torch.empty(10)  # the next allocation sweeps the freed ones
    assert counter.peak == 2_000_000
    assert counter.now == 40
