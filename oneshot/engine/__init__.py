"""The streaming engine: blocks one at a time through a short sequence of stages (see stream.py)."""
from .capture import BlockInputs, capture_block_inputs
from .coverage import Coverage, measure_coverage
from .memory import ResourceError, check_memory, check_pattern, default_batch_size
from .prune_report import PruneReport
from .refit import Refit, refit_block
from .sequential import (ASYMMETRIC_STAGES, SEQUENTIAL_STAGES, asymmetric_sequential, sequential_stages,
                         sublayer_sequential)
from .stages import (
           DEFAULT_STAGES,
           BlockVisit,
           Stage,
           gather_statistics,
           propagate,
           prune_layers,
)
from .stream import (
           layer_names,
           measure_sparsity,
           prune_model,
           stream_statistics,
           uniform_targets,
)

__all__ = ["BlockInputs", "capture_block_inputs", "Coverage", "measure_coverage", "ResourceError", "check_memory",
           "check_pattern", "default_batch_size", "PruneReport", "DEFAULT_STAGES", "BlockVisit", "Stage",
           "gather_statistics", "propagate", "prune_layers", "layer_names", "measure_sparsity", "prune_model",
           "stream_statistics", "uniform_targets", "SEQUENTIAL_STAGES", "sublayer_sequential",
           "ASYMMETRIC_STAGES", "asymmetric_sequential", "sequential_stages", "Refit", "refit_block"]
