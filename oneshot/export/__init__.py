"""Writing pruned models: the Hugging Face checkpoint with its lineage card (hf.py)."""
from .hf import directory_bytes, lineage_card, save_model

__all__ = ["save_model", "lineage_card", "directory_bytes"]
