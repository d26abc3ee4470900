"""Resumable pruning: after each finished block, its weights and the next block's inputs are written.

Files in the checkpoint directory, each written to a temporary name and renamed:
  block_0007.pt    the state dict of finished block 7 (CPU tensors)
  hidden_0008.pt   the inputs of block 8 (the pruned block 7's outputs), one tensor per chunk
  state.json       the run's fingerprint and the next block to do; written last, so it only ever
                   points at files that are complete
A run killed at any moment (SIGKILL included) resumes from the last finished block and, on the CPU,
ends with a model bitwise equal to an uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .atomic import write_atomic
from .errors import RunError


class CheckpointError(RunError):
    """A checkpoint that does not belong to this run, or that cannot be read."""


def check_resume(directory: str | Path, expected: dict, flag: str) -> None:
    """Before any work: the checkpoint in `directory` (a prune run's or a recovery's, both keep their
    fingerprint in state.json) was written by a run with `expected`'s values, the input model's identity
    among them; else a UsageError naming what differs, so a resume over another model or other settings
    is refused before the model is loaded."""
    from .errors import UsageError

    try:
        theirs = json.loads((Path(directory) / "state.json").read_text()).get("fingerprint") or {}
    except (OSError, ValueError):
        raise UsageError(f"{flag} {directory}: its state.json cannot be read; use a new directory") from None
    differ = sorted(key for key, value in expected.items() if theirs.get(key) != json.loads(json.dumps(value)))
    if differ:
        raise UsageError(f"{flag} {directory} holds the checkpoint of another run ({', '.join(differ)} differ); "
                         "resume it with the settings it was started with, or use a new directory")


class Checkpoint:
    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = dict(fingerprint)

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {self.state_path}: {exc}") from None
        if state.get("fingerprint") != self.fingerprint:
            theirs = state.get("fingerprint", {})
            differ = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            raise CheckpointError(f"the checkpoint in {self.directory} belongs to another run ({', '.join(differ)} "
                                  "differ); use a new --checkpoint-dir")
        return state

    def save(self, index: int, block: torch.nn.Module, hidden: list[torch.Tensor] | None, notes: dict) -> None:
        """Record finished block `index` and, unless it was the last, the next block's inputs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state_dict = {k: v.detach().to("cpu") for k, v in block.state_dict().items()}
        write_atomic(self.directory / f"block_{index:04d}.pt", lambda f: torch.save(state_dict, f))
        if hidden is not None:
            cpu_hidden = [h.detach().to("cpu") for h in hidden]
            write_atomic(self.directory / f"hidden_{index + 1:04d}.pt", lambda f: torch.save(cpu_hidden, f))
        state = {"fingerprint": self.fingerprint, "next_block": index + 1, "notes": notes}
        write_atomic(self.state_path, lambda f: f.write(json.dumps(state, indent=1).encode()))
        (self.directory / f"hidden_{index:04d}.pt").unlink(missing_ok=True)  # superseded

    def restore(self, blocks: torch.nn.ModuleList, need_hidden: bool):
        """Load finished blocks into the model; returns (next block, its inputs or None, notes)."""
        state = self.load_state()
        next_block = int(state["next_block"])
        try:
            for index in range(next_block):
                saved = torch.load(self.directory / f"block_{index:04d}.pt", weights_only=True)
                blocks[index].load_state_dict(saved)
            hidden = None
            if need_hidden and next_block < len(blocks):
                hidden = torch.load(self.directory / f"hidden_{next_block:04d}.pt", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {self.directory} is incomplete: {str(exc).splitlines()[0]}") from None
        return next_block, hidden, state.get("notes", {})
