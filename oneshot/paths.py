"""Where a run will write, checked before any work: kind, writability and collisions.

Every path a command writes (result directories, saved models, checkpoints, sweep results, report
files) is resolved and checked here before a model is loaded, so that a run never does all its work
and then fails to save it, and never writes over a file it reads or a file that is not its own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UsageError


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def _check_creatable(path: Path, flag: str, shown: str) -> None:
    """`path` does not exist: the nearest existing ancestor must be a writable directory."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {shown}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {shown}: cannot create it, {ancestor} is not writable; choose another path")


def output_dir(text, flag: str, overwrite: bool = False, overwrite_flag: str = "--overwrite",
               allow_existing: bool = False) -> Path:
    """A directory the run will create or fill: resolved, or UsageError naming the flag."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag} must be a directory path, not {text!r}")
    path = Path(text).expanduser().resolve()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {text} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {text} is not writable; choose another directory")
        if not allow_existing and not overwrite and any(path.iterdir()):
            raise UsageError(f"{flag} {text} already exists and is not empty; choose a new directory "
                             f"or pass {overwrite_flag}")
    else:
        _check_creatable(path, flag, text)
    return path


def output_file(text, flag: str) -> Path:
    """A file the run will create or replace."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag} must be a file path, not {text!r}")
    path = Path(text).expanduser().resolve()
    if path.exists():
        if path.is_dir():
            raise UsageError(f"{flag} {text} is a directory, not a file")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {text} is not writable")
    else:
        _check_creatable(path, flag, text)
    return path


def results_file(text, flag: str) -> Path:
    """A sweep's results file: new, empty, or one whose lines are JSON records (never another kind of file)."""
    path = output_file(str(text), flag)
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as handle:
            first = next((line for line in handle if line.strip()), b"")
        try:
            record = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or "run_key" not in record:
            raise UsageError(f"{flag} {text} exists and is not a sweep results file (its first line is not a "
                             "JSON record with a run_key); choose another path")
    return path


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_collisions(outputs: list[tuple[str, Path, bool]], inputs: list[tuple[str, Path]],
                     written: tuple[str, ...] = ("result.json",)) -> None:
    """Outputs (flag, directory, replaced_whole) must differ from each other. A `replaced_whole`
    output (a saved model, swapped into place) may hold no other output and no input; any other
    output may not be an input, nor hold one under the names it writes."""
    for i, (flag_a, a, whole_a) in enumerate(outputs):
        for flag_b, b, whole_b in outputs[i + 1:]:
            if a == b:
                raise UsageError(f"{flag_a} and {flag_b} must be different directories")
            if (whole_a and _inside(b, a)) or (whole_b and _inside(a, b)):
                raise UsageError(f"{flag_a} and {flag_b} must not lie one inside the other")
        for flag_in, source in inputs:
            clash = _inside(source, a) if whole_a else source in (a, *(a / name for name in written))
            if clash:
                raise UsageError(f"{flag_a} {a} would overwrite {flag_in} {source}, which this run reads; "
                                 "choose another directory")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_save_pretrained(directory: Path) -> None:
    """Give a directory tree the permissions a plain save would: 0777 / 0666 less the user's umask
    (temporary directories are created 0700, which a colleague on a shared machine cannot read)."""
    mask = umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def check_outputs(spec) -> None:
    """Every path a run writes, before any work: kind, writability, collisions with each other and
    with every file the run reads."""
    from .settings import spelled

    if spec.kind == "eval" and spec.save_model:
        raise UsageError("an eval run saves no model; leave out " + spelled("save_model"))
    outputs = []
    for key, whole in (("output", False), ("save_model", True)):
        value = getattr(spec, key)
        if value is not None:
            outputs.append((spelled(key), output_dir(value, spelled(key), spec.overwrite, spelled("overwrite")), whole))
    if spec.resume and not spec.checkpoint_dir:
        raise UsageError(f"{spelled('resume')} needs {spelled('checkpoint_dir')} (the directory of the run to continue)")
    if spec.checkpoint_dir is not None:
        directory = output_dir(spec.checkpoint_dir, spelled("checkpoint_dir"), allow_existing=True)
        state = directory / "state.json"
        if state.exists() and not spec.resume:
            raise UsageError(f"{spelled('checkpoint_dir')} {spec.checkpoint_dir} holds a checkpoint; pass "
                             f"{spelled('resume')} to continue it, or choose another directory")
        if spec.resume and not state.exists():
            raise UsageError(f"{spelled('resume')}: {spec.checkpoint_dir} holds no checkpoint (no state.json)")
        outputs.append((spelled("checkpoint_dir"), directory, False))
    check_collisions(outputs, input_paths(spec))


def input_paths(spec) -> list[tuple[str, Path]]:
    """The files and directories a run reads, resolved: the model, file:/tokens: sources."""
    from .settings import spelled

    found = []
    model = Path(spec.model).expanduser()
    if not spec.model.startswith("random:") and model.exists():
        found.append((spelled("model"), model.resolve()))
    sources = [(spelled("calibration.source"), spec.calibration.source)]
    if spec.recover is not None:
        sources.append((spelled("recover.train_data"), spec.recover.train_data))
    sources += [(spelled("eval.ppl"), source) for source in spec.eval.ppl]
    for flag, source in sources:
        for prefix in ("file:", "tokens:"):
            if isinstance(source, str) and source.startswith(prefix):
                found.append((flag, Path(source[len(prefix):]).expanduser().resolve()))
    return found


def cache_root() -> Path:
    """Where oneshot keeps what it builds once (offline task data, assembled and dequantised models):
    $ONESHOT_CACHE, else $XDG_CACHE_HOME/oneshot, else ~/.cache/oneshot."""
    if os.environ.get("ONESHOT_CACHE"):
        return Path(os.environ["ONESHOT_CACHE"]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return (Path(xdg).expanduser() / "oneshot").resolve()
