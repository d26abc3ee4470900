"""What a worker does with one grid point: run it through `api.run` and return its record as a dict.

The local loop, a Ray task and a Slurm job all come here; none of them writes the results file.
"""
from __future__ import annotations

import copy

from ..errors import RunError, UsageError
from .config import SWEEP_NAMES


class Models:
    """One loaded copy per (model, dtype, seed); each run gets its own deep copy."""

    def __init__(self, keep: bool):
        self.keep, self.kept = keep, {}

    def get(self, spec):
        if not self.keep:
            return None
        from ..models import check_model_spec, load_model, weights_stay_on_disk
        from ..models.placement import resolve_device, resolve_dtype

        dtype = resolve_dtype(spec.dtype, resolve_device(spec.device), spec.model, check_model_spec(spec.model))
        if spec.weights_on_disk or (spec.weights_on_disk is None and weights_stay_on_disk(spec.model, dtype)):
            return None  # larger than memory: each run opens it afresh, from disk
        key = (spec.model, dtype, spec.seed)
        if key not in self.kept:
            self.kept[key] = load_model(spec.model, dtype=dtype, seed=spec.seed)
        loaded = self.kept[key]
        return type(loaded)(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.name, loaded.source)


def run_spec(spec, models: Models, run=None):
    """(record dict or None, one-line failure, whether a retry could succeed)."""
    if run is None:
        from ..api import run
    try:
        record = run(spec, loaded=models.get(spec), spelling=SWEEP_NAMES)
    except UsageError as exc:
        return None, str(exc), False
    except RunError as exc:
        return None, str(exc), True
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one failed run must not end the sweep
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "), True
    return record.to_dict(), "", True
