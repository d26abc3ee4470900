"""benchmarks/gpu_check.py, the one prepared GPU check, run here in its --dry-run mode (tiny shapes, CPU):
every part writes its file with the keys the GPU run will fill, the summary lists every part, and what
needs CUDA says so. What would break the check on a GPU for a reason a CPU can see breaks here first."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
FILES = {"environment.json", "triton_kernel.json", "sparse24.json", "gpu_tests.json", "gpu_tests.txt", "speed.json",
         "summary.md", "log.txt"}
PARTS = ("environment", "triton_kernel", "sparse24", "gpu_tests", "speed")


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_part_writes_its_file_and_no_more(dry_run):
    names = {path.name for path in dry_run.iterdir()}
    assert names == FILES  # 8 files: the most the device tool brings back, and no temporary left over
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)
    for name in FILES - {"gpu_tests.txt", "summary.md", "log.txt"}:
        result = json.loads((dry_run / name).read_text())  # strict JSON: no NaN
        assert "status" in result and "part_s" in result, name
        assert not result["status"].startswith("failed"), (name, result.get("traceback", result["status"]))


def test_the_parts_have_the_keys_the_gpu_run_fills(dry_run):
    read = lambda name: json.loads((dry_run / name).read_text())  # noqa: E731
    env = read("environment.json")
    for key in ("torch", "cuda_build", "cudnn", "triton", "gpu", "cusparselt_available", "cusparselt_version",
                "cusparselt_smoke", "cutlass_smoke", "cutlass_semi_structured_class", "missing_packages"):
        assert key in env, key
    kernel = read("triton_kernel.json")
    assert "self_check" in kernel and kernel["kernel"]
    assert {(row["layer"], row["pattern"]) for row in kernel["layers"]} == {
        (layer, pattern) for layer in ("q_proj", "down_proj") for pattern in ("unstructured", "2:4")}
    for row in kernel["layers"]:
        for key in ("mask_overlap", "error", "error_torch", "torch_s", "kernel_s", "within_tolerance"):
            assert key in row, (key, row)
    sparse = read("sparse24.json")
    assert set(sparse["backends"]) == {"cusparselt", "cutlass"}
    assert {(row["dtype"], row["backend"]) for row in sparse["rows"]} == {
        (dtype, backend) for dtype in ("float16", "bfloat16") for backend in ("cusparselt", "cutlass")}
    for row in sparse["rows"]:
        assert row["dense_ms"] > 0 and set(row) >= {"shape", "tokens", "sparse_ms", "speedup", "agree"}
    tests = read("gpu_tests.json")
    assert tests["command"].startswith("python -m pytest -q -m gpu tests") and tests["returncode"] == 0
    assert tests["counts"].get("skipped", 0) + tests["counts"].get("passed", 0) > 0
    speed = read("speed.json")
    assert speed["blocks_drawn"] and speed["draw_s"] >= 0 and speed["memory_estimate_gib"]["block_gib"] > 0
    for method in ("magnitude", "wanda", "sparsegpt"):
        one, every = speed["one_block"][method], speed["all_blocks"][method]
        assert one["blocks"] == 1 and one["status"] == "ok"
        assert every["blocks"] == speed["num_blocks"] and every["status"] == "ok"
        for row in one["per_block"] + every["per_block"]:
            assert set(row) == {"block", "wall_s", "visit_s", "peak_gib"}
        assert 0.45 < every["sparsity"] < 0.55


def test_the_summary_lists_every_part(dry_run):
    summary = (dry_run / "summary.md").read_text()
    for part in PARTS:
        assert re.search(rf"^\| {part} \| (?!not run)", summary, re.M), part
    for heading in ("## environment", "## fused SparseGPT kernel", "## 2:4 matmul", "## gpu tests", "## speed"):
        assert heading in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA reports")
def test_without_cuda_the_cuda_parts_say_why(dry_run):
    read = lambda name: json.loads((dry_run / name).read_text())  # noqa: E731
    assert read("environment.json")["gpu"] == "skipped: no CUDA"
    assert read("triton_kernel.json")["status"].startswith("skipped: no CUDA")
    assert read("sparse24.json")["status"].startswith("skipped: no CUDA")
    assert all(row["agree"].startswith("skipped: no CUDA") for row in read("sparse24.json")["rows"])


def test_a_spent_budget_skips_parts_and_still_writes_them(tmp_path):
    _gpu_check().main(["--dry-run", "--out", str(tmp_path), "--budget-s", "1"])
    for part, name in (("triton_kernel", "triton_kernel.json"), ("speed", "speed.json")):
        assert json.loads((tmp_path / name).read_text())["status"].startswith("skipped: budget"), part
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {part} |" in summary for part in PARTS)


def test_blocks_drawn_by_the_check_are_the_lazy_draw():
    """draw_blocks (on the GPU in the real check) runs BlockWeights.load's recipe; on the CPU the two agree bitwise."""
    from transformers import AutoConfig

    from oneshot.models import block_weights, decoder_blocks
    from oneshot.models.lazy import random_model

    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    ours, theirs = (random_model(config, torch.float16, 3, keep_on_disk=True) for _ in range(2))
    how = _gpu_check().draw_blocks(ours, block_weights(ours), [0, 1], "cpu")
    assert "drawn on cpu" in how
    for index in (0, 1):
        block_weights(theirs).load(index)
        mine, want = decoder_blocks(ours)[index].state_dict(), decoder_blocks(theirs)[index].state_dict()
        assert mine.keys() == want.keys()
        for name, tensor in want.items():
            assert not mine[name].is_meta and mine[name].device.type == "cpu"
            assert torch.equal(mine[name], tensor), name
