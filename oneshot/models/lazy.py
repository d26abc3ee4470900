"""Models larger than host memory: decoder blocks whose weights stay on disk until the engine reaches them.

A model opened this way is an ordinary transformers model whose decoder blocks hold `meta` tensors
(shapes, no data); everything outside the blocks (embeddings, final norm, lm_head, rotary tables) is in
memory. `BlockWeights`, attached to the model, knows where each block's tensors are:

- in safetensors shards (a local checkpoint): each file is opened only while a block is read, so its
  pages do not stay mapped into the process;
- in a seeded generator (the real-shape `random:` presets): block i is drawn from its own seed, so a
  block comes out the same whether the model is built whole or one block at a time;
- in tensors held aside (a model already in memory, handed over: tests and tiny presets).

`materialised(model, i)` loads block i and releases it after. The engine keeps a changed block with
`keep`, which writes it to a spill shard and reads it from there from then on; `--save-model` renames
the spill shards into the saved directory, so a pruned model is written shard by shard, never whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .adapter import ModelError, decoder_blocks

ATTRIBUTE = "_oneshot_block_weights"
INDEX_FILE = "model.safetensors.index.json"


def block_weights(model: nn.Module) -> "BlockWeights | None":
    """The model's BlockWeights when its blocks live outside memory, else None."""
    return getattr(model, ATTRIBUTE, None)


@contextlib.contextmanager
def materialised(model: nn.Module, index: int):
    """Block `index` with real tensors inside the `with`; a no-op for a model held in memory."""
    weights = block_weights(model)
    if weights is None:
        yield decoder_blocks(model)[index]
        return
    weights.load(index)
    try:
        yield decoder_blocks(model)[index]
    finally:
        weights.release(index)


def _stored(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and persistent buffers by name (what a checkpoint holds), each tensor once."""
    return dict(module.state_dict(keep_vars=True))


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


class BlockWeights:
    """Where each decoder block's tensors are while the block is not in use; loads, releases and keeps blocks."""

    def __init__(self, model: nn.Module, sources: list, seed: int = 0):
        self.model, self.sources, self.seed = model, sources, seed
        blocks = decoder_blocks(model)
        ids = {id(block): i for i, block in enumerate(blocks)}
        self.prefixes = [""] * len(blocks)  # "model.layers.3." : the blocks' names in the checkpoint
        for name, module in model.named_modules():
            if id(module) in ids:
                self.prefixes[ids[id(module)]] = name + "."
        self.loaded: set[int] = set()
        self.spill: Path | None = None
        self.owns_spill = False
        self.zeros: dict[int, dict[str, int]] = {}  # counted when a block is kept: coverage needs no reread

    # -- moving blocks in and out ------------------------------------------------------------------
    def load(self, index: int) -> nn.Module:
        block = decoder_blocks(self.model)[index]
        if index in self.loaded:
            return block
        wanted = {name: t for name, t in _stored(block).items() if t.is_meta}
        source = self.sources[index]
        if isinstance(source, RandomBlock):
            tensors = source.draw(self.model, block, wanted, self.seed, index)
        else:
            tensors = source.read(self.prefixes[index], wanted)
        for name, tensor in tensors.items():
            _assign(block, name, tensor)
        self.loaded.add(index)
        return block

    def release(self, index: int) -> None:
        block = decoder_blocks(self.model)[index]
        for name, tensor in _stored(block).items():
            if not tensor.is_meta and name in self._stored_names(index):
                _assign(block, name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))
        self.loaded.discard(index)

    def _stored_names(self, index: int) -> set[str]:
        source = self.sources[index]
        return set(source.names) if hasattr(source, "names") else set(_stored(decoder_blocks(self.model)[index]))

    def keep(self, index: int) -> None:
        """Write block `index` as it is now to its spill shard; it is read from there from now on."""
        from safetensors.torch import save_file

        block = decoder_blocks(self.model)[index]
        names = self._stored_names(index)
        tensors = {self.prefixes[index] + name: t.detach().to("cpu").contiguous()
                   for name, t in _stored(block).items() if name in names}
        path = self.spill_dir() / f"block-{index:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        self.zeros[index] = {name[len(self.prefixes[index]):]: int((t == 0).sum()) for name, t in tensors.items()}
        self.sources[index] = ShardSource({name: path for name in tensors}, strip=self.prefixes[index])

    def spill_dir(self) -> Path:
        if self.spill is None:
            self.spill_beside(None)
        return self.spill

    def spill_beside(self, target: str | Path | None) -> None:
        """Kept blocks go into a hidden directory beside `target` (the saved model's directory, so that
        saving is a rename), or into the temporary directory."""
        if self.spill is not None:
            return
        parent = Path(target).expanduser().resolve().parent if target else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        name = f".{Path(target).name}.blocks." if target else "oneshot-blocks-"
        self.spill = Path(tempfile.mkdtemp(dir=parent, prefix=name))
        self.owns_spill = True

    def close(self) -> None:
        """Remove the spill shards (after a save has moved them, or after a failed run)."""
        if self.spill is not None and self.owns_spill:
            shutil.rmtree(self.spill, ignore_errors=True)
        self.spill = None

    # -- saving shard by shard ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the model as sharded safetensors into `directory`: one shard per decoder block (renamed
        from the spill shard when the block was kept) and one for everything else, plus the index."""
        from safetensors.torch import save_file

        blocks = decoder_blocks(self.model)
        total = len(blocks) + 1
        shard = lambda k: f"model-{k:05d}-of-{total:05d}.safetensors"  # noqa: E731
        weight_map, size = {}, 0
        for index in range(len(blocks)):
            source, path = self.sources[index], directory / shard(index + 1)
            if isinstance(source, ShardSource) and self.spill is not None and source.single_file_in(self.spill):
                os.replace(source.single_file(), path)  # a kept block: its spill shard is already the shard
                names = list(source.files)
                self.sources[index] = ShardSource({name: path for name in names}, strip=source.strip)
            else:
                with materialised(self.model, index) as block:
                    stored = self._stored_names(index)
                    tensors = {self.prefixes[index] + n: t.detach().contiguous() for n, t in _stored(block).items()
                               if n in stored}
                    save_file(tensors, str(path), metadata={"format": "pt"})
                    names = list(tensors)
                    del tensors
            weight_map.update(dict.fromkeys(names, path.name))
            size += path.stat().st_size
        rest = outside_blocks(self.model)
        save_file({name: t.detach().contiguous() for name, t in rest.items()}, str(directory / shard(total)),
                  metadata={"format": "pt"})
        weight_map.update({name: shard(total) for name in rest})
        size += (directory / shard(total)).stat().st_size
        index_data = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n")
        self.model.config.save_pretrained(directory)
        if getattr(self.model, "generation_config", None) is not None and self.model.can_generate():
            self.model.generation_config.save_pretrained(directory)


def outside_blocks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors that no decoder block holds (embeddings, final norm, lm_head), tied ones once."""
    blocks = {id(p) for block in decoder_blocks(model) for p in _stored(block).values()}
    seen, rest = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in blocks or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        rest[name] = tensor
    return rest  # a tied lm_head is the embedding's tensor, kept once: transformers ties it again on load


class ShardSource:
    """A block's tensors in safetensors files: {checkpoint name: file}; `strip` is the block's prefix."""

    def __init__(self, files: dict[str, Path], strip: str):
        self.files, self.strip = files, strip
        self.names = [name[len(strip):] for name in files]

    def read(self, prefix: str, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            if prefix + name not in self.files:
                raise ModelError(f"the checkpoint has no tensor {prefix + name}")
            by_file.setdefault(self.files[prefix + name], []).append(name)
        out = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:  # mapped only while it is read
                for name in names:
                    meta = wanted[name]
                    tensor = handle.get_tensor(prefix + name)
                    if tuple(tensor.shape) != tuple(meta.shape):
                        raise ModelError(f"{path.name}: {prefix + name} has shape {tuple(tensor.shape)}, the config "
                                         f"says {tuple(meta.shape)}")
                    out[name] = tensor.to(meta.dtype).clone() if tensor.dtype == meta.dtype else tensor.to(meta.dtype)
        return out

    def single_file(self) -> Path:
        return next(iter(self.files.values()))

    def single_file_in(self, directory: Path) -> bool:
        files = set(self.files.values())
        return len(files) == 1 and next(iter(files)).parent == directory


class HeldAside:
    """A block's tensors kept in memory outside the model (a model handed over whole)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.names = list(tensors)

    def read(self, _prefix: str, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.tensors[name].clone() for name in wanted}


class RandomBlock:
    """A block drawn from its own seed with the model's own initialisation (transformers' _init_weights)."""

    def draw(self, model, block, wanted, seed: int, index: int) -> dict[str, torch.Tensor]:
        for name, meta in wanted.items():
            _assign(block, name, torch.empty(meta.shape, dtype=meta.dtype))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(seed, index))
            for module in block.modules():
                model._init_weights(module)
        return {name: tensor.data for name, tensor in _stored(block).items() if name in wanted}


def block_seed(seed: int, index: int) -> int:
    """Block i of a random model with seed s: its own stream, independent of how the model is built."""
    return (seed * 1_000_003 + 7919 * (index + 1)) % 2**63


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def parameters_on_meta():
    """Build a model whose parameters are shapes on the meta device while its buffers (rotary tables)
    are real: no weight memory is touched."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def hold_aside(model: nn.Module) -> BlockWeights:
    """Move a model's block weights out of it (into tensors held aside): the engine then streams it as a
    model read from disk. For tests and small models: the values do not change."""
    sources = []
    for block in decoder_blocks(model):
        stored = _stored(block)
        sources.append(HeldAside({name: t.detach() for name, t in stored.items()}))
    weights = BlockWeights(model, sources)
    setattr(model, ATTRIBUTE, weights)
    for index in range(len(sources)):
        weights.loaded.add(index)
        weights.release(index)
    return weights


def random_model(config, dtype: torch.dtype, seed: int, keep_on_disk: bool) -> nn.Module:
    """A real-shape random model drawn block by block. Outside the blocks the weights come from `seed`;
    block i from block_seed(seed, i). With keep_on_disk the blocks are drawn when the engine reaches them."""
    model = _skeleton(config, dtype)
    rest = [module for module in model.modules() if any(p.is_meta for p in module.parameters(recurse=False))
            and not _inside_blocks(model, module)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in rest:
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_meta:
                    module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                            requires_grad=False)
            model._init_weights(module)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    weights = BlockWeights(model, [RandomBlock() for _ in decoder_blocks(model)], seed)
    setattr(model, ATTRIBUTE, weights)
    if not keep_on_disk:
        for index in range(len(decoder_blocks(model))):
            weights.load(index)
        delattr(model, ATTRIBUTE)
    return model


def _inside_blocks(model: nn.Module, module: nn.Module) -> bool:
    return any(module is m for block in decoder_blocks(model) for m in block.modules())


def _skeleton(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with default_dtype(dtype), parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model.eval()


def checkpoint_files(path: Path) -> dict[str, Path]:
    """{tensor name: shard} of a local safetensors checkpoint (sharded with an index, or one file)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            files.update({name: shard for name in handle.keys()})
    return files


def open_checkpoint(path: Path, dtype: torch.dtype) -> nn.Module:
    """A local safetensors checkpoint with its decoder blocks left on disk; the rest is read now."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    model = _skeleton(config, dtype)
    files = checkpoint_files(path)
    if not files:
        raise ModelError(f"{path} has no safetensors weights; its weights cannot stay on disk (load it whole)")
    weights = BlockWeights(model, [])
    for index, block in enumerate(decoder_blocks(model)):
        prefix = weights.prefixes[index]
        names = [prefix + name for name in _stored(block)]
        missing = [name for name in names if name not in files]
        if missing:
            raise ModelError(f"{path}: no tensor {missing[0]} in its safetensors files (its names need transformers' "
                             "conversion on load); load it whole, without --weights-on-disk")
        weights.sources.append(ShardSource({name: files[name] for name in names}, strip=prefix))
    rest = {name: t for name, t in outside_blocks(model).items() if t.is_meta}
    missing = [name for name in rest if name not in files]
    if missing:
        raise ModelError(f"{path}: no tensor {missing[0]} in its safetensors files; load it whole, without "
                         "--weights-on-disk")
    read = ShardSource({name: files[name] for name in rest}, strip="").read("", rest)
    for name, tensor in read.items():
        _assign(model, name, tensor)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    setattr(model, ATTRIBUTE, weights)
    return model


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
