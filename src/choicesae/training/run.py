"""A run folder and its settings: the config resolved against the data (width, recipe, steps),
the checks that make a resume exact (or refuse it in one line), and the checkpoint's contents."""

import dataclasses
import json
from pathlib import Path

import torch

from choicesae.core.allocation import (
    Densities,
    feature_capacities,
)
from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.core.schedule import RECIPES, phase_at, recipe_lr
from choicesae.core.sparsifiers import uniform_capacities
from choicesae.errors import ConfigError
from choicesae.parallel import features
from choicesae.parallel.comm import SINGLE, World
from choicesae.training.checkpoint import checkpoint_paths, load_checkpoint
from choicesae.training.state import TrainState


def resolve(cfg: TrainConfig, d_in: int, d_out: int = 0) -> TrainConfig:
    """Fill in the SAE's widths (d_out: a transcoder's target), the number of steps and the
    recipe's settings; with a schedule, the model's sparsifier is the last phase's. Refuses a
    Feature Choice batch too small to give every feature a token (footnote 8)."""
    sae = dataclasses.replace(cfg.sae.resolve(d_in, d_out), sparsifier=cfg.phases()[-1][0])
    recipe = RECIPES[cfg.recipe]
    cfg = dataclasses.replace(  # re-validates with the width known
        cfg,
        sae=sae,
        steps=cfg.total_steps,
        optimizer=recipe.optimizer if cfg.optimizer == "recipe" else cfg.optimizer,
        lr=cfg.lr or recipe_lr(recipe, sae.num_latents),
        warmup_steps=recipe.warmup_steps if cfg.warmup_steps == -1 else cfg.warmup_steps,
        decay_fraction=recipe.decay_fraction if cfg.decay_fraction == -1 else cfg.decay_fraction,
    )
    if any(name == "feature_choice" for name, _ in cfg.phases()):
        check_capacities(sae, cfg.batch_size)
    return cfg


def record_source(cfg: TrainConfig, rows) -> TrainConfig:
    """Record with the SAE the model, hookpoint and context of a store's (or an online
    harvest's) activations, where not given by hand: exports name them (interop/saelens.py)."""
    meta = getattr(rows, "manifest", None)
    if meta is None and dataclasses.is_dataclass(getattr(rows, "cfg", None)):
        meta = dataclasses.asdict(rows.cfg)
    if not meta:
        return cfg
    s = cfg.sae
    found = {"model": meta.get("model"), "hookpoint": meta.get("hookpoint")}
    found["context"] = meta.get("context")
    found["target"] = meta.get("target")
    sae = dataclasses.replace(s, **{k: getattr(s, k) or v for k, v in found.items() if v})
    if cfg.cross_layer:  # every hookpoint of the store, one layer each
        sae = dataclasses.replace(sae, layers=len(str(meta.get("hookpoint")).split(",")))
    return dataclasses.replace(cfg, sae=sae)


def check_capacities(sae: SAEConfig, batch_size: int) -> None:
    """Feature Choice needs a batch large enough to give every feature a token (footnote 8):
    uniform capacities (density ones start uniform) must be at least 1, Zipf capacities
    (raised to m_min) within k·B."""
    if sae.capacities != "zipf":
        uniform_capacities(sae.k, batch_size, sae.num_latents)
        return
    ranks = torch.arange(1, sae.num_latents + 1)
    m = feature_capacities(
        ranks, sae.k, batch_size, sae.zipf_alpha, sae.zipf_beta, sae.m_min, sae.m_max
    )
    if m.sum() > sae.k * batch_size:
        raise ConfigError(
            f"Zipf capacities sum to {int(m.sum())}, past the budget k*batch_size = "
            f"{sae.k * batch_size}: the batch is too small to give each of the "
            f"{sae.num_latents} features a token (paper footnote 8); raise batch_size or k"
        )


def checkpoint_state(
    state: TrainState, sae: SAE, optimizer, cfg: TrainConfig, world: World = SINGLE
) -> dict:
    """Plain tensors and numbers only, so the checkpoint loads with weights_only=True. With
    --parallel features, the whole SAE and optimizer state gathered from the shards to rank 0
    (None on the others; every rank calls this): the one-process layout."""
    sharded = features.feature_sharded(cfg, world)
    return {
        "config": json.dumps(dataclasses.asdict(cfg)),
        "step": state.step,
        "since_fired": state.since_fired,
        "counts": state.densities.counts,
        "window_tokens": state.densities.tokens,
        "dying": state.dying,
        "fit": state.fit,
        "sae": features.full_state(sae, world) if sharded else sae.state_dict(),
        "optimizer": (
            features.full_optimizer_state(sae, optimizer, world)
            if sharded
            else optimizer.state_dict()
        ),
        "skipped": state.skipped,
    }


def resume_(out: Path, cfg: TrainConfig, sae: SAE, optimizer, world: World = SINGLE) -> TrainState:
    """Load the checkpoint into `sae` and `optimizer` (with --parallel features, this rank's
    slice of it); refuse one from a different run."""
    saved = load_checkpoint(out, mmap=True)  # mapped on the CPU: each tensor read when used
    check_resumable(json.loads(saved["config"]), cfg, saved["step"])
    model, moments = saved["sae"], saved["optimizer"]
    if features.feature_sharded(cfg, world):
        model, moments = features.local_state(model, moments, sae, optimizer, world)
    sae.load_state_dict(model)
    optimizer.load_state_dict(moments)
    if world.main:  # one writer under torchrun
        trim_metrics(out / "metrics.jsonl", saved["step"])
        write_config(out, cfg)  # the run as resumed: its length or folder may have changed
    [since_fired, counts, dying] = [
        saved[name].to(cfg.device, copy=True) for name in ("since_fired", "counts", "dying")
    ]
    densities = Densities(counts, saved["window_tokens"], sae.density.clone())
    return TrainState(saved["step"], since_fired, densities, dying, saved["fit"], saved["skipped"])


RESUME_MAY_CHANGE = (  # how a run is watched, where it lives, and how long it goes on
    {"resume", "overwrite", "progress", "log", "log_every", "wandb_mode", "wandb_project"}
    | {"parallel", "checkpoint_every", "keep_checkpoints", "out", "steps", "schedule"}
    | {"mutual_choice_share"}  # its phases are checked against the steps done
    | {"threshold_tokens"}  # read after the last step only
)


def check_resumable(saved: dict, cfg: TrainConfig, step: int) -> None:
    """Refuse to resume with settings that differ from the checkpoint's `saved` config, but for
    those in RESUME_MAY_CHANGE: a moved run folder resumes, and a run (finished or not) may
    be extended or cut to any length past `step` whose phases agree with it so far. The
    learning rate does not depend on the length under the fast recipe, so an extended run is
    bit-exact with one trained at that length from the start (with --decay-fraction > 0 the
    decay moves with the end)."""
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))
    # the model's sparsifier is the last phase's: the phases are compared below
    new["sae"]["sparsifier"] = saved["sae"]["sparsifier"]
    changed = sorted(k for k in new if k not in RESUME_MAY_CHANGE and saved.get(k) != new[k])
    if changed:
        raise ConfigError(f"cannot resume {cfg.out}: settings differ from the run's ({changed})")
    if cfg.total_steps < step:
        raise ConfigError(
            f"cannot resume {cfg.out} for {cfg.total_steps} steps: its checkpoint is at step "
            f"{step}; ask for at least {step}"
        )
    steps = 0 if saved["schedule"] else saved["steps"]  # older runs saved a default beside it
    share = saved.get("mutual_choice_share", 0.0)  # older runs trained Feature Choice alone
    sae = dataclasses.replace(cfg.sae, sparsifier=saved["sae"]["sparsifier"])
    old = TrainConfig(steps=steps, schedule=saved["schedule"], sae=sae, mutual_choice_share=share)
    if [phase_at(s, old.phases())[1] for s in range(step)] != [
        phase_at(s, cfg.phases())[1] for s in range(step)
    ]:
        trained = ",".join(f"{name}:{n}" for name, n in old.phases())
        raise ConfigError(
            f"cannot resume {cfg.out}: the phases asked for change the {step} steps already "
            f"trained ({trained}); extend them with --schedule instead"
        )


def trim_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint's step, so a resumed log has each step once."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(ln for ln in lines if json.loads(ln)["step"] <= step))


def prepare_run(cfg: TrainConfig) -> Path:
    """Create the run folder and write the resolved config; refuse to clobber a run."""
    out = Path(cfg.out)
    if cfg.resume:
        return out
    if (out / "config.json").exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already holds a run; pick another --out, --resume or --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_paths(out):  # --overwrite: a later --resume must not find them
            stale.unlink()
        write_config(out, cfg)
        (out / "metrics.jsonl").write_text("")
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {out}: {e}") from e
    return out


def write_config(out: Path, cfg: TrainConfig) -> None:
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
