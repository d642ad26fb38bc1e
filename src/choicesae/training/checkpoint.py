"""Checkpoints: everything a run needs to continue exactly, written atomically, the last few
kept so that one unreadable file never costs the run."""

import os
import warnings
from pathlib import Path

import torch

from choicesae.errors import DataError

PREFIX, SUFFIX = "checkpoint-", ".pt"


def checkpoint_paths(out: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (temporary files are not listed)."""
    return sorted(out.glob(f"{PREFIX}*{SUFFIX}"))


def save_checkpoint(out: Path, state: dict, keep: int) -> Path:
    """Write `state` to out/checkpoint-STEP.pt via a temporary file, fsync and rename, so a
    crash at any moment leaves every earlier checkpoint whole; then keep only the last `keep`."""
    path = out / f"{PREFIX}{state['step']:09d}{SUFFIX}"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(out)
    for old in checkpoint_paths(out)[:-keep]:
        old.unlink()
    return path


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path, device: str = "cpu", mmap: bool = False) -> dict:
    """One checkpoint file; a DataError if it is unreadable. `mmap` (with device "cpu") maps
    the tensors instead of reading them: a slice of one reads only its own pages."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # a torn or corrupt file raises pickle, zip or EOF errors alike
        raise DataError(f"checkpoint {path} is unreadable: {e}") from e


def load_checkpoint(out: Path, device: str = "cpu", mmap: bool = False) -> dict:
    """The newest readable checkpoint of the run folder `out`; an unreadable newer one is
    reported and skipped."""
    paths = checkpoint_paths(out)
    if not paths:
        raise DataError(f"cannot resume: {out} holds no checkpoint")
    for path in reversed(paths):
        try:
            return read_checkpoint(path, device, mmap)
        except DataError as e:
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    raise DataError(f"cannot resume: no checkpoint in {out} is readable")
