"""The training loop: a function over batches of activations that reads like the paper.

for each batch x:  z' = encoder(x);  z = σ_s(z');  x̂ = decoder(z)
                   loss = |x − x̂|² (+ L1 | aux_k | Multi-TopK);  AdamW step
                   project decoder rows to unit norm; count tokens since each latent fired
"""

import dataclasses
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from choicesae.config import SAEConfig, TrainConfig
from choicesae.data import Rows, batches, check_activations, load_activations
from choicesae.errors import ChoiceSAEError, ConfigError
from choicesae.losses import aux_k, fired, fvu, l0, l1, mse
from choicesae.preprocess import normalize
from choicesae.sae import SAE
from choicesae.schedule import auto_lr, lr_at
from choicesae.sparsifiers import sparsify, uniform_capacities


class StepOut(NamedTuple):
    loss: Tensor  # scalar, the sum of `terms`
    terms: dict[str, Tensor]  # weighted loss terms, for logging
    acts: Tensor  # [B, F]
    x_hat: Tensor  # [B, d_in]


def loss_terms(sae: SAE, x: Tensor, cfg: TrainConfig, dead: Tensor) -> StepOut:
    """The training objective (paper eq. 3) on normalized inputs x [B, d_in]."""
    name, k = sae.cfg.sparsifier, sae.cfg.k
    z_pre = sae.pre_acts(x)  # [B, F] affinities
    acts = sparsify(name, z_pre, k=k).acts
    x_hat = sae.decode(acts)
    terms = {"mse": mse(x_hat, x)}
    if cfg.multi_topk:  # Gao et al. 5.3.1: L(k) + L(4k)/8
        terms["mse_4k"] = mse(sae.decode(sparsify(name, z_pre, k=4 * k).acts), x) / 8
    if name == "relu":
        terms["l1"] = cfg.l1_coeff * l1(acts, sae.W_dec)
    elif cfg.aux_k_coeff:
        residual = (x - x_hat).detach()  # aux_k only moves the dead latents
        terms["aux_k"] = cfg.aux_k_coeff * aux_k(z_pre, dead, residual, sae.W_dec, cfg.k_aux)
    return StepOut(sum(terms.values()), terms, acts, x_hat)


def train(cfg: TrainConfig, activations: Rows | None = None) -> SAE:
    """Train an SAE on `activations` [N, d_in] (or the file cfg.activations) and save it to
    cfg.out/sae. Every setting and the data are checked before the first step."""
    if activations is None:
        rows = load_activations(cfg.activations, cfg.activations_key)
    else:
        rows = check_activations(activations)
    cfg = dataclasses.replace(cfg, sae=cfg.sae.resolve(rows.shape[1]))  # re-validates
    check_budget(cfg.sae, cfg.batch_size)
    data = batches(rows, cfg.batch_size, cfg.seed, cfg.device)
    out = prepare_run(cfg)

    torch.manual_seed(cfg.seed)
    sae = SAE(cfg.sae).to(cfg.device)
    sae.init_from_data_(next(batches(rows, min(rows.shape[0], 16_384), cfg.seed, cfg.device)))
    peak_lr = cfg.lr or auto_lr(cfg.sae.num_latents)
    optimizer = torch.optim.AdamW(
        [
            {"params": [sae.W_enc, sae.W_dec], "weight_decay": cfg.weight_decay},
            {"params": [sae.b_enc, sae.b_dec], "weight_decay": 0.0},
        ],
        lr=peak_lr,
    )
    since_fired = torch.zeros(cfg.sae.num_latents, dtype=torch.long, device=cfg.device)
    window, start = defaultdict(float), time.perf_counter()

    with open(out / "metrics.jsonl", "a") as log:
        bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not cfg.progress)
        for step, x in zip(bar, data, strict=False):
            lr = lr_at(step, cfg.steps, peak_lr, cfg.warmup_steps, cfg.decay_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, _ = normalize(x, cfg.sae.normalize, sae.scale)
            dead = since_fired >= cfg.dead_tokens
            result = loss_terms(sae, x, cfg, dead)
            result.loss.backward()
            sae.remove_parallel_grad_()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sae.unit_norm_decoder_()
            since_fired = torch.where(fired(result.acts), 0, since_fired + cfg.batch_size)

            accumulate(window, result, x)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                record = summarize(window, step + 1, cfg.batch_size, lr, dead)
                record["elapsed_s"] = round(time.perf_counter() - start, 3)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "l0", "fvu", "dead_pct")})
    sae.save_pretrained(out / "sae")
    return sae


def accumulate(window: dict, out: StepOut, x: Tensor) -> None:
    """Add this step's metrics to the logging window (tensors: no sync until logged)."""
    with torch.no_grad():
        window["loss"] += out.loss.detach()
        for name, value in out.terms.items():
            window[name] += value.detach()
        window["fvu"] += fvu(out.x_hat, x)
        window["l0"] += l0(out.acts)
        window["n"] += 1


def summarize(window: dict, step: int, batch_size: int, lr: float, dead: Tensor) -> dict:
    """Empty the logging window into one metrics record (one sync point per log line)."""
    n = window.pop("n")
    record = {"step": step, "tokens": step * batch_size, "lr": lr}
    record |= {name: float(total) / n for name, total in window.items()}
    record["dead_pct"] = 100 * float(dead.float().mean())
    window.clear()
    if not math.isfinite(record["loss"]):
        raise ChoiceSAEError(f"the loss became NaN or Inf by step {step}")
    return record


def check_budget(sae_cfg: SAEConfig, batch_size: int) -> None:
    """Refuse a Feature Choice batch too small to give every feature a token (footnote 8)."""
    if sae_cfg.sparsifier == "feature_choice":
        uniform_capacities(sae_cfg.k, batch_size, sae_cfg.num_latents)


def prepare_run(cfg: TrainConfig) -> Path:
    """Create the run folder and write the resolved config; refuse to clobber a finished run."""
    out = Path(cfg.out)
    if (out / "config.json").exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already holds a run; pick another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")
    except OSError as e:
        raise ConfigError(f"cannot write to the output folder {out}: {e}") from e
    return out
