"""The training loop: a function over batches of activations that reads like the paper.

for each batch x:  z' = encoder(x);  z = σ_s(z');  x̂ = decoder(z)
                   loss = |x − x̂|² (+ L1 | aux_k + aux_zipf | Multi-TopK | NFM);  AdamW step
                   project decoder rows to unit norm; count firings per latent
every density window: refit Zipf, find dying features, re-rank features (section 3.2)
at a switch to Feature Choice: take the Zipf (α, β) fitted in the phase before (section 4.4)
"""

import contextlib
import dataclasses
import functools
import json
import math
import signal
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

import schedulefree
import torch
from torch import Tensor
from tqdm.auto import tqdm

from choicesae import distributed, sharding
from choicesae.allocation import (
    Densities,
    dying_features,
    feature_capacities,
    feature_ranks,
    fit_zipf,
    middle_segment,
    rank_order,
    update_densities,
)
from choicesae.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from choicesae.config import SAEConfig, TrainConfig
from choicesae.data import Rows, batches, check_activations, load_activations
from choicesae.distributed import SINGLE, World
from choicesae.errors import ConfigError, Interrupted, NonFiniteError
from choicesae.loggers import Loggers, open_loggers
from choicesae.objective import Masks, StepOut, objective
from choicesae.ops import LOCAL, Dense, Sparse
from choicesae.preprocess import normalize
from choicesae.sae import SAE
from choicesae.schedule import RECIPES, lr_at, phase_at, recipe_lr
from choicesae.sparsifiers import uniform_capacities
from choicesae.store import Store
from choicesae.threads import warn_if_spinning


@dataclasses.dataclass
class TrainState:
    """What the loop carries from step to step besides the model and optimiser."""

    step: int
    since_fired: Tensor  # [F] tokens since each latent last fired
    densities: Densities  # firing counts of the current window
    dying: Tensor  # [F] bool, Definition 3.1 at the last closed window
    fit: dict  # Zipf fit and counts of the last closed window, for the log
    skipped: int = 0  # non-finite batches skipped

    @classmethod
    def fresh(cls, num_latents: int, device: str) -> "TrainState":
        return cls(
            0,
            torch.zeros(num_latents, dtype=torch.long, device=device),
            Densities.empty(num_latents, device),
            torch.zeros(num_latents, dtype=torch.bool, device=device),
            {},
        )

    def masks(self, dead_tokens: int) -> Masks:
        dead = self.since_fired >= dead_tokens
        return Masks(dead, self.dying & ~dead)


def train(cfg: TrainConfig, activations: Rows | None = None) -> SAE:
    """Train an SAE on `activations` [N, d_in] (or cfg.activations / cfg.store) and save it to
    cfg.out/sae. Every setting and the data are checked before anything is written. Under
    torchrun with --parallel features, rank 0 returns the whole SAE on its CPU and the other
    ranks their shard."""
    if activations is None:
        key = cfg.activations_key
        rows = Store(cfg.store) if cfg.store else load_activations(cfg.activations, key)
    else:
        rows = check_activations(activations)
    cfg = resolve(record_source(cfg, rows), rows.shape[1])
    warn_if_spinning(cfg.device)
    batches(rows, cfg.batch_size, cfg.seed, cfg.device)  # checks the batch size
    world = distributed.init_from_env(cfg.device)  # under torchrun: this process's rank
    sharded = sharding.feature_sharded(cfg, world)
    latents = sharding.span(cfg.sae.num_latents, world) if sharded else None
    if not sharded:
        distributed.check_batch(cfg.batch_size, world)
    out = prepare_run(cfg) if world.main else Path(cfg.out)
    # a generator of its own: every rank starts from the same weights, the caller's RNG untouched
    init = torch.Generator().manual_seed(cfg.seed)
    sae = SAE(cfg.sae, latents, init).to(cfg.device)  # --parallel features: this rank's latents
    optimizer = make_optimizer(sae, cfg)
    if cfg.resume:  # every rank reads the checkpoint: --out must be shared by the nodes
        state = resume_(out, cfg, sae, optimizer, world)
    else:
        sample = batches(rows, min(rows.shape[0], 16_384), cfg.seed, cfg.device)
        sae.init_from_data_(next(sample))
        state = TrainState.fresh(cfg.sae.num_latents, cfg.device)
    data = batches(rows, cfg.batch_size, cfg.seed, cfg.device, start=state.step)
    if not sharded:  # feature sharding: every rank takes the whole batch
        data = (distributed.shard(x, world) for x in data)  # this rank's slice of each batch
    loggers = (
        open_loggers(cfg, out, state.step) if world.main else contextlib.nullcontext(Loggers([]))
    )
    with stop_signals() as stop, loggers as log:
        record = run_loop(sae, optimizer, data, cfg, state, log, stop, world)
    final_weights_(sae, optimizer)
    if sharded:  # the whole SAE on rank 0's CPU, the shards elsewhere
        sae = sharding.whole(sae, world)
    if world.main:  # one copy, the same as one process writes: loadable at any world size
        sae.save_pretrained(out / "sae")
        # the last fit, dead and dying counts travel with the model
        (out / "sae" / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return sae


def run_loop(
    sae, optimizer, data, cfg: TrainConfig, state: TrainState, log, stop: list, world=SINGLE
) -> dict:
    """Step until the end of the schedule; log every cfg.log_every steps, checkpoint every
    cfg.checkpoint_every steps and when asked to stop (rank 0 alone writes). Returns the last
    metrics record."""
    out = Path(cfg.out)
    bar = tqdm(
        total=cfg.total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=not (cfg.progress and world.main),
    )
    window, start, record = defaultdict(float), time.perf_counter(), {}
    save = functools.partial(save_checkpoint, out) if world.main else lambda *args: None
    ops = step_ops(cfg, world)
    while state.step < cfg.total_steps:
        if distributed.any_rank(bool(stop), world):  # a signal to one rank stops them all
            save(checkpoint_state(state, sae, optimizer, cfg, world), cfg.keep_checkpoints)
            signum = stop[0] if stop else signal.SIGTERM  # another rank's signal
            raise Interrupted(
                f"stopped by {signal.Signals(signum).name} after step {state.step}; the "
                f"checkpoint is saved, continue with --resume",
                signum,
            )
        stepped = train_step(sae, optimizer, next(data), cfg, state, ops, world)
        if stepped is None:  # a non-finite batch skipped (--skip-bad-batches)
            state = dataclasses.replace(state, step=state.step + 1, skipped=state.skipped + 1)
        else:
            result, metrics, fired = stepped
            state = advance(state, fired, cfg, sae)
            accumulate(window, {"loss": result.loss, **result.terms, **metrics})
        bar.update()
        if window and (state.step % cfg.log_every == 0 or state.step == cfg.total_steps):
            record = summarize(window, state, cfg)
            record["elapsed_s"] = round(time.perf_counter() - start, 3)
            log.log(record)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "l0", "fvu", "dead_pct")})
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.total_steps:
            save(checkpoint_state(state, sae, optimizer, cfg, world), cfg.keep_checkpoints)
    bar.close()
    return record


@contextlib.contextmanager
def stop_signals():
    """Turn SIGINT and SIGTERM into a request to stop after the current step (a final
    checkpoint is written); a second SIGINT interrupts at once."""
    stop: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def lr_of(cfg: TrainConfig, step: int) -> float:
    """The learning rate of `step` in a resolved config (`resolve`)."""
    return lr_at(step, cfg.total_steps, cfg.lr, cfg.warmup_steps, cfg.decay_fraction)


def train_step(
    sae: SAE, optimizer, x: Tensor, cfg: TrainConfig, state: TrainState, ops=None, world=SINGLE
) -> tuple[StepOut, dict[str, Tensor], Tensor] | None:
    """One optimiser step on raw activations x [B, d_in] (under torchrun, this rank's slice of
    the global batch) with the step's `ops` (`step_ops`, one process's by default); returns
    the loss terms, the FVU and L0 of the (global) batch as metrics and the firing counts [F],
    or None for a skipped non-finite batch."""
    ops = ops or step_ops(cfg)
    index, sparsifier, first = phase_at(state.step, cfg.phases())
    if state.step == first and index > 0 and sparsifier == "feature_choice":
        adopt_zipf_fit_(sae, state, cfg)
    if state.step == first and sparsifier == "feature_choice" and world.main:
        warn_if_short(sae, cfg.batch_size)
    for group in optimizer.param_groups:
        group["lr"] = lr_of(cfg, state.step)
    x, _ = normalize(x, cfg.sae.normalize, sae.scale)
    result = objective(sae, x, cfg, sparsifier, state.masks(cfg.dead_tokens), state.step, ops)
    # backward, and the sums over ranks that give the global loss, counts and metrics
    result, fired, metrics = ops.backend.reduce(sae, result, x, fired_counts(result.acts), cfg)
    if not torch.isfinite(result.loss):  # a sync point, so that NaN never reaches the weights
        optimizer.zero_grad(set_to_none=True)
        if cfg.skip_bad_batches:
            return None
        cause = "" if torch.isfinite(x).all() else " (the batch holds NaN or Inf activations)"
        raise NonFiniteError(
            f"the loss is NaN or Inf at step {state.step + 1}{cause}; stopped with the weights "
            f"of step {state.step} and the last checkpoint kept (--skip-bad-batches skips them)"
        )
    sae.remove_parallel_grad_()
    if cfg.grad_clip:
        ops.backend.clip_grad_norm_(sae, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    unit_norm_decoder_(sae, optimizer)
    return result, metrics, fired


@torch.no_grad()
def unit_norm_decoder_(sae: SAE, optimizer) -> None:
    """Project the decoder rows onto the unit sphere after a step; under schedule-free also the
    base sequence z (the parameters hold y, an interpolation of z and the average x), so that
    the averaged decoder stays unit-norm as well."""
    sae.unit_norm_decoder_()
    z = optimizer.state.get(sae.W_dec, {}).get("z")
    if z is not None:
        z /= z.norm(dim=-1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def final_weights_(sae: SAE, optimizer) -> None:
    """Leave in `sae` the weights to keep: under schedule-free, the average x (eval mode)."""
    if isinstance(optimizer, schedulefree.AdamWScheduleFree):
        optimizer.eval()
        sae.unit_norm_decoder_()


def step_ops(cfg: TrainConfig, world: World = SINGLE):
    """The ops of a step: the sparse kernels or the dense reference (--kernels), over the
    backend of the run's layout: one process, data parallel (selections over the global batch,
    or each rank's own with --distributed-selection local) or feature sharded."""
    backend = LOCAL
    if sharding.feature_sharded(cfg, world):  # --parallel features
        backend = sharding.FeatureSharded(world, cfg.sae.num_latents)
    elif world.size > 1:
        backend = distributed.DataParallel(world, cfg.distributed_selection == "global")
    return (Sparse if cfg.kernels == "sparse" else Dense)(backend)


def fired_counts(acts: Tensor) -> Tensor:
    """[F] tokens each latent fired on, from dense [B, F] activations or the sparse COO ones
    of the sparse kernels (which may hold explicit zeros: selected, then cut by ReLU)."""
    if not acts.is_sparse:
        return (acts != 0).sum(0)
    acts = acts.coalesce()
    live = acts.values() != 0
    return torch.bincount(acts.indices()[1][live], minlength=acts.shape[1])


def advance(state: TrainState, fired: Tensor, cfg: TrainConfig, sae: SAE) -> TrainState:
    """Count this batch's firings (fired [F]); at the end of a density window refresh the
    allocation."""
    B = cfg.batch_size
    since_fired = torch.where(fired > 0, 0, state.since_fired + B)
    densities = update_densities(state.densities, fired, B, cfg.density_tokens)
    state = dataclasses.replace(
        state, step=state.step + 1, since_fired=since_fired, densities=densities
    )
    if densities.tokens == 0:  # a window just closed
        state.dying, state.fit = refresh_allocation_(sae, densities.density, cfg)
    return state


@torch.no_grad()
def refresh_allocation_(sae: SAE, density: Tensor, cfg: TrainConfig) -> tuple[Tensor, dict]:
    """Store the window's densities and ranks in the SAE (Zipf Feature Choice reads the ranks),
    fit Zipf over all ranks and over the middle segment (figure 3), and find the dying
    features (Definition 3.1) against the middle fit: fitting the under-used tail we are testing
    would drag the expectation down towards it."""
    sae.density.copy_(density)
    sae.feature_rank.copy_(feature_ranks(density))
    sorted_density = density[rank_order(density)]
    alpha = None if cfg.fit_alpha else float(sae.zipf[0])
    full = fit_zipf(sorted_density, alpha)
    middle = fit_zipf(sorted_density, alpha, middle_segment(len(density)))
    dying = dying_features(density, middle)
    fit = {
        "zipf_alpha": middle.alpha,
        "zipf_beta": middle.beta,
        "zipf_r2": full.r2,
        "zipf_r2_middle": middle.r2,
        "dying": int(dying.sum()),
    }
    return dying, fit


@torch.no_grad()
def adopt_zipf_fit_(sae: SAE, state: TrainState, cfg: TrainConfig) -> None:
    """Section 4.4: Feature Choice fine-tuning uses the Zipf fitted to the previous phase's
    densities (the last closed window, or the current one if none has closed)."""
    density = sae.density
    if density.isnan().any():
        if state.densities.tokens == 0:
            raise ConfigError("the phase before feature_choice saw no tokens to fit Zipf on")
        density = state.densities.counts.double() / state.densities.tokens
        sae.density.copy_(density)  # what density capacities read
        sae.feature_rank.copy_(feature_ranks(density))
    sorted_density = density[rank_order(density)]
    alpha = None if cfg.fit_alpha else float(sae.zipf[0])
    fit = fit_zipf(sorted_density, alpha, middle_segment(len(density)))
    if math.isfinite(fit.beta):
        sae.zipf.copy_(torch.tensor([fit.alpha, fit.beta]))


def warn_if_short(sae: SAE, batch_size: int) -> None:
    """Floored capacities (⌊k·B/F⌋, Algorithm 1's floor, density shares) can sum to less than
    the budget M = k·B, and Feature Choice then selects fewer matches than M: the mean L0 falls
    below k. Say so when a Feature Choice phase starts, with the capacities it starts with."""
    k, kind = sae.cfg.k, sae.cfg.capacities
    total, budget = int(sae.capacities(batch_size, k).sum()), k * batch_size
    if total < budget:
        warnings.warn(
            f"{kind} Feature Choice capacities sum to {total} < k*batch_size = {budget}: the "
            f"mean L0 will be at most {total / batch_size:.3g}, not k = {k}",
            stacklevel=2,
        )


def accumulate(window: dict, values: dict[str, Tensor]) -> None:
    """Add this step's values to the logging window (tensors: no sync until logged)."""
    for name, value in values.items():
        window[name] += value.detach()
    window["n"] += 1


def summarize(window: dict, state: TrainState, cfg: TrainConfig) -> dict:
    """Empty the logging window into one metrics record (one sync point per log line)."""
    n = window.pop("n")
    masks = state.masks(cfg.dead_tokens)
    record = {"step": state.step, "tokens": state.step * cfg.batch_size}
    record["lr"] = lr_of(cfg, state.step - 1)
    record |= {name: float(total) / n for name, total in window.items()}
    record |= {"phase": phase_at(state.step - 1, cfg.phases())[1], "dead": int(masks.dead.sum())}
    record |= {"dead_pct": 100 * record["dead"] / cfg.sae.num_latents, **state.fit}
    record |= {"aux_zipf_features": int(masks.dying.sum()), "skipped": state.skipped}
    window.clear()
    return record


def resolve(cfg: TrainConfig, d_in: int) -> TrainConfig:
    """Fill in the SAE's width, the number of steps and the recipe's settings; with a
    schedule, the model's sparsifier is the last phase's. Refuses a Feature Choice batch too
    small to give every feature a token (footnote 8)."""
    sae = dataclasses.replace(cfg.sae.resolve(d_in), sparsifier=cfg.phases()[-1][0])
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
    harvest's) activations, where not given by hand: exports name them (interop.py)."""
    meta = getattr(rows, "manifest", None)
    if meta is None and dataclasses.is_dataclass(getattr(rows, "cfg", None)):
        meta = dataclasses.asdict(rows.cfg)
    if not meta:
        return cfg
    s = cfg.sae
    found = {"model": meta.get("model"), "hookpoint": meta.get("hookpoint")}
    found["context"] = meta.get("context")
    sae = dataclasses.replace(s, **{k: getattr(s, k) or v for k, v in found.items() if v})
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


def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or schedule-free AdamW in train mode (gradients are taken at y), with weight
    decay on the weight matrices only."""
    decay, no_decay = [sae.W_enc, sae.W_dec], [sae.b_enc, sae.b_dec]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr_of(cfg, 0))
    optimizer = schedulefree.AdamWScheduleFree(groups, lr=lr_of(cfg, 0))
    optimizer.train()
    return optimizer


def checkpoint_state(
    state: TrainState, sae: SAE, optimizer, cfg: TrainConfig, world: World = SINGLE
) -> dict:
    """Plain tensors and numbers only, so the checkpoint loads with weights_only=True. With
    --parallel features, the whole SAE and optimizer state gathered from the shards to rank 0
    (None on the others; every rank calls this): the one-process layout."""
    sharded = sharding.feature_sharded(cfg, world)
    return {
        "config": json.dumps(dataclasses.asdict(cfg)),
        "step": state.step,
        "since_fired": state.since_fired,
        "counts": state.densities.counts,
        "window_tokens": state.densities.tokens,
        "dying": state.dying,
        "fit": state.fit,
        "sae": sharding.full_state(sae, world) if sharded else sae.state_dict(),
        "optimizer": (
            sharding.full_optimizer_state(sae, optimizer, world)
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
    if sharding.feature_sharded(cfg, world):
        model, moments = sharding.local_state(model, moments, sae, optimizer, world)
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
)


def check_resumable(saved: dict, cfg: TrainConfig, step: int) -> None:
    """Refuse to resume with settings that differ from the checkpoint's `saved` config, but for
    those in RESUME_MAY_CHANGE: a moved run folder resumes, and a run (finished or not) may
    be extended or cut to any length past `step` whose phases agree with it so far. The
    learning rate does not depend on the length under the fast recipe, so an extended run is
    bit-exact with one trained at that length from the start (with --decay-fraction > 0 the
    decay moves with the end)."""
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))
    changed = sorted(k for k in new if k not in RESUME_MAY_CHANGE and saved.get(k) != new[k])
    if changed:
        raise ConfigError(f"cannot resume {cfg.out}: settings differ from the run's ({changed})")
    if cfg.total_steps < step:
        raise ConfigError(
            f"cannot resume {cfg.out} for {cfg.total_steps} steps: its checkpoint is at step "
            f"{step}; ask for at least {step}"
        )
    steps = 0 if saved["schedule"] else saved["steps"]  # older runs saved a default beside it
    old = TrainConfig(steps=steps, schedule=saved["schedule"], sae=cfg.sae)
    if [phase_at(s, old.phases())[1] for s in range(step)] != [
        phase_at(s, cfg.phases())[1] for s in range(step)
    ]:
        raise ConfigError(
            f"cannot resume {cfg.out}: --schedule {cfg.schedule!r} changes the phases of the "
            f"{step} steps already trained ({saved['schedule']!r})"
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
