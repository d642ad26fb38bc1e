"""`choicesae verify PATH`: check an activation store or a run folder without training."""

import json
from dataclasses import dataclass
from pathlib import Path

from choicesae.core.config import TrainConfig, from_dict
from choicesae.core.sae import SAE
from choicesae.data.store import Store
from choicesae.errors import ChoiceSAEError, DataError
from choicesae.training.checkpoint import checkpoint_paths, read_checkpoint


@dataclass(frozen=True)
class VerifyConfig:
    """Check a store's shards against their checksums, or a run's configs, SAE and checkpoints."""

    path: str = ""
    """A store folder (written by harvest) or a run folder (written by train)."""


def verify(path: str | Path) -> str:
    """A one-line summary of what was checked; raises a ChoiceSAEError naming what is broken."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return verify_store(path)
    if (path / "config.json").is_file():
        return verify_run(path)
    raise DataError(f"{path} is neither a store (manifest.json) nor a run folder (config.json)")


def verify_store(path: Path) -> str:
    store = Store(path)
    for i in range(store.num_shards):
        store.shard(i)  # reads the shard whole and compares its SHA-256 with the manifest's
    rows, d = store.shape
    return f"store {path}: {store.num_shards} shards, {rows} rows of width {d}, checksums match"


def verify_run(path: Path) -> str:
    try:
        cfg = from_dict(TrainConfig, json.loads((path / "config.json").read_text()))
    except (ChoiceSAEError, ValueError) as e:
        raise DataError(f"{path}/config.json is not a valid training config: {e}") from e
    done = []
    if (path / "sae").is_dir():
        sae = SAE.from_pretrained(path / "sae")
        if sae.cfg.d_in != cfg.sae.d_in or sae.cfg.num_latents != cfg.sae.num_latents:
            raise DataError(f"{path}/sae does not match the run's config ({sae.cfg})")
        done.append("the trained SAE loads")
    for ckpt in checkpoint_paths(path):
        if read_checkpoint(ckpt)["step"] != int(ckpt.stem.removeprefix("checkpoint-")):
            raise DataError(f"checkpoint {ckpt} does not hold the step its name gives")
    done.append(f"{len(checkpoint_paths(path))} checkpoints load")
    return f"run {path}: config valid, " + ", ".join(done)
