"""Checkpoints: everything a run needs to continue exactly, written atomically."""

import os
from pathlib import Path

import torch

from choicesae.errors import DataError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: Path, state: dict) -> None:
    """Write `state` to out/checkpoint.pt via a temporary file, fsync and rename, so a crash at
    any moment leaves either the previous checkpoint or the new one, never a torn file."""
    tmp = out / (CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(out: Path, device: str = "cpu") -> dict:
    """The state written by `save_checkpoint` in the run folder `out`."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise DataError(f"cannot resume: {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a corrupt file raises pickle, zip or EOF errors alike
        raise DataError(f"cannot resume: {path} is unreadable ({e})") from e
