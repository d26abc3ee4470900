"""Structured pruning: remove whole decoder blocks, attention heads (KV groups) or MLP channels, so the
result is a smaller dense model with a rewritten config that plain transformers loads.

- criteria.py: the criteria (`--method` with a structured `--pattern`) and which patterns each scores
- budget.py: parameter counts and how many units meet a target fraction
- scores.py, refit.py, moments.py: the maths, as functions of tensors
- passes.py: the backward pass and the hidden-state pass some criteria need
- driver.py: `check_structured` and `prune_structured`, what the run API calls
- experts.py: whole routed experts of mixtures of experts (`--pattern experts`), which driver.py hands over to
"""
from .budget import Removal, Sizes, plan_removal
from .criteria import CRITERIA, Criterion, applies, check_structured_spec, resolve_method
from .driver import StructuredReport, check_structured, enable_bias, model_sizes, prune_structured, unit_scores

__all__ = ["Removal", "Sizes", "plan_removal", "CRITERIA", "Criterion", "applies", "check_structured_spec",
           "resolve_method", "StructuredReport", "check_structured", "enable_bias", "model_sizes",
           "prune_structured", "unit_scores"]
