"""Models: loading (`loading.py`), the family adapter (`adapter.py`) and the structure map (`structure.py`)."""
from .adapter import ModelError, decoder_blocks, get_weight, model_family, prunable_layers, set_weight
from .loading import (ALIASES, PRESETS, SMOLLM2_INSTALL, TINY_PRESETS, ByteTokenizer, LoadedModel, build_random_model,
                      check_model_spec, keep_loaded, load_model, model_skeleton, smollm2_path)
from .structure import (COLS, ROWS, AttentionMap, Counter, Coupling, Member, MlpMap, StructureMap, remove_blocks,
                        remove_units, rewrite_config, structure_map, update_model_config)

__all__ = ["ModelError", "decoder_blocks", "get_weight", "model_family", "prunable_layers", "set_weight", "ALIASES",
           "PRESETS", "SMOLLM2_INSTALL", "TINY_PRESETS", "ByteTokenizer", "LoadedModel", "build_random_model",
           "check_model_spec", "keep_loaded", "load_model", "model_skeleton", "smollm2_path", "COLS", "ROWS",
           "AttentionMap", "Counter", "Coupling", "Member", "MlpMap", "StructureMap", "remove_blocks", "remove_units", "rewrite_config",
           "structure_map", "update_model_config"]
