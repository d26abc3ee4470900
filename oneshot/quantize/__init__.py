"""Quantisation: the grid and round-to-nearest (grid.py), GPTQ and SparseGPT's joint column sweep (columns.py),
and a pruning method that quantises too (method.py)."""
from .columns import ColumnQuantizer, gptq, joint_prune_quantize
from .grid import BITS, Grid, QuantizationError, QuantizedWeight, check_group_size, rtn
from .method import QUANT_METHODS, quantizing, resolve_quant_method

__all__ = ["BITS", "Grid", "QuantizationError", "check_group_size", "QuantizedWeight", "rtn", "QUANT_METHODS", "quantizing", "resolve_quant_method",
           "ColumnQuantizer", "gptq", "joint_prune_quantize"]
