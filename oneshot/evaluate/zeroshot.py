"""Zero-shot accuracy through lm-eval (0.4.x), on the model in memory: it is never saved to disk.

    from oneshot.evaluate.zeroshot import prepare_tasks, evaluate_zeroshot
    tasks = prepare_tasks("offline")               # check names and load data before any model work
    result = evaluate_zeroshot(model, tokenizer, tasks, limit=100)
    result["tasks"]["wiki_offline_describe"]["acc"], result["mean_acc"]

Named suites: `wanda` (the Wanda paper's seven tasks), `sparsegpt` (the SparseGPT paper's; the
StoryCloze data needs a manual download, so it is skipped with a note when missing) and `offline`
(built from the embedded Wikipedia text; see offline_tasks.py). acc, acc_norm and their stderr
are taken from lm-eval's results as it computes them; mean_acc is the unweighted mean of acc.

Pitfalls handled here:
- `HFLM(pretrained=model)` calls `model.tie_weights()`, which re-ties lm_head to the input
  embeddings when `tie_word_embeddings` is set. We make that call a no-op for the duration, and
  check afterwards that every parameter is the same tensor, unmodified, as before.
- HFLM ignores `device`/`dtype` for a model object (it uses `model.device`): the caller's model
  is moved to the device here, and its dtype is left alone.
- `batch_size="auto"` probes from 64 down and is slow on CPU: the default is a fixed 8 on CPU.
- Offline, datasets/lm-eval retry the Hub for 25-50 s unless HF_HUB_OFFLINE/HF_DATASETS_OFFLINE
  are set before they load anything: `configure_offline` sets them (and patches the already
  imported modules), and a Hub task that is not cached then fails at once, in one line.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import math
import sys
from dataclasses import dataclass, field

from ..errors import UsageError, require
from . import offline_tasks

SUITES: dict[str, tuple[str, ...]] = {
    "wanda": ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"),
    "sparsegpt": ("lambada_openai", "piqa", "arc_easy", "arc_challenge", "storycloze_2016"),
    "offline": offline_tasks.TASKS,
}
# Tasks a suite includes only where their data can be had (StoryCloze is a manual download).
OPTIONAL_IN_SUITES = {"storycloze_2016"}
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 32}
METRIC_ORDER = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
OFFLINE_HINT = "use --eval-tasks offline (built from the embedded Wikipedia text)"


class ZeroShotError(UsageError):
    """A task list that cannot be evaluated; the message is one line that says what to change."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ---- task names ------------------------------------------------------------------------------

def parse_task_spec(spec: str | None) -> list[str]:
    """'SUITE' or 'task[,task...]' (suites may be mixed in) -> task names, in order, without repeats.
    '' and 'none' mean no tasks. Only the syntax is checked here; names are checked by prepare_tasks."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return []
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise ZeroShotError(f"empty task name in --eval-tasks {spec!r}")
        for name in SUITES.get(item.lower(), (item,)):
            if name not in names:
                names.append(name)
    return names


def _optional_names(spec: str) -> set[str]:
    """Tasks that came in only through a suite and may be skipped when their data is missing."""
    items = [part.strip() for part in spec.split(",")]
    return {name for name in OPTIONAL_IN_SUITES if name not in items}


# ---- offline mode ----------------------------------------------------------------------------

def configure_offline(force: bool = False) -> bool:
    """Switch datasets/huggingface_hub to the local cache when the Hub is unreachable (or `force`).
    Call it before lm-eval or datasets load anything; returns whether we are offline."""
    from calibration.hub import (  # one shared probe per process
        env_offline,
        go_offline,
        hub_reachable,
    )

    offline = force or env_offline() or not hub_reachable()
    if offline:
        go_offline()
    return offline


# ---- preparing tasks (before any model work) ---------------------------------------------------

@dataclass
class PreparedTasks:
    spec: str
    names: list[str]  # what will be evaluated, in order (leaf tasks and groups as named)
    manager: object  # lm_eval TaskManager
    loaded: list  # lm-eval Task/Group objects, data loaded
    skipped: dict[str, str] = field(default_factory=dict)  # optional task -> why it was left out
    offline_dir: str | None = None


def _require_lm_eval() -> None:
    require("lm_eval", "zero-shot evaluation", "eval", "lm-eval")
    require("datasets", "zero-shot evaluation", "eval")


def _quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs every task it builds at WARNING; keep our stderr readable (for the process)."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(level)


def prepare_tasks(spec: str, offline: bool | None = None) -> PreparedTasks:
    """Resolve names, build the offline suite if needed, and load every task's data now, so that an
    unknown task or missing data fails in one line before a model is loaded or pruned."""
    names = parse_task_spec(spec)
    if not names:
        raise ZeroShotError("no zero-shot tasks given")
    _require_lm_eval()
    if offline is None:
        offline = configure_offline()
    optional = _optional_names(spec)
    wants_offline = [n for n in names if n in offline_tasks.TASKS]
    wants_other = [n for n in names if n not in offline_tasks.TASKS]
    directory = offline_tasks.task_directory() if wants_offline else None

    manager = _task_manager(str(directory) if directory else None, bool(wants_other))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        suites = ", ".join(SUITES)
        raise ZeroShotError(f"unknown zero-shot task {unknown[0]!r}: give a suite ({suites}) or lm-eval task "
                            "names separated by commas (`lm-eval ls tasks` lists them)")
    loaded, kept, skipped = [], [], {}
    for name in names:
        try:
            loaded.append(_load_one(manager, name))
            kept.append(name)
        except Exception as exc:  # datasets raises many kinds (connection, file not found, manual data)
            reason = _load_failure(name, exc, offline, _dataset_of(manager, name))
            if name in optional:
                skipped[name] = reason
                continue
            raise ZeroShotError(f"{reason}; {OFFLINE_HINT}") from None
    return PreparedTasks(spec, kept, manager, loaded, skipped, str(directory) if directory else None)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    """lm-eval's task index, built once per process: scanning the built-in tasks takes ~8 s, and
    the offline tasks alone need none of it."""
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _load_one(manager, name: str):
    with _redirect_output(quiet=True):
        built = manager.load([name])
    objects = list(built.get("groups", {}).values()) or list(built["tasks"].values())
    # A group is passed whole (it aggregates its children); a tag is a flat list of tasks.
    if built.get("groups"):
        return [g for g in objects if g.name == name] or objects
    return list(built["tasks"].values())


def _dataset_of(manager, name: str) -> str | None:
    """The Hub dataset a task reads (its YAML's dataset_path), for error messages; None if unknown."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = manager.task_index[name]
        config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else (entry.cfg or {})
        return config.get("dataset_path")
    except Exception:  # private API of lm-eval; the message is still clear without the name
        return None


def _load_failure(name: str, exc: Exception, offline: bool, dataset: str | None) -> str:
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if offline and ("offline" in detail.lower() or isinstance(exc, ConnectionError)):
        what = f"dataset {dataset}" if dataset else "its data"
        return (f"zero-shot task {name} needs {what} from the Hugging Face Hub, which is unreachable from here, "
                "and it is not in the local cache")
    return f"could not load the data of zero-shot task {name} ({detail})"


# ---- evaluation ------------------------------------------------------------------------------

def default_batch_size(device: str) -> int:
    return DEFAULT_BATCH_SIZE["cuda" if str(device).startswith("cuda") else "cpu"]


def parameter_fingerprint(model) -> dict:
    """Identity of every parameter and buffer (tied names included): storage, dtype, device, shape and
    autograd version. Re-tying, replacing, moving or writing a weight in place changes it."""
    import torch

    found = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        found[name] = (tensor.data_ptr(), tensor.dtype, str(tensor.device), tuple(tensor.shape),
                       tensor._version if isinstance(tensor, torch.Tensor) else None)
    return found


@contextlib.contextmanager
def _no_retie(model):
    """Make model.tie_weights() a no-op: HFLM calls it, and it must not change the pruned model."""
    had_own = "tie_weights" in vars(model)
    previous = vars(model).get("tie_weights")
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had_own:
            model.tie_weights = previous
        else:
            del model.tie_weights


@contextlib.contextmanager
def _no_git_hash():
    """simple_evaluate records `git describe` of the working directory (not of the model), and git
    prints "fatal: not a git repository" straight to the terminal outside one: skip it."""
    import lm_eval.evaluator as evaluator

    previous = getattr(evaluator, "get_git_commit_hash", None)
    if previous is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if previous is not None:
            evaluator.get_git_commit_hash = previous


@contextlib.contextmanager
def _redirect_output(quiet: bool):
    """lm-eval prints to stdout (bootstrap notes) and draws bars on stderr: keep our stdout for our
    table; with quiet, drop both."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink if quiet else sys.stderr):
        if quiet:
            with contextlib.redirect_stderr(sink):
                yield
        else:
            yield


def evaluate_zeroshot(model, tokenizer, tasks: PreparedTasks | str, *, device: str = "cpu",
                      batch_size: int | str | None = None, limit: int | None = None,
                      progress: bool = True) -> dict:
    """Run the prepared tasks on the in-memory model; returns
    {"tasks": {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, ..., "n": docs}}, "mean_acc", ...}.
    The model is moved to `device` (and left there); its weights are never changed or saved."""
    if isinstance(tasks, str):
        tasks = prepare_tasks(tasks)
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ZeroShotError(f"zero-shot evaluation needs a Hugging Face tokenizer, not {type(tokenizer).__name__} "
                            "(random:<preset> models read bytes); use a real model")
    _quiet_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    batch_size = batch_size or default_batch_size(device)
    model.to(device)  # HFLM uses model.device and ignores its own device argument for a model object
    before = parameter_fingerprint(model)
    was_training = model.training
    try:
        with _redirect_output(quiet=not progress), _no_retie(model), _no_git_hash():
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer),  # HFLM may add a pad token
                      batch_size=batch_size, device=str(device))
            raw = lm_eval.simple_evaluate(model=lm, tasks=[t for group in tasks.loaded for t in group],
                                          task_manager=tasks.manager, limit=limit, log_samples=False)
    finally:
        model.train(was_training)
    after = parameter_fingerprint(model)
    if after != before:
        changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
        raise RuntimeError(f"lm-eval changed the model's parameters ({', '.join(changed[:5])}); this is a bug")
    return summarise(raw, tasks, limit=limit, batch_size=batch_size)


def summarise(raw: dict, tasks: PreparedTasks, limit=None, batch_size=None) -> dict:
    """lm-eval's results -> our record: metrics per task as lm-eval computed them, plus mean acc."""
    results = raw.get("results", {})
    samples = raw.get("n-samples", {})
    groups = set(raw.get("groups", {}))
    per_task = {}
    for name, values in results.items():
        if name in groups:
            continue
        metrics = {}
        for key, value in values.items():
            if "," not in key:
                continue  # alias, sample_len and other labels
            metric, filter_name = key.split(",", 1)
            if filter_name != "none":
                metric = f"{metric}/{filter_name}"
            metrics[metric] = _number(value)
        ordered = {k: metrics.pop(k) for k in METRIC_ORDER if k in metrics}
        ordered.update(sorted(metrics.items()))
        if name in samples:
            ordered["n"] = int(samples[name].get("effective", 0))
        per_task[name] = ordered
    accs = [m["acc"] for m in per_task.values() if isinstance(m.get("acc"), float)]
    record = {
        "suite": tasks.spec,
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "limit": limit,
        "batch_size": batch_size,
        "lm_eval_version": _lm_eval_version(),
    }
    if groups:
        record["groups"] = {g: {k.split(",")[0]: _number(v) for k, v in raw["groups"][g].items() if "," in k}
                            for g in groups}
    if tasks.skipped:
        record["skipped"] = dict(tasks.skipped)
    if tasks.offline_dir:
        record["offline_tasks_dir"] = tasks.offline_dir
    return record


def _number(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        return value if math.isfinite(value) else None
    return None  # lm-eval writes "N/A" where it has no stderr


def _lm_eval_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lm-eval")
    except metadata.PackageNotFoundError:
        return None


def format_table(record: dict) -> list[str]:
    """A short per-task table: task, n, acc, acc_norm (± stderr) and any other metric."""
    rows = [["task", "n", "acc", "acc_norm", "other"]]

    def fmt(metrics, key):
        value = metrics.get(key)
        if value is None:
            return "-"
        err = metrics.get(f"{key}_stderr")
        return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    for name, metrics in record["tasks"].items():
        others = [f"{k} {v:.3f}" for k, v in metrics.items()
                  if k not in METRIC_ORDER and k != "n" and not k.endswith("_stderr") and v is not None]
        rows.append([name, str(metrics.get("n", "")), fmt(metrics, "acc"), fmt(metrics, "acc_norm"),
                     ", ".join(others) or "-"])
    if record.get("mean_acc") is not None:
        rows.append(["mean", "", f"{record['mean_acc']:.4f}", "", ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for name, why in record.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return lines
