"""`choicesae bench synthetic|minilm|smollm2`: the paper's comparisons, end to end, on data
anyone can regenerate (docs/results.md reports what they show).

Every method trains on the same rows with the same token budget (steps x batch) and the same
mean L0 target k, over several seeds and two or three k; each trained SAE is then measured on
held-out rows with batch inference and with single-token JumpReLU inference (appendix B: a
threshold per feature, and the BatchTopK post's one global threshold):

  topk                 Token Choice (Gao et al.)
  mutual_choice        Mutual Choice = BatchTopK; its global-threshold column is BatchTopK
                       with the threshold at inference
  feature_choice       Feature Choice as `choicesae train` trains it by default: phased,
                       Mutual Choice for --switch of the steps (section 4.4), then capacities
                       in proportion to Mutual Choice's densities
  feature_choice_uniform  Feature Choice from the first step, uniform capacities M/F (4.3)
  feature_choice_zipf  phased: Mutual Choice, then Zipf Feature Choice (section 4.4)
  relu                 ReLU + L1, the L1 coefficient calibrated to reach L0 = k
  mutual_choice_no_aux_zipf   Mutual Choice with aux_k only (the aux_zipf ablation)
and, not run by default:
  feature_choice_zipf_alpha   phased Zipf, with the Zipf exponent alpha fitted too
  topk_matryoshka, mutual_choice_matryoshka, feature_choice_matryoshka
                       the same SAEs trained as Matryoshka SAEs, prefixes F/16 and F/4
  mutual_choice_fc_inference, feature_choice_mc_inference  controls of what the Feature
                       Choice phase buys: Mutual Choice's weights run as a Feature Choice
                       (density) SAE, with no Feature Choice training, and the default
                       Feature Choice's weights run as a Mutual Choice SAE;
  mutual_choice_unaveraged, feature_choice_unaveraged  schedule-free's last unaveraged
                       iterate z in place of the average it saves

On a model (minilm, smollm2) the held-out rows are the harvest's first contexts, text of the
same kind as training, and, with --other-text, a second harvest of text of another kind; each
SAE is spliced into the model on both (loss recovered; for the causal LM SmolLM2 also ΔCE and
KL, splice.py), by batch inference and by its per-feature thresholds.

Results accumulate in OUT/results.jsonl (a run already there is not trained again), then
OUT/table.md, OUT/pareto.png (L0-FVU), OUT/phase_switch.png (FVU across the switch to Feature
Choice) and OUT/features_per_token.png are written from them.
"""

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.preprocess import normalize
from choicesae.core.sae import SAE
from choicesae.core.thresholds import estimate_thresholds_
from choicesae.data.harvest import HarvestConfig, harvest
from choicesae.data.hooks import DEFAULT_HOOKPOINT, DEFAULT_MODEL, SMOLLM2
from choicesae.data.store import Store
from choicesae.data.synthetic import SyntheticConfig, max_cosines, sparse_dictionary
from choicesae.errors import ConfigError
from choicesae.evaluation import metrics
from choicesae.evaluation.evaluate import compare_inference, first_tokens, splice_metrics
from choicesae.training.checkpoint import load_checkpoint
from choicesae.training.loop import base_iterate, train

METHODS = (
    "topk",
    "mutual_choice",
    "feature_choice",
    "feature_choice_uniform",
    "feature_choice_zipf",
    "relu",
    "mutual_choice_no_aux_zipf",
)
NESTED = ("topk", "mutual_choice", "feature_choice")  # METHOD_matryoshka: Matryoshka prefixes
CONTROLS = (
    "mutual_choice_fc_inference",
    "feature_choice_mc_inference",
    "mutual_choice_unaveraged",
    "feature_choice_unaveraged",
)
RUN_AS = {  # a control's suffix -> the SAE config it runs its trained weights with
    "_fc_inference": {"sparsifier": "feature_choice", "capacities": "density"},
    "_mc_inference": {"sparsifier": "mutual_choice"},
}
OPTIONAL = (  # not by default
    "feature_choice_zipf_alpha",
    *(f"{m}_matryoshka" for m in NESTED),
    *CONTROLS,
)

# each data set's default budget: long enough that training FVU has flattened, short enough
# that the whole bench takes well under an hour on 2 CPU cores (docs/results.md)
DEFAULTS = {
    "synthetic": {
        "steps": 1000,
        "batch_size": 4096,
        "num_latents": 768,
        "train_tokens": 262_144,
    },
    "minilm": {"steps": 1000, "batch_size": 1536, "num_latents": 1536, "train_tokens": 524_288},
    "smollm2": {"steps": 600, "batch_size": 1536, "num_latents": 2304, "train_tokens": 393_216},
}
# the model and hookpoint of each model's bench: MiniLM's layer 3 of 0..5 and SmolLM2's layer 15
# of 0..29, the middle of each, as the paper's GPT-2 layer 6 of 12 (section 5)
MODELS = {"minilm": (DEFAULT_MODEL, DEFAULT_HOOKPOINT), "smollm2": (SMOLLM2, "layers.15")}


@dataclass(frozen=True)
class BenchConfig:
    """Train every sparsifier at matched L0 and token budget over seeds; table and plots."""

    data: Literal["synthetic", "minilm", "smollm2"] = "synthetic"
    """synthetic: the ground-truth generator (MMCS and recovery are defined); minilm: the
    embedded all-MiniLM-L6-v2's activations over the default corpus (loss recovered is);
    smollm2: the causal LM SmolLM2-135M's (CE loss recovered, ΔCE and KL are)."""
    out: str = ""
    """Folder of the runs, results.jsonl, table.md and the plots; empty: runs/bench-DATA."""
    methods: str = ",".join(METHODS)
    """Comma-separated methods (see `choicesae bench --help` and docs/results.md)."""
    ks: str = "8,16"
    """Comma-separated mean L0 targets k: one Pareto point per k."""
    seeds: int = 3
    """Seeds per (method, k): data order and initialisation (the synthetic data stays fixed)."""
    steps: int = 0
    """Optimiser steps of every run (the token budget is steps x batch_size); 0: 1000 (synthetic:
    where recovery and training FVU have flattened, docs/results.md)."""
    batch_size: int = 0
    """Tokens per step; 0: 4096 on synthetic, the paper's 1536 on minilm."""
    num_latents: int = 0
    """Latents F of every SAE; 0: 768 on synthetic (1.5x the true features, so some can
    die), 1536 on minilm (4x its width)."""
    switch: float = TrainConfig.mutual_choice_share
    """Share of the phased Feature Choice methods' steps spent in their Mutual Choice phase
    (feature_choice_uniform has none)."""
    train_tokens: int = 0
    """Training rows (synthetic: generated; minilm: harvested, first tokens kept); 0: 262144
    synthetic, 524288 minilm."""
    eval_tokens: int = 65_536
    """Held-out rows measured (whole batches)."""
    d_in: int = 128
    """Width of the synthetic data (minilm: 384, the model's)."""
    true_features: int = 512
    """Size of the synthetic true dictionary (plus one first-token direction)."""
    mean_active: float = 16.0
    """Mean active true features per synthetic token."""
    splice_contexts: int = 128
    """Models: held-out contexts for the loss recovered with the SAE spliced in, on each
    held-out text (0 skips)."""
    other_text: str = ""
    """Models: text of another kind (harvest --text, e.g. the Python library reference,
    /usr/share/doc/python3.11/html/_sources/library) whose first eval_tokens rows are a second
    held-out set; empty: none."""
    k_aux: int = 0
    """Latents per token of aux_k and aux_zipf; 0: d_in / 2, near Gao et al.'s power of two
    close to d_model / 2 (train's default of 512 is meant for wide SAEs on large models)."""
    lr: float = 0.0
    """Peak learning rate of every run; 0: train's default recipe (schedule.RECIPES)."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = False
    """Show each run's progress bar."""

    def __post_init__(self):
        if self.data not in DEFAULTS:
            raise ConfigError(f"data must be one of {', '.join(DEFAULTS)}, not {self.data!r}")
        for name, value in DEFAULTS[self.data].items():
            if getattr(self, name) == 0:
                object.__setattr__(self, name, value)  # frozen: filled in once, here
        unknown = set(self.method_list) - set(METHODS + OPTIONAL)
        if unknown or not self.method_list:
            names = ", ".join(METHODS + OPTIONAL)
            raise ConfigError(f"methods must be among {names}, got {self.methods!r}")
        if not self.k_list or min(self.k_list) < 1 or max(self.k_list) >= self.num_latents:
            raise ConfigError(f"ks must be integers in [1, num_latents), got {self.ks!r}")
        for name in ("seeds", "steps", "batch_size", "train_tokens", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.switch < 1 or round(self.switch * self.steps) in (0, self.steps):
            raise ConfigError(f"switch must leave both phases steps, got {self.switch}")
        if self.eval_tokens < self.batch_size or self.train_tokens < self.batch_size:
            raise ConfigError("train_tokens and eval_tokens must hold at least one batch")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def k_list(self) -> list[int]:
        try:
            return sorted({int(k) for k in self.ks.split(",") if k.strip()})
        except ValueError:
            raise ConfigError(f"ks must be comma-separated integers, got {self.ks!r}") from None

    @property
    def folder(self) -> Path:
        return Path(self.out or f"runs/bench-{self.data}")


@dataclass
class BenchData:
    """Training rows, held-out rows and what is known about them."""

    train: Tensor  # [N, d_in]
    test: Tensor  # [N_test, d_in], whole batches
    first: Tensor  # [N_test] bool: the first token of a context (or its synthetic stand-in)
    dictionary: Tensor | None = None  # [n_true, d_in] the true directions (synthetic only)
    store: Store | None = None  # the harvest the held-out rows open (models only)
    other: "BenchData | None" = None  # held-out rows of text of another kind (--other-text)


def synthetic_data(cfg: BenchConfig) -> BenchData:
    """The generator's rows: the first eval_tokens held out, the rest for training."""
    syn = SyntheticConfig(
        tokens=cfg.train_tokens + cfg.eval_tokens,
        d_in=cfg.d_in,
        num_features=cfg.true_features,
        mean_active=cfg.mean_active,
    )
    x, dictionary = sparse_dictionary(syn)
    test = x[: cfg.eval_tokens // cfg.batch_size * cfg.batch_size]
    cos = test @ dictionary[-1] / test.norm(dim=-1).clamp_min(1e-12)
    return BenchData(x[cfg.eval_tokens :], test, cos > 0.99, dictionary)


def model_data(cfg: BenchConfig) -> BenchData:
    """A harvest of the bench's model (MODELS) over the default corpus, first tokens kept (the
    paper trains on every position); cached in data/bench-DATA. Its first eval_tokens rows (the
    first contexts, which splice.py runs through the model) are held out, and with
    --other-text so are the first rows of a harvest of that text (data/bench-DATA-other)."""
    store = bench_harvest(cfg, "default", cfg.train_tokens + cfg.eval_tokens, "")
    x = store[np.arange(len(store))].float()
    data = heldout(cfg, store, x[: cfg.eval_tokens])
    data.train = x[cfg.eval_tokens :]
    if cfg.other_text:
        other = bench_harvest(cfg, cfg.other_text, cfg.eval_tokens, "-other")
        data.other = heldout(cfg, other, other[np.arange(len(other))].float())
    return data


def bench_harvest(cfg: BenchConfig, text: str, tokens: int, suffix: str) -> Store:
    """The bench model's activations over `text` (a finished harvest with these settings is
    reused)."""
    model, hookpoint = MODELS[cfg.data]
    harvest_cfg = HarvestConfig(
        model=model,
        hookpoint=hookpoint,
        text=text,
        tokens=tokens,
        drop_first=False,
        out=f"data/bench-{cfg.data}{suffix}",
        progress=cfg.progress,
        device=cfg.device,
    )
    return harvest(harvest_cfg)


def heldout(cfg: BenchConfig, store: Store, x: Tensor) -> BenchData:
    """Held-out rows x (the store's first), cut to whole batches and shuffled once, so that
    batch rules meet batches mixed as in training rather than runs of one document."""
    n_test = len(x) // cfg.batch_size * cfg.batch_size
    if n_test < 1:
        raise ConfigError(f"{store.path} holds fewer rows than one batch of {cfg.batch_size}")
    first = first_tokens(store.manifest, n_test)
    order = torch.randperm(n_test, generator=torch.Generator().manual_seed(0))
    return BenchData(x[:0], x[:n_test][order], first[order], store=store)


def prefixes(num_latents: int) -> list[int]:
    """The Matryoshka methods' prefix sizes: F/16 and F/4 (the whole dictionary is the last)."""
    return [num_latents // 16, num_latents // 4]


def run_config(
    cfg: BenchConfig, method: str, k: int, seed: int, l1_coeff: float, d_in: int
) -> TrainConfig:
    """The TrainConfig of one bench run: the shared budget plus what the method changes (a
    control trains as the method it controls)."""
    out = str(cfg.folder / "runs" / f"{method}-k{k}-s{seed}")
    method = trained_as(method)
    base = method.removesuffix("_matryoshka")
    fc = base.startswith("feature_choice")
    sparsifier = "feature_choice" if fc else base.removesuffix("_no_aux_zipf")
    variant = base.removeprefix("feature_choice").removeprefix("_")  # "": the default's
    capacities = variant.removesuffix("_alpha") or SAEConfig.capacities
    return TrainConfig(
        out=out,
        overwrite=True,
        sae=SAEConfig(
            sparsifier=sparsifier,
            k=k,
            num_latents=cfg.num_latents,
            capacities=capacities if fc else SAEConfig.capacities,
        ),
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        mutual_choice_share=0.0 if variant == "uniform" else cfg.switch,  # section 4.3 or 4.4
        fit_alpha=method == "feature_choice_zipf_alpha",
        matryoshka=",".join(map(str, prefixes(cfg.num_latents))) if base != method else "",
        lr=cfg.lr,
        l1_coeff=l1_coeff,
        aux_zipf_coeff=0.0 if method.endswith("_no_aux_zipf") else -1.0,  # the defaults
        k_aux=cfg.k_aux or d_in // 2,
        density_tokens=min(500_000, cfg.steps * cfg.batch_size // 8),
        checkpoint_every=cfg.steps,
        log_every=10,
        seed=seed,
        device=cfg.device,
        progress=cfg.progress,
    )


def trained_as(method: str) -> str:
    """The method a control's SAE is trained as (any other method: itself)."""
    for suffix in (*RUN_AS, "_unaveraged"):
        method = method.removesuffix(suffix)
    return method


@torch.no_grad()
def controlled(method: str, sae: SAE, train_cfg: TrainConfig) -> SAE:
    """The SAE a control measures (`measure` then fits its thresholds): the same weights run
    with another rule (RUN_AS: Feature Choice with density capacities, from the densities of
    Mutual Choice's last window; Mutual Choice), or schedule-free's unaveraged iterate z from
    the last checkpoint in place of the saved average. Any other method's SAE as it is."""
    run_as = [rule for suffix, rule in RUN_AS.items() if method.endswith(suffix)]
    if run_as:
        cfg = dataclasses.replace(sae.cfg, **run_as[0])
        other = SAE(cfg, generator=torch.Generator()).to(sae.W_enc.device)
        other.load_state_dict(sae.state_dict())
        return other
    if method.endswith("_unaveraged"):
        other = copy.deepcopy(sae)
        for name, z in base_iterate(load_checkpoint(Path(train_cfg.out))).items():
            getattr(other, name).copy_(z)
        return other
    return sae


def measure(sae: SAE, data: BenchData, train_cfg: TrainConfig, splice_contexts: int) -> dict:
    """Held-out metrics of a trained SAE: batch and threshold inference side by side (the
    thresholds calibrated on training rows), dead and dying, features per token, MMCS and
    recovery against the true dictionary when there is one, the downstream metrics with the
    SAE spliced into the model (`splice_contexts` contexts; 0 skips them), and the same again
    under "other" on held-out text of another kind."""
    B = train_cfg.batch_size
    gen = torch.Generator().manual_seed(train_cfg.seed)
    calibration = data.train[torch.randperm(len(data.train), generator=gen)[: 8 * B]]
    x_cal, _ = normalize(calibration.to(train_cfg.device), sae.cfg.normalize, sae.scale)
    estimate_thresholds_(sae, list(x_cal.split(B)))
    result = measure_heldout(sae, data, B, splice_contexts)
    if data.dictionary is not None:
        cos = max_cosines(data.dictionary, sae.W_dec.detach().cpu())
        result |= {"mmcs": float(cos.mean()), "recovered": float((cos >= 0.9).float().mean())}
    if data.other is not None:
        result["other"] = measure_heldout(sae, data.other, B, splice_contexts)
    return result


def measure_heldout(sae: SAE, data: BenchData, B: int, splice_contexts: int) -> dict:
    """What `measure` records of one held-out set, data.test (and data.store's contexts)."""
    device = sae.W_enc.device
    inference, passes = compare_inference(sae, data.test.to(device), B)
    batch = passes["batch"]
    allocation = metrics.allocation_metrics(batch.counts, len(data.test), float(sae.zipf[0]))
    F = sae.cfg.num_latents
    result = {
        "inference": {
            mode: {"l0": v["l0"], "fvu": v["fvu"], "dead_pct": 100 * v["dead"] / F}
            for mode, v in inference.items()
        },
        "dead_pct": allocation["dead_pct"],
        "dying_pct": 100 * allocation["dying"] / sae.cfg.num_latents,
        "features_per_token": metrics.features_per_token(batch.l0, data.first),
    }
    if data.store is not None and splice_contexts:
        x_mean = data.test.mean(0).to(device)
        splice = splice_metrics(sae, data.store, x_mean, splice_contexts, B)
        result["loss_recovered"] = splice["loss_recovered"]
        result["splice"] = {
            k: splice[k] for k in ("losses", "delta_loss", "kl", "kl_recovered") if k in splice
        }
    return result


def run_one(cfg: BenchConfig, data: BenchData, method: str, k: int, seed: int, l1: float) -> dict:
    """Train one method and measure it; the record that goes to results.jsonl."""
    train_cfg = run_config(cfg, method, k, seed, l1, data.train.shape[1])
    start = time.perf_counter()
    sae = controlled(method, train(train_cfg, data.train), train_cfg)
    seconds = time.perf_counter() - start
    record = {"method": method, "k": k, "seed": seed, "steps": cfg.steps}
    record |= {"train_s": seconds, "step_ms": 1000 * seconds / cfg.steps}
    if method == "relu":
        record["l1_coeff"] = l1
    return record | measure(sae, data, train_cfg, cfg.splice_contexts)


def calibrate_l1(cfg: BenchConfig, data: BenchData, k: int, tries: int = 6) -> tuple[float, list]:
    """The L1 coefficient giving ReLU SAEs a mean held-out L0 near k: short runs (half the
    steps, seed 0) stepped in log-log space, where L0 falls roughly as a power of the
    coefficient (`_next_coeff`). Returns (coefficient, [(coefficient, L0), ...])."""
    short = dataclasses.replace(cfg, steps=max(cfg.steps // 2, 10))
    coeff, tried = 0.1, []
    for _ in range(tries):
        train_cfg = dataclasses.replace(
            run_config(short, "relu", k, 0, coeff, data.train.shape[1]),
            out=str(cfg.folder / "runs" / f"l1-k{k}"),
        )
        sae = train(train_cfg, data.train)
        x, _ = normalize(data.test.to(cfg.device), sae.cfg.normalize, sae.scale)
        l0 = float((sae.encode(x).acts > 0).sum(-1).float().mean())
        tried.append((coeff, l0))
        if abs(math.log(max(l0, 1e-3) / k)) < 0.05:
            return coeff, tried
        coeff = _next_coeff(tried, k)
    return coeff, tried


def _next_coeff(tried: list[tuple[float, float]], k: int) -> float:
    """The next coefficient towards L0 = k: once the tries bracket k, log-log interpolation
    between the closest try above and the closest below (regula falsi: it stays inside the
    bracket); before, a step along the slope of the last two tries (-1 at first), at most a
    factor of 10."""
    log = lambda v: math.log(max(v, 1e-3))  # noqa: E731
    above = [t for t in tried if t[1] > k]
    below = [t for t in tried if t[1] <= k]
    if above and below:
        (c0, l0), (c1, l1) = max(above), min(below)  # the tightest bracket
        w = (log(l0) - log(k)) / (log(l0) - log(l1))
        return math.exp(log(c0) + w * (log(c1) - log(c0)))
    (c1, l1), slope = tried[-1], -1.0
    if len(tried) > 1 and tried[-2][1] != l1:
        c0, l0 = tried[-2]
        slope = min(-0.2, max(-5.0, (log(l1) - log(l0)) / (log(c1) - log(c0))))
    step = (log(k) - log(l1)) / slope
    return c1 * math.exp(min(math.log(10), max(-math.log(10), step)))


def bench(cfg: BenchConfig) -> Path:
    """Run (or reuse from OUT/results.jsonl) every (method, k, seed), then write the table
    and the plots; returns OUT/table.md."""
    out = cfg.folder
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic_data(cfg) if cfg.data == "synthetic" else model_data(cfg)
    results_path = out / "results.jsonl"
    done = {_key(r): r for r in read_results(results_path)}
    relu = "relu" in cfg.method_list
    l1 = {k: _l1_for(cfg, data, k, done) if relu else 0.0 for k in cfg.k_list}
    for seed in range(cfg.seeds):  # seed by seed: a bench cut short still spans every k
        for k in cfg.k_list:
            for method in cfg.method_list:
                if (method, k, seed, cfg.steps) in done:
                    continue
                print(f"bench {cfg.data}: {method} k={k} seed={seed}", flush=True)
                record = run_one(cfg, data, method, k, seed, l1[k])
                done[_key(record)] = record
                with results_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    records = [r for r in done.values() if r["steps"] == cfg.steps and r["method"] != "l1"]
    return write_outputs(cfg, records)


def _key(record: dict) -> tuple:
    return record["method"], record["k"], record["seed"], record["steps"]


def _l1_for(cfg: BenchConfig, data: BenchData, k: int, done: dict) -> float:
    """The calibrated L1 coefficient for k, calibrated once and kept in results.jsonl."""
    key = ("l1", k, 0, cfg.steps)
    if key not in done:
        print(f"bench {cfg.data}: calibrating the L1 coefficient for L0 = {k}", flush=True)
        coeff, tried = calibrate_l1(cfg, data, k)
        done[key] = {"method": "l1", "k": k, "seed": 0, "steps": cfg.steps}
        done[key] |= {"l1_coeff": coeff, "tried": tried}
        with (cfg.folder / "results.jsonl").open("a") as f:
            f.write(json.dumps(done[key]) + "\n")
    return done[key]["l1_coeff"]


def read_results(path: Path) -> list[dict]:
    """The records of results.jsonl; a line cut short by a crash is dropped (rerun it)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


COLUMNS = {  # column title -> the value of a record
    "L0": lambda r: r["inference"]["batch"]["l0"],
    "FVU": lambda r: r["inference"]["batch"]["fvu"],
    "FVU θ_i": lambda r: _threshold(r, "feature_threshold", "fvu"),
    "L0 θ_i": lambda r: _threshold(r, "feature_threshold", "l0"),
    "FVU θ": lambda r: _threshold(r, "global_threshold", "fvu"),
    "L0 θ": lambda r: _threshold(r, "global_threshold", "l0"),
    "loss rec. %": lambda r: _downstream(r, "loss_recovered", "sae", 100),
    "loss rec. θ_i %": lambda r: _downstream(r, "loss_recovered", "sae_feature_threshold", 100),
    "ΔCE": lambda r: _downstream(r, "delta_loss", "sae"),
    "ΔCE θ_i": lambda r: _downstream(r, "delta_loss", "sae_feature_threshold"),
    "KL": lambda r: _downstream(r, "kl", "sae"),
    "KL θ_i": lambda r: _downstream(r, "kl", "sae_feature_threshold"),
    "dead %": lambda r: r["dead_pct"],
    "dead % θ_i": lambda r: _threshold(r, "feature_threshold", "dead_pct"),
    "dying %": lambda r: r["dying_pct"],
    "MMCS": lambda r: r.get("mmcs"),
    "recovered %": lambda r: 100 * r["recovered"] if "recovered" in r else None,
    "first-token L0": lambda r: r["features_per_token"]["first_token_l0"],
    "step ms": lambda r: r["step_ms"],
}


def _downstream(record: dict, key: str, variant: str, scale: float = 1.0) -> float | None:
    """A downstream metric of the spliced SAE (splice.py): the loss recovered for any model,
    ΔCE and KL for a causal LM only; threshold variants as in `_threshold`."""
    if variant != "sae" and not _batch_rule(record):
        return None
    causal = "kl" in record.get("splice", {})
    values = record.get("splice", {}) | {"loss_recovered": record.get("loss_recovered")}
    if not values.get(key) or (key != "loss_recovered" and not causal):
        return None
    return scale * values[key][variant]


def _threshold(record: dict, mode: str, key: str) -> float | None:
    """Single-token inference numbers, for the methods trained with a batch rule only (TopK
    and ReLU already encode each token on its own; records from before a key have none)."""
    return record["inference"][mode].get(key) if _batch_rule(record) else None


def _batch_rule(record: dict) -> bool:
    return record["method"].startswith(("mutual_choice", "feature_choice"))


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (method, k): every column's mean and standard deviation over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["k"]), []).append(r)
    rows = []
    for (method, k), group in sorted(groups.items(), key=lambda g: (g[0][1], _order(g[0][0]))):
        row = {"method": method, "k": k, "seeds": len(group)}
        for title, value in COLUMNS.items():
            values = [v for v in map(value, group) if v is not None]
            if values:
                row[title] = (float(np.mean(values)), float(np.std(values)))
        rows.append(row)
    return rows


def _order(method: str) -> int:
    return (METHODS + OPTIONAL).index(method)


def markdown_table(rows: list[dict]) -> str:
    """The aggregated rows as a Markdown table, mean ± std over seeds."""
    titles = [t for t in COLUMNS if any(t in row for row in rows)]
    lines = [
        "| method | k | seeds | " + " | ".join(titles) + " |",
        "|---|---|---|" + "---|" * len(titles),
    ]
    for row in rows:
        cells = [_cell(title, row.get(title)) for title in titles]
        lines.append(
            f"| {row['method']} | {row['k']} | {row['seeds']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _cell(title: str, value: tuple[float, float] | None) -> str:
    if value is None:
        return "—"
    digits = 4 if title.startswith(("FVU", "MMCS", "ΔCE", "KL")) else 1
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_outputs(cfg: BenchConfig, records: list[dict]) -> Path:
    """table.md and the plots, from the records of the runs."""
    out = cfg.folder
    rows = aggregate(records)
    header = (
        f"# choicesae bench {cfg.data}\n\n{cfg.steps} steps x {cfg.batch_size} tokens, "
        f"F = {cfg.num_latents}, held-out tokens {cfg.eval_tokens}; mean ± std over seeds. "
        "θ_i: per-feature thresholds, θ: one global threshold (single-token inference).\n\n"
    )
    table = header + markdown_table(rows)
    other = [r | r["other"] for r in records if "other" in r]
    if other:
        table += f"\nHeld out: text of another kind, {cfg.other_text}.\n\n"
        table += markdown_table(aggregate(other))
    (out / "table.md").write_text(table)
    from choicesae.bench.plots import features_per_token_plot, pareto_plot, phase_switch_plot

    pareto_plot(rows, out / "pareto.png")
    phased = ("mutual_choice", "feature_choice", "feature_choice_zipf", "feature_choice_zipf_alpha")
    phase_switch_plot(cfg, out / "phase_switch.png", phased)
    features_per_token_plot(records, max(cfg.k_list), out / "features_per_token.png")
    return out / "table.md"
