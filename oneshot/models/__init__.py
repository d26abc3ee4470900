"""Models: the embedded real models (`embedded.py`), loading (`loading.py`, with GGUF models dequantised once:
`gguf_cache.py`), random models with real shapes (`random_models.py`), what identifies a model's weights
(`identity.py`), the family adapter (`adapter.py`, with fused mixture-of-experts weights in `experts.py`), the
structure map (its types in `structure_types.py`, built per family in `structure.py`) and removal along it
(`removal.py`), and the expert map of mixtures of experts with removal of whole experts (`expert_map.py`)."""
from .adapter import (ModelError, block_weight_roles, bos_every_window, decoder_blocks, get_weight, layer_parameter,
                      prunable_layers, set_weight, weight_kind, weight_matrix)
from .embedded import EMBEDDED
from .experts import ExpertProjection, routed_through_projections, routers
from .expert_map import ExpertMap, expert_map, parameter_counts, remove_experts, rewrite_expert_config
from .lazy import block_weights, materialised
from .loading import (LoadedModel, can_stay_on_disk, check_model_spec, gguf_file, load_model, model_skeleton,
                      weights_stay_on_disk)
from .random_models import PRESETS, TINY_MOE_PRESETS, TINY_PRESETS, ByteTokenizer, build_random_model
from .removal import remove_blocks, remove_units, update_model_config
from .structure import rewrite_config, structure_map
from .structure_types import COLS, ROWS, AttentionMap, Coupling, Member, MlpMap, StructureMap, UnitCountAttribute

__all__ = ["ModelError", "block_weight_roles", "bos_every_window", "decoder_blocks", "get_weight", "layer_parameter",
           "prunable_layers", "set_weight", "weight_kind", "weight_matrix", "EMBEDDED", "ExpertProjection", "routed_through_projections",
           "routers", "block_weights", "materialised", "PRESETS", "TINY_MOE_PRESETS", "TINY_PRESETS", "ByteTokenizer",
           "LoadedModel", "build_random_model", "can_stay_on_disk", "check_model_spec", "gguf_file", "load_model",
           "model_skeleton", "weights_stay_on_disk", "remove_blocks", "remove_units", "update_model_config", "COLS",
           "ROWS", "AttentionMap", "Coupling", "Member", "MlpMap", "StructureMap", "UnitCountAttribute",
           "rewrite_config", "structure_map", "ExpertMap", "expert_map", "parameter_counts", "remove_experts",
           "rewrite_expert_config"]
