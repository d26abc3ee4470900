"""Where a sweep's runs happen: in this process (local), as Ray tasks (ray), or as Slurm jobs (slurm).

An executor takes RunSpecs and yields an Outcome per run as each finishes. Workers only run and
return the record as a dict; the driver (runner.py) alone appends to the results file, so lines
are never torn or duplicated by concurrent writers, and a run whose worker dies leaves nothing.
Ray and submitit are optional and imported only here, only when asked for.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UsageError
from ..spec import RunSpec

EXECUTORS = ("local", "ray", "slurm")


@dataclass
class Outcome:
    spec: RunSpec
    record: dict | None  # None: the run failed and recorded nothing
    problem: str = ""  # one line when it failed
    retryable: bool = True  # bad input (UsageError) fails the same way every time
    seconds: float = 0.0


@dataclass
class ExecutorOptions:
    """What the command line says about where runs go; checked before any work (`check`)."""

    name: str = "local"
    ray_address: str | None = None
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None
    partition: str | None = None
    time: str | None = None  # Slurm time limit: minutes, H:MM:SS or D-HH:MM:SS
    array_parallelism: int | None = None  # at most this many array tasks at once
    folder: str | None = None  # submitit's logs and pickles
    max_retries: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def timeout_min(self) -> int:
        return parse_time(self.time) if self.time else 60


def parse_time(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", str(text).strip())
    if not match:
        raise UsageError(f"--time {text!r}: give minutes (90), H:MM:SS (1:30:00) or D-HH:MM (1-00:00)")
    days, rest = match.groups()
    parts = [int(p) for p in rest.split(":")]
    if days is None:  # M, M:S, H:M:S
        units = {1: [60], 2: [60, 1], 3: [3600, 60, 1]}[len(parts)]
        seconds = sum(p * u for p, u in zip(parts, units))
    else:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + sum(p * u for p, u in zip(parts, [3600, 60, 1]))
    if seconds <= 0:
        raise UsageError(f"--time {text!r} is zero; give a positive time limit")
    return -(-seconds // 60)


def check(options: ExecutorOptions) -> None:
    """Refuse a bad executor or an option that does not apply to it, in one line, before any run."""
    name = options.name
    if name not in EXECUTORS:
        raise UsageError(f"--executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    only = {"--ray-address": ("ray", options.ray_address),
            "--partition": ("slurm", options.partition), "--time": ("slurm", options.time),
            "--array-parallelism": ("slurm", options.array_parallelism), "--slurm-folder": ("slurm", options.folder)}
    for flag, (owner, value) in only.items():
        if value is not None and name != owner:
            raise UsageError(f"{flag} applies to --executor {owner}, not {name}")
    for flag, value in (("--cpus-per-run", options.cpus_per_run), ("--gpus-per-run", options.gpus_per_run)):
        if value is not None and name == "local":
            raise UsageError(f"{flag} applies to --executor ray or slurm; local runs use this process")
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be zero or more, not {value:g}")
    if options.cpus_per_run is not None and options.cpus_per_run == 0:
        raise UsageError("--cpus-per-run must be more than zero")
    if name == "slurm":
        for flag, value in (("--cpus-per-run", options.cpus_per_run), ("--gpus-per-run", options.gpus_per_run)):
            if value is not None and value != int(value):
                raise UsageError(f"{flag} {value:g}: Slurm takes whole CPUs and GPUs")
    if options.array_parallelism is not None and options.array_parallelism < 1:
        raise UsageError("--array-parallelism must be at least 1")
    if options.max_retries < 0:
        raise UsageError(f"--max-retries must be zero or more, not {options.max_retries}")
    if options.time is not None:
        parse_time(options.time)
    if name == "ray":
        _require("ray", "--executor ray", "pip install 'oneshot[ray]'")
    if name == "slurm":
        _require("submitit", "--executor slurm", "pip install 'oneshot[slurm]'")
        if shutil.which("sbatch") is None:
            raise UsageError("--executor slurm needs Slurm's sbatch on PATH (this machine has none); "
                             "run the sweep on a Slurm login node, or use --executor local or ray")
        if options.partition and shutil.which("sinfo"):
            import subprocess

            listed = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
            names = [name.rstrip("*") for name in listed.stdout.split()]
            if listed.returncode == 0 and names and options.partition not in names:
                raise UsageError(f"--partition {options.partition!r}: this cluster has {', '.join(names)}")


def _require(module: str, what: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs the {module} package: {install}")


# ---- the worker side: one grid point, returning its record ----------------------------------------

_WORKER_MODELS = None  # a worker process keeps each model it loaded, as the local loop does


def run_in_worker(spec: RunSpec, keep_models: bool = True, verbose: bool = False) -> tuple[dict | None, str, bool, float]:
    """Run one grid point where the executor placed it: (record dict or None, failure line, retryable,
    seconds). Nothing is written here: the record travels back to the driver."""
    import logging

    from .work import Models, run_spec

    global _WORKER_MODELS
    if _WORKER_MODELS is None or _WORKER_MODELS.keep != keep_models:
        _WORKER_MODELS = Models(keep=keep_models)
    if not verbose:
        logging.getLogger("oneshot").setLevel(logging.WARNING)
    began = time.perf_counter()
    record, problem, retryable = run_spec(spec.replace(progress=False), _WORKER_MODELS)
    return record, problem, retryable, time.perf_counter() - began


Work = Callable[..., tuple]


# ---- executors ------------------------------------------------------------------------------------

class LocalExecutor:
    """Today's loop: one run after another in this process, each model loaded once."""

    parallel = False

    def __init__(self, options: ExecutorOptions, keep_models: bool, verbose: bool, run_one: Work | None = None):
        from .work import Models, run_spec

        self.models, self.verbose = Models(keep=keep_models), verbose
        self.run_one = run_one or run_spec

    def run(self, specs: list[RunSpec], started: Callable[[RunSpec], None]) -> Iterator[Outcome]:
        for spec in specs:
            started(spec)
            began = time.perf_counter()
            record, problem, retryable = self.run_one(spec.replace(progress=self.verbose), self.models)
            yield Outcome(spec, record, problem, retryable, time.perf_counter() - began)

    def close(self) -> None:
        pass


class RayExecutor:
    """Each grid point a Ray task on a cluster (`--ray-address`) or on a local one started here."""

    parallel = True

    def __init__(self, options: ExecutorOptions, keep_models: bool, verbose: bool, work: Work | None = None):
        import ray

        self.ray, self.keep, self.verbose = ray, keep_models, verbose
        root = str(Path(__file__).resolve().parents[2])  # so workers import this checkout's oneshot
        runtime_env = {"env_vars": {"PYTHONPATH": root, "TOKENIZERS_PARALLELISM": "false"}}
        self.started_here = not ray.is_initialized()
        if self.started_here:
            kwargs = dict(runtime_env=runtime_env, include_dashboard=False, log_to_driver=verbose,
                          logging_level="ERROR", configure_logging=True)
            try:
                if options.ray_address:
                    ray.init(address=options.ray_address, **kwargs)
                else:  # a local cluster for this sweep: small object store, as records are small
                    ray.init(object_store_memory=128 * 2**20, **kwargs)
            except Exception as exc:  # noqa: BLE001 - ray raises many kinds; one line says which address failed
                where = f"--ray-address {options.ray_address}" if options.ray_address else "a local Ray instance"
                raise UsageError(f"could not start or join {where}: {_first_line(exc)}") from None
        resources = {"num_cpus": 1 if options.cpus_per_run is None else options.cpus_per_run,
                     "num_gpus": options.gpus_per_run or 0}
        # Ray's own retries are off: a dead worker comes back here, is reported, and the driver retries.
        self.task = ray.remote(max_retries=0, **resources)(work or run_in_worker)

    def run(self, specs: list[RunSpec], started: Callable[[RunSpec], None]) -> Iterator[Outcome]:
        ray = self.ray
        pending = {self.task.remote(spec, self.keep, self.verbose): spec for spec in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    record, problem, retryable, seconds = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died, or the task could not run
                    yield Outcome(spec, None, _worker_failure(exc), True)
                    continue
                yield Outcome(spec, record, problem, retryable, seconds)

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


class SlurmExecutor:
    """The grid points as one Slurm array job through submitit; results come back through its pickles."""

    parallel = True
    poll_s = 2.0

    def __init__(self, options: ExecutorOptions, keep_models: bool, verbose: bool, folder: Path,
                 work: Work | None = None):
        import submitit

        self.submitit, self.keep, self.verbose, self.work = submitit, keep_models, verbose, work or run_in_worker
        self.executor = submitit.AutoExecutor(folder=str(options.folder or folder), cluster="slurm")
        root = str(Path(__file__).resolve().parents[2])
        parameters = dict(timeout_min=options.timeout_min, name="oneshot-sweep",
                          cpus_per_task=int(options.cpus_per_run or 1),
                          slurm_setup=[f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}",
                                       "export TOKENIZERS_PARALLELISM=false"])
        if options.partition:
            parameters["slurm_partition"] = options.partition
        if options.gpus_per_run:
            parameters["slurm_gpus_per_task"] = int(options.gpus_per_run)
        if options.array_parallelism:
            parameters["slurm_array_parallelism"] = options.array_parallelism
        self.executor.update_parameters(**parameters)

    def run(self, specs: list[RunSpec], started: Callable[[RunSpec], None]) -> Iterator[Outcome]:
        n = len(specs)
        try:
            jobs = self.executor.map_array(self.work, specs, [self.keep] * n, [self.verbose] * n)
        except Exception as exc:  # noqa: BLE001 - sbatch refused the array (a bad partition, a limit)
            raise UsageError(f"Slurm refused the job array: {_first_line(exc)}") from None
        pending = dict(zip(jobs, specs))
        try:
            while pending:
                finished = [job for job in pending if job.done()]
                if not finished:
                    time.sleep(self.poll_s)
                    continue
                for job in finished:
                    spec = pending.pop(job)
                    try:
                        record, problem, retryable, seconds = job.result()
                    except Exception as exc:  # noqa: BLE001 - a failed or killed job (timeout, node loss, OOM)
                        yield Outcome(spec, None, _worker_failure(exc, f"Slurm job {job.job_id}"), True)
                        continue
                    yield Outcome(spec, record, problem, retryable, seconds)
        except BaseException:  # Ctrl-C: do not leave jobs queued behind us
            for job in pending:
                try:
                    job.cancel(check=False)
                except Exception:  # noqa: BLE001
                    pass
            raise

    def close(self) -> None:
        pass


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines and "sbatch" in str(exc) else lines[0] if lines else type(exc).__name__)[:300]


def _worker_failure(exc: BaseException, where: str = "the worker") -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{where} failed or died ({type(exc).__name__}{': ' + first[:200] if first else ''})"


def make_executor(options: ExecutorOptions, keep_models: bool, verbose: bool, results: Path, run_one: Work | None = None):
    """`run_one(spec, models)` is what the local loop calls (the runner passes its own, which tests patch)."""
    if options.name == "ray":
        return RayExecutor(options, keep_models, verbose)
    if options.name == "slurm":
        return SlurmExecutor(options, keep_models, verbose, folder=results.parent / "slurm")
    return LocalExecutor(options, keep_models, verbose, run_one)
