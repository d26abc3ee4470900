"""Models: loading (`loading.py`), the family adapter (`adapter.py`, with fused mixture-of-experts
weights in `experts.py`), the structure map (`structure.py`) and removal along it (`removal.py`)."""
from .adapter import (
                      ModelError,
                      block_weight_roles,
                      decoder_blocks,
                      get_weight,
                      layer_parameter,
                      prunable_layers,
                      set_weight,
                      weight_kind,
)
from .experts import ExpertProjection, routed_through_projections, routers
from .lazy import block_weights, materialised
from .loading import (
                      ALIASES,
                      PRESETS,
                      SMOLLM2_INSTALL,
                      TINY_MOE_PRESETS,
                      TINY_PRESETS,
                      ByteTokenizer,
                      LoadedModel,
                      build_random_model,
                      can_stay_on_disk,
                      check_model_spec,
                      load_model,
                      model_skeleton,
                      smollm2_path,
                      weights_stay_on_disk,
)
from .removal import remove_blocks, remove_units, update_model_config
from .structure import (
                      COLS,
                      ROWS,
                      AttentionMap,
                      Coupling,
                      Member,
                      MlpMap,
                      StructureMap,
                      UnitCountAttribute,
                      rewrite_config,
                      structure_map,
)

__all__ = ["ModelError", "block_weight_roles", "decoder_blocks", "get_weight", "layer_parameter", "prunable_layers",
           "set_weight", "weight_kind", "ExpertProjection", "routed_through_projections", "routers", "ALIASES",
           "PRESETS", "SMOLLM2_INSTALL", "TINY_MOE_PRESETS", "TINY_PRESETS", "ByteTokenizer", "LoadedModel",
           "build_random_model", "can_stay_on_disk", "weights_stay_on_disk", "block_weights", "materialised",
           "check_model_spec", "load_model", "model_skeleton", "smollm2_path", "COLS", "ROWS", "AttentionMap",
           "UnitCountAttribute", "Coupling", "Member", "MlpMap", "StructureMap", "remove_blocks", "remove_units",
           "rewrite_config", "structure_map", "update_model_config"]
