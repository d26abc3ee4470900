"""oneshot: one-shot pruning of large language models.

    from oneshot import load_model, prune_model, get_method, parse_pattern
    loaded = load_model("smollm2-135m")
    report = prune_model(loaded.model, get_method("sparsegpt"), 0.5, parse_pattern("2:4"), input_ids)

The methods are pure tensor functions (oneshot.methods); the engine streams one block at a time.
"""
__version__ = "0.2.0"

from .engine import PruneReport, measure_sparsity, prune_model
from .methods import METHODS, get_method, parse_pattern
from .models import load_model

__all__ = ["__version__", "load_model", "prune_model", "measure_sparsity", "PruneReport", "METHODS",
           "get_method", "parse_pattern"]
