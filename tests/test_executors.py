"""`oneshot sweep --executor ray|slurm`: the same records as the local loop, one whole line per run written by
the driver alone, and a run whose worker dies retried (or reported), never half-recorded.

The Slurm test needs a running cluster and never starts one (that takes root and writes /etc/slurm): `.ci/run`
starts `scripts/slurm-single-node.sh`; where no controller answers, the test skips and says why."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from oneshot import cli
from oneshot.sweep import executors

from helpers import TINY_SWEEP

pytestmark = pytest.mark.system  # a real local Ray instance, a real Slurm cluster

CONFIG = TINY_SWEEP.format(methods="[magnitude, wanda]", patterns="[unstructured]", sparsities="[0.5]")
# What differs between two runs of the same settings anywhere: when, how long, how much memory, on what.
VARYING = {"timings", "peak_memory_gib", "finished_at", "device", "threads"}  # threads: the worker's CPUs


def records(path):
    rows = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert len({r["run_key"] for r in rows}) == len(rows), "a run was recorded twice"
    return {r["run_key"]: {k: v for k, v in r.items() if k not in VARYING} for r in rows}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "sweep.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def local_records(config):
    results = config.parent / "local.jsonl"
    assert cli.main(["sweep", str(config), "--results", str(results)]) == 0
    return records(results)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray instance with two CPUs: two runs at a time, each in its own worker process."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_ray_workers_give_the_local_records_bitwise(config, local_records, ray_cluster, capsys):
    results = config.parent / "ray.jsonl"
    argv = ["sweep", str(config), "--results", str(results), "--executor", "ray", "--cpus-per-run", "1"]
    assert cli.main(argv) == 0
    assert "running on ray" in capsys.readouterr().out
    got = records(results)
    assert set(got) == set(local_records) and len(got) == 3
    for key, record in got.items():
        assert record == local_records[key]  # perplexity, sparsity per layer, config: all equal, bit for bit
    assert cli.main(argv) == 0  # everything recorded: nothing runs again
    assert "all 3 runs are already recorded" in capsys.readouterr().out
    assert len(results.read_bytes().splitlines()) == 3


def _dies_once(marker_dir, real):
    """A worker that dies (os._exit, as a killed or out-of-memory worker would) on wanda's first attempt."""
    def work(spec, keep_models=True, verbose=False):
        marker = Path(marker_dir) / f"died-{spec.method}"
        if spec.method == "wanda" and not marker.exists():
            marker.write_text("died")
            os._exit(1)
        return real(spec, keep_models, verbose)
    return work


@pytest.mark.parametrize("retries", [1, 0])
def test_a_dead_worker_is_reported_and_retried_never_half_recorded(retries, config, local_records, ray_cluster,
                                                                    tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "run_in_worker", _dies_once(str(tmp_path), executors.run_in_worker))
    results = tmp_path / "results.jsonl"
    status = cli.main(["sweep", str(config), "--results", str(results), "--executor", "ray",
                       "--max-retries", str(retries)])
    out = capsys.readouterr().out
    assert "wanda 0.5 ... FAILED" in out and "died" in out
    got = records(results)  # every line whole and each run once
    if retries:
        assert status == 0 and "retrying (1/1)" in out
        assert got == local_records
    else:
        assert status == 1 and "failed (not recorded; rerun to retry): random:tiny-llama wanda 0.5" in out
        assert sorted(r["method"] for r in got.values()) == ["dense", "magnitude"]
        assert cli.main(["sweep", str(config), "--results", str(results), "--executor", "ray"]) == 0  # resumes
        assert records(results) == local_records


START_SLURM = "sudo scripts/slurm-single-node.sh start (with Debian's slurm-wlm and munge installed)"


def _slurm_unavailable() -> str | None:
    """None when a Slurm controller answers and a node can take jobs; else why not, for the skip."""
    if shutil.which("sbatch") is None:
        return f"Slurm is not installed here (no sbatch on PATH): apt-get install slurm-wlm munge, then {START_SLURM}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        if "UP" not in ping.stdout:
            answer = " ".join((ping.stdout + ping.stderr).replace("*", " ").split())[-200:]
            return f"no Slurm controller answers `scontrol ping` ({answer}); start one: {START_SLURM}"
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Slurm does not answer ({exc}); start it: {START_SLURM}"
    states = nodes.stdout.split()
    if not any(state.rstrip("+") in ("idle", "mixed", "allocated", "completing") for state in states):
        return f"the Slurm controller is up but no node can take jobs (sinfo: {states or 'no nodes'})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running Slurm cluster (this test never starts one); where none answers, the test skips and says why."""
    pytest.importorskip("submitit")
    problem = _slurm_unavailable()
    if problem:
        pytest.skip(problem)


def test_slurm_array_job_gives_the_local_records(slurm_cluster, config, local_records, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert cli.main(["sweep", str(config), "--results", str(results), "--executor", "slurm", "--time", "10",
                     "--cpus-per-run", "1", "--slurm-folder", str(tmp_path / "jobs")]) == 0
    assert "running on slurm" in capsys.readouterr().out
    assert records(results) == local_records
    assert list((tmp_path / "jobs").glob("*_log.out")), "submitit wrote no job logs: did Slurm run the jobs?"
