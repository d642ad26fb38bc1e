"""Several models from one read of a store: one SAE or transcoder per hookpoint of a
several-hookpoint harvest (data/store.py), each trained by `train` in a thread of its own and
written to --out/HOOKPOINT, every batch of whole rows drawn once and cut into each model's
columns (data/shared.py). Each model is the one `train` gives on its own hookpoint alone."""

import dataclasses
import os
import threading
from pathlib import Path

from choicesae.core.config import TrainConfig
from choicesae.core.sae import SAE
from choicesae.data.hooks import select_paths
from choicesae.data.shared import Aborted, SharedRead
from choicesae.data.store import Store
from choicesae.errors import ConfigError
from choicesae.training.loop import train


def train_many(cfg: TrainConfig) -> list[SAE]:
    """The models of cfg: one (`train`), or with a store of several hookpoints one per
    hookpoint that --hookpoint names (comma-separated paths or patterns, `*` one path component;
    empty: all of them), trained side by side from one read of the store."""
    spec = cfg.sae.hookpoint
    store = Store(cfg.store) if cfg.store else None
    one = store is None or len(store.hookpoints) == 1 or spec and not set("*,") & set(spec)
    if one or cfg.cross_layer:  # a cross-layer transcoder reads every hookpoint at once
        return [train(cfg)]  # one model: in --out itself
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "under torchrun, train one hookpoint of the store per run: name it with --hookpoint"
        )
    chosen = select_paths(spec, store.hookpoints, f"the store {cfg.store}") if spec else None
    chosen = chosen or store.hookpoints
    shared = SharedRead(store, chosen)
    runs = [
        dataclasses.replace(
            cfg,
            out=str(Path(cfg.out) / hookpoint),
            sae=dataclasses.replace(cfg.sae, hookpoint=hookpoint),
            progress=cfg.progress and i == 0,  # one bar: the models step together
        )
        for i, hookpoint in enumerate(chosen)
    ]
    saes: list[SAE | None] = [None] * len(runs)
    errors: list[BaseException] = []

    def run(i: int, reader) -> None:
        try:
            saes[i] = train(runs[i], reader)
        except BaseException as e:  # the others stop rather than wait for this one's reads
            errors.append(e)
            shared.abort(e)

    threads = [
        threading.Thread(target=run, args=(i, reader), daemon=True)
        for i, reader in enumerate(shared.readers())
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the first cause, not another model's Aborted
        raise next((e for e in errors if not isinstance(e, Aborted)), errors[0])
    return saes
