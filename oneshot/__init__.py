"""oneshot: one-shot pruning of large language models.

    from oneshot import RunSpec, run
    record = run(RunSpec(method="wanda", sparsity=0.5, pattern="2:4", output="runs/wanda"))

`run(RunSpec) -> Record` is the one way a run happens (api.py); the methods are pure tensor functions
(oneshot.methods); the engine streams one block at a time (oneshot.engine). Names are imported on
first use, so that `oneshot --help` (and Ctrl-C at any moment) does not wait for torch to load.
"""
import importlib

__version__ = "0.3.0"

_EXPORTS = {
    "run": "api", "RunSpec": "spec", "Calibration": "spec", "Evaluation": "spec", "Recovery": "spec",
    "make_plan": "plan", "Spelling": "settings",
    "Record": "record", "UsageError": "errors", "RunError": "errors", "load_model": "models",
    "prune_model": "engine", "measure_sparsity": "engine", "PruneReport": "engine", "METHODS": "methods",
    "get_method": "methods", "parse_pattern": "methods",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'oneshot' has no attribute {name!r}")
