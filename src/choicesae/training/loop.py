"""The training loop: a function over batches of activations that reads like the paper.

for each batch x:  z' = encoder(x);  z = σ_s(z');  x̂ = decoder(z)
                   loss = |x − x̂|² (+ L1 | aux_k + aux_zipf | Multi-TopK | NFM);  AdamW step
                   project decoder rows to unit norm; count firings per latent
every density window: refit Zipf, find dying features, re-rank features (section 3.2)
at a switch to Feature Choice: take the Zipf (α, β) fitted in the phase before (section 4.4)
at the end: estimate the JumpReLU thresholds that encode a token on its own (appendix B)
"""

import contextlib
import dataclasses
import functools
import json
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from choicesae.core.config import TrainConfig
from choicesae.core.sae import SAE
from choicesae.core.schedule import lr_at, phase_at
from choicesae.core.thresholds import estimate_thresholds_
from choicesae.data.activations import (
    Rows,
    batches,
    check_activations,
    check_targets,
    load_activations,
    paired,
)
from choicesae.data.store import open_store
from choicesae.errors import ConfigError, Interrupted, NonFiniteError
from choicesae.parallel import comm, features
from choicesae.parallel.comm import SINGLE, World
from choicesae.parallel.data import DataParallel
from choicesae.step.objective import StepOut, objective
from choicesae.step.ops import LOCAL, Dense, Sparse, batch_codes
from choicesae.threads import warn_if_spinning
from choicesae.training.checkpoint import save_checkpoint
from choicesae.training.loggers import Loggers, open_loggers
from choicesae.training.run import (
    checkpoint_state,
    prepare_run,
    record_source,
    resolve,
    resume_,
)
from choicesae.training.state import TrainState, adopt_zipf_fit_, advance, warn_if_short


def train(cfg: TrainConfig, activations: Rows | tuple[Rows, Rows] | None = None) -> SAE:
    """Train an SAE on `activations` [N, d_in] (or cfg.activations / cfg.store; a transcoder,
    cfg.transcoder, on a pair (inputs [N, d_in], targets [N, d_out]) or a store harvested
    with --target) and save it to cfg.out/sae. Every setting and the data are checked before
    anything is written. Under
    torchrun with --parallel features, rank 0 returns the whole SAE on its CPU and the other
    ranks their shard."""
    rows, d_out = open_rows(cfg, activations)
    cfg = resolve(record_source(cfg, rows), rows.shape[1] - d_out, d_out)
    warn_if_spinning(cfg.device)
    batches(rows, cfg.batch_size, cfg.seed, cfg.device)  # checks the batch size
    world = comm.init_from_env(cfg.device)  # under torchrun: this process's rank
    sharded = features.feature_sharded(cfg, world)
    latents = features.span(cfg.sae.num_latents, world) if sharded else None
    if not sharded:
        comm.check_batch(cfg.batch_size, world)
    out = prepare_run(cfg) if world.main else Path(cfg.out)
    # a generator of its own: every rank starts from the same weights, the caller's RNG untouched
    init = torch.Generator().manual_seed(cfg.seed)
    sae = SAE(cfg.sae, latents, init).to(cfg.device)  # --parallel features: this rank's latents
    optimizer = make_optimizer(sae, cfg)
    if cfg.resume:  # every rank reads the checkpoint: --out must be shared by the nodes
        state = resume_(out, cfg, sae, optimizer, world)
    else:
        # the stream dropped at once: a shared read (data/shared.py) frees its rows
        sae.init_from_data_(next(batches(rows, min(rows.shape[0], 16_384), cfg.seed, cfg.device)))
        state = TrainState.fresh(cfg.sae.num_latents, cfg.device)
    stream = batches(rows, cfg.batch_size, cfg.seed, cfg.device, start=state.step)
    data = stream  # feature sharding: every rank takes the whole batch
    if not sharded:
        data = (comm.shard(x, world) for x in stream)  # this rank's slice of each batch
    loggers = (
        open_loggers(cfg, out, state.step) if world.main else contextlib.nullcontext(Loggers([]))
    )
    with stop_signals() as stop, loggers as log:
        record = run_loop(sae, optimizer, data, cfg, state, log, stop, world)
    final_weights_(sae, optimizer)
    if sharded:  # the whole SAE on rank 0's CPU, the shards elsewhere
        sae = features.whole(sae, world)
    if world.main or not sharded:  # wherever the whole SAE is
        record["thresholds"] = final_thresholds_(sae, stream, cfg)
    if world.main:  # one copy, the same as one process writes: loadable at any world size
        sae.save_pretrained(out / "sae")
        # the last fit, dead and dying counts travel with the model
        (out / "sae" / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return sae


THRESHOLD_STEPS = 100  # steps trained per calibration batch: the estimate costs <= 2% of a run


@torch.no_grad()
def final_thresholds_(sae: SAE, stream: Iterator[Tensor], cfg: TrainConfig) -> dict:
    """Fill the SAE's JumpReLU thresholds (appendix B), so that the saved SAE encodes a token
    on its own by default: estimated with the averaged weights that are saved, on the whole
    batches `stream` gives after the last step (cfg.threshold_tokens of them, at least one
    batch and at most one per THRESHOLD_STEPS steps trained: a batch costs about two steps).
    Returns what they were fitted to; nothing for relu, whose codes are per token already, or
    with threshold_tokens = 0."""
    if cfg.sae.sparsifier == "relu" or not cfg.threshold_tokens:
        return {}
    start = time.perf_counter()
    wanted = -(-cfg.threshold_tokens // cfg.batch_size)
    n = max(1, min(wanted, cfg.total_steps // THRESHOLD_STEPS))
    rows = [next(stream).to(sae.W_enc.device) for _ in range(n)]
    rows = [x for x in rows if torch.isfinite(x).all()]  # as --skip-bad-batches skips them
    if not rows:
        return {}
    codes = functools.partial(batch_codes, sae)  # as the sparse step selects
    fitted = estimate_thresholds_(sae, [sae.prepare(x)[0] for x in rows], codes)
    return fitted | {"seconds": round(time.perf_counter() - start, 3)}


def open_rows(cfg: TrainConfig, activations) -> tuple[Rows, int]:
    """(the training rows, checked, the width d_out of the targets they end with: 0 for an
    autoencoder's rows); refuses targets without --transcoder and the reverse."""
    if activations is None:
        key = cfg.activations_key
        store = cfg.store and open_store(cfg.store, cfg.sae.hookpoint, cfg.cross_layer)
        rows = store or load_activations(cfg.activations, key)
    elif isinstance(activations, tuple):
        rows = paired(*activations)
    else:
        rows = check_activations(activations)
    d_out = activations[1].shape[1] if isinstance(activations, tuple) else 0
    d_out = getattr(rows, "d_target", d_out)  # a store's (or an online harvest's) targets
    source = f"the store {cfg.store}" if cfg.store else "the activations"
    instead = "train one with --transcoder, or harvest the hookpoint alone for an SAE"
    check_targets(cfg.transcoder, d_out > 0, source, instead)
    return rows, d_out


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
        if comm.any_rank(bool(stop), world):  # a signal to one rank stops them all
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
    sae: SAE, optimizer, rows: Tensor, cfg: TrainConfig, state: TrainState, ops=None, world=SINGLE
) -> tuple[StepOut, dict[str, Tensor], Tensor] | None:
    """One optimiser step on raw rows [B, d_in] (a transcoder's [B, d_in + d_out]: input and
    target; under torchrun, this rank's slice of the global batch) with the step's `ops`
    (`step_ops`, one process's by default); returns
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
    x, y = sae.prepare(rows)  # normalized input and target (a transcoder's other hookpoint)
    masks = state.masks(cfg.dead_tokens)
    result = objective(sae, x, cfg, sparsifier, masks, state.step, ops, y)
    # backward, and the sums over ranks that give the global loss, counts and metrics
    result, fired, metrics = ops.backend.reduce(sae, result, y, fired_counts(result.acts), cfg)
    if not torch.isfinite(result.loss):  # a sync point, so that NaN never reaches the weights
        optimizer.zero_grad(set_to_none=True)
        if cfg.skip_bad_batches:
            return None
        cause = "" if torch.isfinite(rows).all() else " (the batch holds NaN or Inf activations)"
        raise NonFiniteError(
            f"the loss is NaN or Inf at step {state.step + 1}{cause}; stopped with the weights "
            f"of step {state.step} and the last checkpoint kept (--skip-bad-batches skips them)"
        )
    sae.mask_grad_()  # a cross-layer transcoder's absent blocks stay zero
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
    if hasattr(optimizer, "eval"):  # schedule-free: train() and eval() swap y and x
        optimizer.eval()
        sae.unit_norm_decoder_()


def step_ops(cfg: TrainConfig, world: World = SINGLE):
    """The ops of a step: the sparse kernels or the dense reference (--kernels), over the
    backend of the run's layout: one process, data parallel (selections over the global batch,
    or each rank's own with --distributed-selection local) or feature sharded."""
    backend = LOCAL
    if features.feature_sharded(cfg, world):  # --parallel features
        if cfg.sae.per_layer:
            raise ConfigError(
                "per_layer selects within each layer's block, which --parallel features (whose "
                "shards cut across the blocks) does not do yet: use --parallel data"
            )
        backend = features.FeatureSharded(world, cfg.sae.num_latents)
    elif world.size > 1:
        layers = cfg.sae.layers if cfg.sae.per_layer else 1
        backend = DataParallel(world, cfg.distributed_selection == "global", layers)
    return (Sparse if cfg.kernels == "sparse" else Dense)(backend)


def fired_counts(acts: Tensor) -> Tensor:
    """[F] tokens each latent fired on, from dense [B, F] activations or the sparse COO ones
    of the sparse kernels (which may hold explicit zeros: selected, then cut by ReLU)."""
    if not acts.is_sparse:
        return (acts != 0).sum(0)
    acts = acts.coalesce()
    live = acts.values() != 0
    return torch.bincount(acts.indices()[1][live], minlength=acts.shape[1])


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


OPTIMIZED = ("W_enc", "W_dec", "W_skip", "b_enc", "b_dec")  # the optimizer's order, if held
DECAYED = OPTIMIZED[:3]  # the weight matrices


def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or schedule-free AdamW in train mode (gradients are taken at y), with weight
    decay on the weight matrices only (a skip transcoder's W_skip among them)."""
    params = [(n, getattr(sae, n)) for n in OPTIMIZED if getattr(sae, n) is not None]
    groups = [
        {"params": [p for n, p in params if n in DECAYED], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if n not in DECAYED], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr_of(cfg, 0))
    try:  # imported here: the package's other paths run without it (benchmarks/gpu.sh)
        import schedulefree
    except ImportError as e:
        raise ConfigError(
            f"optimizer {cfg.optimizer!r} needs the schedulefree package ({e}): install it, "
            "or pass --optimizer adamw"
        ) from e
    optimizer = schedulefree.AdamWScheduleFree(groups, lr=lr_of(cfg, 0))
    optimizer.train()
    return optimizer


def base_iterate(checkpoint: dict) -> dict[str, Tensor]:
    """Schedule-free's base sequence z of a checkpoint, by weight name: the unaveraged iterate
    whose average x the run saves (empty for plain AdamW, whose iterate is what it saves)."""
    state = checkpoint["optimizer"]["state"]
    names = [name for name in OPTIMIZED if name in checkpoint["sae"]]  # W_skip: a skip transcoder
    return {name: state[i]["z"] for i, name in enumerate(names) if "z" in state.get(i, {})}
