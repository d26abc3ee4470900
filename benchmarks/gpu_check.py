"""One prepared check for the first session with a GPU: environment, the gpu test tier, the fused SparseGPT
kernel, 2:4 matmuls and the methods' speed on a 7B-shaped model, in one command of at most 8 minutes.

    python benchmarks/gpu_check.py --out $OUT              # on a CUDA machine (an H100: about 7.5 minutes)
    python benchmarks/gpu_check.py --dry-run --out DIR     # on a CPU: the same code at tiny shapes
    python benchmarks/gpu_check.py --out $OUT --parts speed --budget-s 180   # rerun one part

Everything goes under --out (default $OUT) as it is done, each part in its own file, written and flushed
when the part ends (the speed part also after every run), so a run cut short still leaves what it did:

    environment.json    torch, CUDA, cuDNN, Triton, transformers; the GPU; cuSPARSELt and CUTLASS (smoke-tested)
    triton_kernel.json  the fused SparseGPT block's self-check (outcome and reason), then the kernel beside the
                        PyTorch column loop on 7B-shaped layers: mask overlap, ||X (W - W_hat)|| / ||X W|| of each
    sparse24.json       2:4 x @ W^T against dense, each torch backend by name (cuSPARSELt, CUTLASS), fp16 and bf16,
                        Llama-2-7B's shapes, 1 to 4096 tokens (benchmarks/sparse24_gpu.py's `measure`)
    gpu_tests.json      `python -m pytest -q -m gpu tests` in a subprocess with its own timeout: counts, failures
    gpu_tests.txt       its whole output
    speed.json          magnitude, Wanda and SparseGPT on random:llama-2-7b, fp16, 128 x 2048 calibration: one
                        block each, then all blocks (skipped, saying so, when the one-block time predicts the run
                        would not fit the time left); seconds and peak GPU memory per block, whole-run wall time
    summary.md          every part's status and main numbers, rewritten after each part
    log.txt             progress lines with times

That is 8 files, the most the device tool brings back. A part that fails is recorded as failed (with its
traceback) and the next part runs. Without CUDA (--dry-run on a CPU) every part still runs its code at tiny
shapes where it can (random:tiny-llama, 4 x 64 calibration, 64..128-wide matrices) and says "skipped: no
CUDA" with the reason where it cannot, so tests/test_gpu_check.py finds on a CPU whatever would break here.

Random 7B-shaped models are not initialised on the host (minutes of normal_ over 6.7B fp16 values on a CPU):
`load_model(..., on_disk=True)` builds the skeleton and draws only the embeddings, norm and head; each
decoder block is then drawn on the GPU from its own seed (lazy.block_seed) with transformers' own
initialisation, and moved to host memory, where the engine expects a model (seconds for 32 blocks). The
values differ from a CPU draw (another random generator) but shapes, dtype and distribution are the same;
speed does not depend on them. speed.json says which way the blocks were drawn and how long it took.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from oneshot.engine import check_memory, prune_model  # noqa: E402
from oneshot.engine.stages import DEFAULT_STAGES  # noqa: E402
from oneshot.methods import get_method, parse_pattern  # noqa: E402
from oneshot.models import block_weights, decoder_blocks, load_model  # noqa: E402
from oneshot.models.lazy import ATTRIBUTE, RandomBlock, _assign, _stored, block_seed  # noqa: E402

PARTS = ("environment", "triton_kernel", "sparse24", "gpu_tests", "speed")
FILES = {"environment": "environment.json", "triton_kernel": "triton_kernel.json", "sparse24": "sparse24.json",
         "gpu_tests": "gpu_tests.json", "speed": "speed.json"}
TESTS_LOG, SUMMARY, LOG = "gpu_tests.txt", "summary.md", "log.txt"
NO_CUDA = "skipped: no CUDA"
TEST_COMMAND = ["-m", "pytest", "-q", "-m", "gpu", "tests", "--continue-on-collection-errors", "-p",
                "no:cacheprovider", "-rfEs"]

FULL = dict(
    model="random:llama-2-7b", dtype="float16", nsamples=128, seqlen=2048, methods=("magnitude", "wanda", "sparsegpt"),
    # benchmarks/sparse24_gpu.py's SHAPES (Llama-2-7B's linear layers, [out, in])
    matmul_shapes=None, tokens=(1, 16, 128, 512, 2048, 4096), matmul_dtypes=("float16", "bfloat16"), repeat=50,
    kernel_layers={"q_proj": (4096, 4096), "down_proj": (4096, 11008)}, kernel_tokens=8192,
    tests_timeout=150, speed_reserve=200, budget=450,
)
DRY = dict(
    model="random:tiny-llama", dtype="float16", nsamples=4, seqlen=64, methods=("magnitude", "wanda", "sparsegpt"),
    matmul_shapes={"q/k/v/o": (64, 64), "gate/up": (128, 64), "down": (64, 128)}, tokens=(1, 16),
    matmul_dtypes=("float16", "bfloat16"), repeat=3,
    kernel_layers={"q_proj": (64, 64), "down_proj": (64, 128)}, kernel_tokens=256,
    tests_timeout=240, speed_reserve=30, budget=600,
)


# -- writing as we go ---------------------------------------------------------------------------------------
def _plain(value):
    """JSON without NaN or inf (null instead), tuples as lists, anything else as its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_file(path: Path, text: str) -> None:
    """Written beside, flushed to disk, then renamed into place: a kill leaves the old file or the new one."""
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Check:
    """The run's state: where files go, the deadline, the results so far."""

    def __init__(self, out: Path, config: dict, dry_run: bool, budget: float):
        self.out, self.config, self.dry_run = out, config, dry_run
        self.start = time.perf_counter()
        self.deadline = self.start + budget
        self.results: dict[str, dict] = {}
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        out.mkdir(parents=True, exist_ok=True)
        self.log_handle = open(out / LOG, "a")

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f} s] {message}"
        print(line, file=sys.stderr, flush=True)
        self.log_handle.write(line + "\n")
        self.log_handle.flush()

    def save(self, part: str, result: dict) -> None:
        self.results[part] = result
        write_file(self.out / FILES[part], json.dumps(_plain(result), indent=1) + "\n")

    def summary(self) -> None:
        write_file(self.out / SUMMARY, render_summary(self))


# -- environment ---------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _smoke_2_4(backend: str) -> dict:
    """Compress a small 2:4 fp16 matrix with `backend` and multiply: does the path work at all here?"""
    import sparse24_gpu

    why = sparse24_gpu.backend_status(backend, "cuda")
    if why is not None:
        return {"works": False, "reason": why}
    try:
        weight = sparse24_gpu.prune_2_4(torch.randn(128, 128, device="cuda", dtype=torch.float16))
        x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
        got = torch.nn.functional.linear(x, sparse24_gpu.compress(weight, backend))
        close = bool(torch.allclose(got.float(), torch.nn.functional.linear(x, weight).float(), rtol=2e-2, atol=2e-1))
        return {"works": close, "reason": "compress and matmul agree with dense" if close else "result differs"}
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return {"works": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def part_environment(check: Check) -> dict:
    from oneshot.record import versions

    result = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": check.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"), "transformers": _version("transformers"), "versions": versions(),
        "dry_run": check.dry_run, "config": {k: v for k, v in check.config.items()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "missing_packages": [p for p in ("gguf", "datasets", "lm-eval", "compressed-tensors", "peft", "triton")
                             if _version(p) is None],
    }
    cusparselt = getattr(torch.backends, "cusparselt", None)
    result["cusparselt_available"] = bool(cusparselt and cusparselt.is_available())
    result["cusparselt_version"] = cusparselt.version() if result["cusparselt_available"] else None
    result["cutlass_semi_structured_class"] = hasattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS")
    if check.cuda:
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                         "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
                         "count": torch.cuda.device_count()}
        result["cusparselt_smoke"] = _smoke_2_4("cusparselt")
        result["cutlass_smoke"] = _smoke_2_4("cutlass")
        try:
            result["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            result["nvidia_smi"] = f"unavailable: {exc}"
    else:
        result["gpu"] = NO_CUDA
        result["cusparselt_smoke"] = result["cutlass_smoke"] = {"works": False, "reason": NO_CUDA}
    result["status"] = "ok"
    return result


# -- the fused SparseGPT kernel --------------------------------------------------------------------------------
def _layer_inputs(tokens: int, features: int, device: str, generator) -> torch.Tensor:
    """Inputs with some structure (correlated features of different scales), so the Hessian is not ~I."""
    rank = max(1, features // 8)
    mix = torch.randn(rank, features, device=device, generator=generator) / rank ** 0.5
    X = torch.randn(tokens, rank, device=device, generator=generator) @ mix
    X += 0.1 * torch.randn(tokens, features, device=device, generator=generator)
    return X * torch.exp(0.5 * torch.randn(features, device=device, generator=generator))


def _timed(fn, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def part_triton_kernel(check: Check) -> dict:
    from oneshot.methods import sparsegpt
    from oneshot.methods.sparsegpt import block_agreement, prepare_hessian, self_check, sparsegpt_prune

    result = {"triton": _version("triton"), "tolerance": {"mask_overlap_at_least": sparsegpt.SELF_CHECK_OVERLAP,
                                                           "error_within": sparsegpt.SELF_CHECK_RTOL}}
    if check.cuda:
        sparsegpt._FUSED, sparsegpt._FUSED_STATUS = None, {}  # run the first-use self-check afresh
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = sparsegpt._fused_block()
        result["self_check"] = {**sparsegpt.fused_block_status(), "chosen": chosen.__name__,
                                "warnings": [str(w.message) for w in caught]}
        try:
            from oneshot.methods.sparsegpt_kernel import obs_block
        except Exception as exc:  # noqa: BLE001
            obs_block, result["import_error"] = None, f"{type(exc).__name__}: {exc}"
        kernel_name = "triton"
    else:
        # No CUDA: the kernel cannot run; the same comparison runs with the PyTorch loop on both sides, so the
        # harness itself is checked. The self-check's tolerance logic runs on the CPU the same way.
        harness = self_check(sparsegpt._obs_block_torch, "cpu")
        result["self_check"] = {"status": NO_CUDA, "reason": "the fused Triton block runs on CUDA only",
                                "harness_on_cpu": harness}
        obs_block, kernel_name = sparsegpt._obs_block_torch, "PyTorch loop (stand-in: no CUDA)"
    result["kernel"] = kernel_name
    layers = []
    generator = torch.Generator(device=check.device).manual_seed(0)
    for name, (rows, cols) in check.config["kernel_layers"].items():
        X = _layer_inputs(check.config["kernel_tokens"], cols, check.device, generator)
        W = 0.02 * torch.randn(rows, cols, device=check.device, generator=generator)
        inverse = prepare_hessian(X.t() @ X * (2 / X.shape[0]))
        for pattern in ("unstructured", "2:4"):
            row = {"layer": name, "shape": [rows, cols], "tokens": X.shape[0], "pattern": pattern}
            want, row["torch_s"] = _timed(lambda: sparsegpt_prune(W, inverse, 0.5, parse_pattern(pattern),
                                                                  kernel="torch"), check.cuda)
            if obs_block is None:
                row["kernel"] = "unavailable: " + result.get("import_error", "")
                layers.append(row)
                continue
            saved = sparsegpt._FUSED
            sparsegpt._FUSED = obs_block  # this comparison forces the kernel, whatever the self-check said
            try:
                run = lambda: sparsegpt_prune(W, inverse, 0.5, parse_pattern(pattern), kernel="auto")  # noqa: E731
                if check.cuda:
                    _timed(run, True)  # the first call compiles
                got, row["kernel_s"] = _timed(run, check.cuda)
                row.update(block_agreement(got.weight.t().float(), want.weight.t().float(), got.mask.t(),
                                           want.mask.t(), W.t().float(), X))
                row["within_tolerance"] = (row["mask_overlap"] >= sparsegpt.SELF_CHECK_OVERLAP and
                                           row["error"] <= row["error_torch"] * (1 + sparsegpt.SELF_CHECK_RTOL))
            except Exception as exc:  # noqa: BLE001 - a kernel failure is the finding
                row["kernel"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            finally:
                sparsegpt._FUSED = saved
            layers.append(row)
            check.log(f"  kernel {name} {pattern}: " + ", ".join(f"{k} {row[k]:.4g}" for k in
                      ("mask_overlap", "error", "error_torch", "torch_s", "kernel_s") if isinstance(row.get(k), float)))
    result["layers"] = layers
    if not check.cuda:
        result["status"] = f"{NO_CUDA} (the kernel; the harness ran with the PyTorch loop on both sides)"
    elif obs_block is None:
        result["status"] = "failed: the kernel does not import"
    else:
        agree = all(row.get("within_tolerance") for row in layers)
        result["status"] = "ok" if agree else "kernel outside tolerance on some layer"
    return result


# -- 2:4 matmuls -----------------------------------------------------------------------------------------------
def part_sparse24(check: Check) -> dict:
    import sparse24_gpu

    config = check.config
    shapes = config["matmul_shapes"] or sparse24_gpu.SHAPES
    backends = ("cusparselt", "cutlass")
    result = {"backends": {b: sparse24_gpu.backend_status(b, check.device) or "available" for b in backends},
              "shapes": shapes, "tokens": config["tokens"], "repeat": config["repeat"], "rows": []}

    def on_row(row):
        result["rows"].append(row)
        if len(result["rows"]) % 12 == 0:
            check.save("sparse24", {**result, "status": "running"})

    for dtype in config["matmul_dtypes"]:
        if check.left() < 30:
            result["stopped"] = f"budget: {check.left():.0f} s left before {dtype}"
            break
        sparse24_gpu.measure(getattr(torch, dtype), config["tokens"], config["repeat"], backends, shapes,
                             check.device, on_row=on_row)
        check.log(f"  2:4 {dtype}: {len(result['rows'])} rows")
    ran = [row for row in result["rows"] if isinstance(row["agree"], bool)]
    result["status"] = ("ok" if ran and all(row["agree"] for row in ran) else
                        f"{NO_CUDA} (dense timed on the CPU; no 2:4 kernel runs there)" if not check.cuda else
                        "no backend ran" if not ran else "some 2:4 results disagree with dense")
    return result


# -- the gpu test tier -----------------------------------------------------------------------------------------
def part_gpu_tests(check: Check) -> dict:
    timeout = max(30.0, min(check.config["tests_timeout"], check.left() - check.config["speed_reserve"]))
    command = [sys.executable, *TEST_COMMAND]
    result = {"command": " ".join(["python", *TEST_COMMAND]), "timeout_s": timeout, "cwd": str(ROOT)}
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if check.cuda:
        torch.cuda.empty_cache()  # the tests' own process needs the GPU's memory more than this one's cache
    start = time.perf_counter()
    with open(check.out / TESTS_LOG, "w") as handle:
        try:
            proc = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            result["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            result["returncode"] = None
            result["timed_out"] = True
    result["seconds"] = time.perf_counter() - start
    text = (check.out / TESTS_LOG).read_text(errors="replace")
    tail = [line for line in text.splitlines() if line.strip()][-1:] or [""]
    result["last_line"] = tail[0]
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", tail[0]):
        counts["errors" if word.startswith("error") else word] = int(number)
    result["counts"] = counts
    result["failures"] = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    result["skips"] = [line for line in text.splitlines() if line.startswith("SKIPPED ")]
    if result.get("timed_out"):
        result["status"] = f"timed out after {timeout:.0f} s"
    elif result["returncode"] == 0:
        result["status"] = "ok" if check.cuda else f"ok ({NO_CUDA}: the CUDA tests skip here)"
    elif result["returncode"] == 5:
        result["status"] = "no tests selected"
    else:
        result["status"] = f"failed (exit {result['returncode']}): {counts}"
    return result


# -- speed on a 7B-shaped model ----------------------------------------------------------------------------------
def draw_blocks(model, weights, indices, device: str) -> str:
    """Give decoder blocks `indices` real weights in host memory, as a loaded model has them. A random preset's
    block (lazy.RandomBlock) is drawn on `device` from its own seed with the model's own initialisation, as
    BlockWeights.load does on the host, then moved to the host; any other block is read by BlockWeights.load.
    Returns how the blocks were drawn."""
    blocks = decoder_blocks(model)
    how = set()
    for index in indices:
        block = blocks[index]
        weights.release(index)  # back to shapes only (nothing to do for a block never loaded)
        if not isinstance(weights.sources[index], RandomBlock):
            weights.load(index)
            how.add("read on the host (BlockWeights.load)")
            continue
        wanted = {name: t for name, t in _stored(block).items() if t.is_meta}
        for name, meta in wanted.items():
            _assign(block, name, torch.empty(meta.shape, dtype=meta.dtype, device=device))
        cuda = torch.device(device).type == "cuda"
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            torch.manual_seed(block_seed(weights.seed, index))  # seeds the CUDA generators too
            for module in block.modules():
                model._init_weights(module)
        block.to("cpu")
        weights.loaded.add(index)
        how.add(f"drawn on {device} from lazy.block_seed, moved to the host")
    return "; ".join(sorted(how))


class _Stop(Exception):
    """Raised from on_block_done: one block is enough, or the budget is spent."""


def time_blocks(check: Check, model, method: str, ids, blocks: int | None, deadline: float, on_block=None) -> dict:
    """prune_model over the first `blocks` blocks (None: all), timed per block with CUDA synchronisation,
    with the peak GPU memory of each block (reset after each). Stops at `deadline`."""
    cuda = check.cuda
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    per_block, marks = [], {}
    start = time.perf_counter()
    last = [start]
    baseline = torch.cuda.memory_allocated() / 2**30 if cuda else None

    def mark(visit):  # the first stage of each visit: the block is on the device now
        marks[visit.index] = time.perf_counter()

    def done(index):
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        row = {"block": index, "wall_s": now - last[0], "visit_s": now - marks.get(index, last[0]),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        per_block.append(row)
        last[0] = now
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if on_block is not None:
            on_block(per_block)
        if blocks is not None and len(per_block) >= blocks:
            raise _Stop("blocks")
        if now > deadline:
            raise _Stop("budget")

    chosen = get_method(method)
    stages = (mark, *(getattr(chosen, "stages", None) or DEFAULT_STAGES))
    status, report = "ok", None
    try:
        report = prune_model(model, chosen, 0.5, parse_pattern("unstructured"), ids, device=check.device,
                             progress=False, on_block_done=done, stages=stages)
    except _Stop as stop:
        status = "ok" if str(stop) == "blocks" else f"stopped by the budget after {len(per_block)} blocks"
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    result = {"method": method, "blocks": len(per_block), "wall_s": wall, "status": status,
              "first_visit_at_s": (marks[0] - start) if 0 in marks else None,  # capture + moving block 0 in
              "baseline_gib": baseline, "per_block": per_block,
              "peak_max_gib": max((r["peak_gib"] for r in per_block if r["peak_gib"] is not None), default=None)}
    if report is not None:
        result["capture_s"] = report.timings.get("capture_s")
        result["sparsity"] = report.sparsity
    if method == "sparsegpt":
        from oneshot.methods.sparsegpt import fused_block_status

        result["sparsegpt_kernel"] = fused_block_status() or {"kernel": "torch (no CUDA)" if not cuda else "?"}
    return result


def _failed(exc: Exception) -> dict:
    return {"status": f"failed: {type(exc).__name__}: {str(exc)[:300]}", "traceback": traceback.format_exc()[-3000:]}


def _describe(run: dict) -> str:
    if "wall_s" not in run:
        return run["status"]
    peak = "" if run.get("peak_max_gib") is None else f", peak {run['peak_max_gib']:.2f} GiB"
    return f"{run['blocks']} block(s) in {run['wall_s']:.2f} s ({run['status']}){peak}"


def part_speed(check: Check) -> dict:
    from speed import calibration_tokens

    config = check.config
    dtype = getattr(torch, config["dtype"])
    result = {"model": config["model"], "dtype": config["dtype"], "nsamples": config["nsamples"],
              "seqlen": config["seqlen"], "device": torch.cuda.get_device_name() if check.cuda else "cpu",
              "sparsity": 0.5, "pattern": "unstructured", "one_block": {}, "all_blocks": {}}
    save = lambda status="running": check.save("speed", {**result, "status": status})  # noqa: E731

    start = time.perf_counter()
    loaded = load_model(config["model"], dtype=dtype, seed=0, on_disk=True)
    model = loaded.model
    weights = block_weights(model)
    result["load_s"] = time.perf_counter() - start  # skeleton, embeddings, norm and head (drawn on the host)
    count = len(decoder_blocks(model))
    start = time.perf_counter()
    weights.load(0)  # for comparison: block 0 the engine's way (BlockWeights.load: drawn or read on the host)
    result["host_load_block0_s"] = time.perf_counter() - start
    weights.release(0)
    start = time.perf_counter()
    result["blocks_drawn"] = draw_blocks(model, weights, range(count), check.device)
    result["draw_s"] = time.perf_counter() - start
    delattr(model, ATTRIBUTE)  # now an ordinary model in host memory: the engine moves each block in and out
    result["num_blocks"] = count
    check.log(f"  {config['model']}: skeleton {result['load_s']:.1f} s, {count} blocks "
              f"{result['blocks_drawn']} in {result['draw_s']:.1f} s")
    ids = calibration_tokens(loaded, config["nsamples"], config["seqlen"], 0)
    estimate = check_memory(model, config["nsamples"], config["seqlen"], check.device)
    result["memory_estimate_gib"] = estimate
    save()

    def refresh(indices):
        begin = time.perf_counter()
        draw_blocks(model, weights, indices, check.device)
        return time.perf_counter() - begin

    for method in config["methods"]:
        if check.left() < 20:
            result["one_block"][method] = {"status": f"skipped: budget ({check.left():.0f} s left)"}
            continue
        try:
            run = time_blocks(check, model, method, ids, 1, check.deadline)
        except Exception as exc:  # noqa: BLE001 - one method's failure must not cost the others
            run = _failed(exc)
        run["refresh_s"] = refresh([0])
        result["one_block"][method] = run
        check.log(f"  {method} one block: {_describe(run)}")
        save()
    for method in config["methods"]:
        one = result["one_block"].get(method, {})
        if "wall_s" not in one:
            result["all_blocks"][method] = {"status": "skipped: no one-block timing"}
            continue
        # capture (and block 0's move in), then every block like block 0's visit (which includes warm-ups: an
        # over-estimate), with a margin for moving each block in; and the refresh after
        predicted = ((one.get("first_visit_at_s") or 0) + count * one["per_block"][0]["visit_s"] * 1.2
                     + one.get("refresh_s", 0) * count)
        left = check.left() - 10
        if predicted > left:
            result["all_blocks"][method] = {"status": f"skipped: predicted {predicted:.0f} s (one block's "
                                                      f"visit {one['per_block'][0]['visit_s']:.1f} s x {count} "
                                                      "blocks, the capture and the refresh) "
                                                      f"> {max(left, 0):.0f} s left", "predicted_s": predicted}
            check.log(f"  {method} all blocks: " + result["all_blocks"][method]["status"])
            save()
            continue

        def on_block(per_block, method=method):
            result["all_blocks"][method] = {"status": "running", "per_block": per_block}
            if len(per_block) % 8 == 0:
                save()

        try:
            run = time_blocks(check, model, method, ids, None, check.deadline - 10, on_block)
        except Exception as exc:  # noqa: BLE001
            run = {**_failed(exc), "per_block": result["all_blocks"].get(method, {}).get("per_block", [])}
        run["predicted_s"] = predicted
        result["all_blocks"][method] = run
        check.log(f"  {method} all blocks: {_describe(run)}")
        save()
        if check.left() > 20 and method != config["methods"][-1]:
            result["all_blocks"][method]["refresh_s"] = refresh(range(count))
    bound = (estimate["activations_gib"] + estimate["block_gib"])
    peaks = [run["peak_max_gib"] for group in ("one_block", "all_blocks") for run in result[group].values()
             if isinstance(run, dict) and run.get("peak_max_gib") is not None]
    result["peak_within_estimate"] = None if not peaks else max(peaks) <= bound
    result["estimate_bound_gib"] = bound
    done = [m for m in config["methods"] if result["all_blocks"].get(m, {}).get("status") == "ok"]
    result["status"] = "ok" if len(done) == len(config["methods"]) else f"partial: all blocks done for {done}"
    return result


# -- the summary -------------------------------------------------------------------------------------------------
def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_summary(check: Check) -> str:
    lines = [f"# GPU check ({'dry run, ' if check.dry_run else ''}{check.device})", "",
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, {time.perf_counter() - check.start:.0f} s "
             f"since the start. Files: {', '.join([*FILES.values(), TESTS_LOG, LOG])}.", "",
             "| part | status | seconds |", "|---|---|---:|"]
    for part in PARTS:
        result = check.results.get(part)
        if result is None:
            lines.append(f"| {part} | not run (yet) | |")
        else:
            status = str(result.get("status")).replace("|", "/")
            lines.append(f"| {part} | {status} | {_fmt(result.get('part_s'), 1)} |")
    env = check.results.get("environment", {})
    if "torch" in env:
        gpu = env.get("gpu")
        gpu_text = (gpu if isinstance(gpu, str) else
                    f"{gpu['name']}, {gpu['memory_gib']:.0f} GiB, sm {gpu['capability']}")
        lines += ["", "## environment", "",
                  f"torch {env['torch']} (CUDA {env['cuda_build']}, cuDNN {env['cudnn']}), Triton {env['triton']}, "
                  f"transformers {env['transformers']}; GPU: {gpu_text}.",
                  f"cuSPARSELt: available {env['cusparselt_available']} (version {env['cusparselt_version']}), "
                  f"smoke test: {env['cusparselt_smoke']['reason']}. CUTLASS: {env['cutlass_smoke']['reason']}.",
                  f"Missing packages: {', '.join(env['missing_packages']) or 'none'}."]
    kernel = check.results.get("triton_kernel", {})
    if "layers" in kernel:
        sc = kernel.get("self_check", {})
        lines += ["", "## fused SparseGPT kernel", "",
                  f"Self-check: {sc.get('kernel', sc.get('status'))}: {sc.get('reason')}. "
                  f"Compared: {kernel['kernel']}.",
                  "", "| layer | pattern | mask overlap | error (kernel) | error (loop) | kernel s | loop s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in kernel["layers"]:
            lines.append(f"| {row['layer']} {row['shape']} | {row['pattern']} | {_fmt(row.get('mask_overlap'), 5)} | "
                         f"{_fmt(row.get('error'), 5)} | {_fmt(row.get('error_torch'), 5)} | "
                         f"{_fmt(row.get('kernel_s'), 3) if 'kernel_s' in row else row.get('kernel', '-')} | "
                         f"{_fmt(row.get('torch_s'), 3)} |")
    sparse = check.results.get("sparse24", {})
    if sparse.get("rows"):
        tokens = sorted({row["tokens"] for row in sparse["rows"]})
        table: dict[tuple, dict] = {}
        for row in sparse["rows"]:
            cell = ("-" if not isinstance(row["agree"], bool) else
                    f"{row['speedup']:.2f}" + ("" if row["agree"] else " (differs)"))
            table.setdefault((row["shape"], row["dtype"], row["backend"]), {})[row["tokens"]] = cell
        reasons = sorted({str(row["agree"]) for row in sparse["rows"] if not isinstance(row["agree"], bool)})
        lines += ["", "## 2:4 matmul (x @ W^T): speed-up over dense by token count", "",
                  f"Backends: {sparse['backends']}." + (f" Not run ('-'): {'; '.join(reasons)}." if reasons else ""),
                  "",
                  "| shape | dtype | backend | " + " | ".join(str(t) for t in tokens) + " |",
                  "|---|---|---|" + "---:|" * len(tokens)]
        for (shape, dtype, backend), cells in table.items():
            lines.append(f"| {shape} | {dtype} | {backend} | " + " | ".join(cells.get(t, "") for t in tokens) + " |")
    tests = check.results.get("gpu_tests", {})
    if "command" in tests:
        lines += ["", "## gpu tests", "", f"`{tests['command']}`: {tests.get('last_line')}"]
        lines += [f"- {line}" for line in tests.get("failures", [])[:30]]
    speed = check.results.get("speed", {})
    if "one_block" in speed:
        lines += ["", f"## speed: {speed['model']} {speed['dtype']}, {speed['nsamples']} x {speed['seqlen']} "
                      f"on {speed['device']}", "",
                  f"Blocks {speed.get('blocks_drawn')} ({_fmt(speed.get('draw_s'), 1)} s for "
                  f"{speed.get('num_blocks')}; block 0 the engine's way, BlockWeights.load on the host: "
                  f"{_fmt(speed.get('host_load_block0_s'))} s; skeleton and head {_fmt(speed.get('load_s'), 1)} s). "
                  "check_memory's "
                  f"bound: {_fmt(speed.get('estimate_bound_gib'), 3)} GiB; peaks within it: "
                  f"{speed.get('peak_within_estimate')}.", "",
                  "| method | one block s | its peak GiB | all blocks s | blocks | max peak GiB | status |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for method in check.config["methods"]:
            one, every = speed["one_block"].get(method, {}), speed["all_blocks"].get(method, {})
            lines.append(f"| {method} | {_fmt(one.get('wall_s'))} | {_fmt(one.get('peak_max_gib'))} | "
                         f"{_fmt(every.get('wall_s'), 1)} | {every.get('blocks', '-')} | "
                         f"{_fmt(every.get('peak_max_gib'))} | {every.get('status', one.get('status', '-'))} |")
        sparsegpt_run = speed["all_blocks"].get("sparsegpt", speed["one_block"].get("sparsegpt", {}))
        kernel_used = sparsegpt_run.get("sparsegpt_kernel")
        if kernel_used:
            lines += ["", f"SparseGPT's column loop: {kernel_used.get('kernel')} ({kernel_used.get('reason', '')})."]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------------------------
RUNNERS = {"environment": part_environment, "triton_kernel": part_triton_kernel, "sparse24": part_sparse24,
           "gpu_tests": part_gpu_tests, "speed": part_speed}
NEEDS = {"triton_kernel": 20, "sparse24": 20, "gpu_tests": 40, "speed": 30}  # seconds a part needs to start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                        help="folder for the results (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, for a CPU (tests/test_gpu_check.py)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole check (default 450; 600 with --dry-run)")
    parser.add_argument("--model", default=None, help="override the model (default random:llama-2-7b, "
                        "random:tiny-llama with --dry-run)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    config = dict(DRY if args.dry_run else FULL)
    if args.model:
        config["model"] = args.model
    check = Check(args.out, config, args.dry_run, args.budget_s or config["budget"])
    check.log(f"gpu_check: {'dry run, ' if args.dry_run else ''}device {check.device}, parts {parts}, "
              f"budget {check.left():.0f} s, out {args.out}")
    if not check.cuda and not args.dry_run:
        check.log("no CUDA device is visible: the parts that need one say so (use --dry-run for tiny shapes)")
    for part in PARTS:
        if part not in parts:
            continue
        if check.left() < NEEDS.get(part, 0):
            check.save(part, {"status": f"skipped: budget ({check.left():.0f} s left)", "part_s": 0.0})
            check.summary()
            continue
        check.log(f"{part} ...")
        start = time.perf_counter()
        try:
            result = RUNNERS[part](check)
        except Exception as exc:  # noqa: BLE001 - one part's failure must not cost the others
            result = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                      "traceback": traceback.format_exc()[-4000:]}
            partial = check.results.get(part)
            if partial:
                result["partial"] = partial
        result["part_s"] = time.perf_counter() - start
        check.save(part, result)
        check.summary()
        check.log(f"{part}: {result['status']} ({result['part_s']:.1f} s)")
    check.summary()
    check.log(f"done in {time.perf_counter() - check.start:.1f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
