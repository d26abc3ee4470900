"""Quantisation: the grid and round-to-nearest (grid.py), GPTQ and SparseGPT's joint sweep (sweep.py),
and a pruning method that quantises too (method.py)."""
from .grid import BITS, Grid, QuantizationError, QuantizedWeight, check_group_size, rtn
from .method import QUANT_METHODS, quantizing, resolve_quant_method
from .sweep import ColumnQuantizer, gptq, joint_prune_quantize

__all__ = ["BITS", "Grid", "QuantizationError", "check_group_size", "QuantizedWeight", "rtn", "QUANT_METHODS", "quantizing", "resolve_quant_method",
           "ColumnQuantizer", "gptq", "joint_prune_quantize"]
