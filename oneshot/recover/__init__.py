"""Recovery after pruning: fine-tuning with the zero pattern locked (locked.py), next-token and
distillation losses (losses.py), learning-rate and iterative-sparsity schedules (schedule.py), LoRA
through peft merged back sparse (lora.py), and the loop with atomic checkpoints (train.py).
api.run drives it: a RunSpec of kind "recover", or a prune run with recovery settings."""
from .locked import apply_masks, capture_masks, masks_hold, zero_fraction
from .lora import LoraError
from .losses import distillation_loss, next_token_loss, recovery_loss
from .schedule import LR_SCHEDULES, SPARSITY_SCHEDULES, lr_factor, stage_sparsity
from .train import TrainCheckpoint, TrainCheckpointError, TrainResult, train, training_fingerprint

__all__ = ["LoraError", "distillation_loss", "next_token_loss", "recovery_loss", "apply_masks", "capture_masks",
           "masks_hold", "zero_fraction", "LR_SCHEDULES", "SPARSITY_SCHEDULES", "lr_factor", "stage_sparsity",
           "TrainCheckpoint", "TrainCheckpointError", "TrainResult", "train", "training_fingerprint"]
