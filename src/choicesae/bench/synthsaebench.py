"""`choicesae bench synthsaebench`: the paper bench's methods and SAELens's own TopK, BatchTopK and
Matryoshka BatchTopK, trained on SAELens's SynthSAEBench synthetic model and scored by SAELens's
own evaluator, `sae_lens.synthetic.eval_sae_on_synthetic_data` (MCC, F1, explained variance, L0,
dead latents).

The data: SynthSAEBench-16k's published configuration (SAELens's docs/synth_sae_bench.md: 16,384
true features in 768 dimensions, Zipfian firing, 128 hierarchy trees with mutually exclusive
children, low-rank correlations, seed 42), built here with SAELens's SyntheticModel (its hub copy
needs the network), its sizes divided by `scale`. Each seed draws one stream of steps x batch_size
training rows from SAELens's generator, and every method trains on those rows, each seen once;
every method is scored on one held-out stream of another seed.

The methods: the paper bench's (bench/paper.py METHODS and run_config, so that a method is one
thing in the repository), trained by choicesae's train and exported to SAELens by
interop/saelens.py, Mutual and Feature Choice as JumpReLU at per-feature thresholds fitted on the
training rows (appendix B); and SAELens's TopK, BatchTopK and Matryoshka BatchTopK (at the
Matryoshka methods' prefixes), trained by SAELens's SAETrainer with its synthetic runner's
defaults (SyntheticSAERunnerConfig) on the same rows.

Every method trains at its library's default learning rate (ours: the recipe's, schedule.RECIPES;
SAELens's: its synthetic runner's); with --lr-sweep at each factor of --lr-grid
(lr_sweep.LR_FACTORS by default) times it too, and the table gives each method twice: at the
default, and at the factor of the best mean MCC over seeds.

Results accumulate in OUT/results.jsonl (a run already there is not trained again), then
OUT/table.md: mean ± std over seeds. sae-lens (the interop extra) is imported inside the functions
that use it: the command line starts without it, and without its import time.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from choicesae.bench.lr_sweep import default_and_best, lr_cell, lr_factors
from choicesae.bench.paper import (
    METHODS,
    OPTIONAL,
    BenchConfig,
    BenchData,
    calibrate_l1,
    prefixes,
    read_results,
    run_config,
)
from choicesae.core.config import TrainConfig
from choicesae.core.sae import SAE
from choicesae.core.schedule import RECIPES, recipe_lr
from choicesae.errors import ConfigError
from choicesae.evaluation.evaluate import calibrate_thresholds_
from choicesae.interop.saelens import saelens_form, to_saelens
from choicesae.training.loop import train

PEERS = {  # name -> SAELens architecture
    "saelens_topk": "topk",
    "saelens_batchtopk": "batchtopk",
    "saelens_matryoshka_batchtopk": "matryoshka_batchtopk",  # the Matryoshka methods' prefixes
}
HELD_OUT_SEED = 2**31 - 1  # the scoring stream's seed; training streams take the seeds 0, 1, ...
SETTINGS = ("scale", "hidden_dim", "k", "steps", "batch_size", "eval_samples", "switch")


@dataclass(frozen=True)
class SynthSAEBenchConfig:
    """Train the paper bench's methods and SAELens's TopK, BatchTopK and Matryoshka BatchTopK on
    SAELens's SynthSAEBench model, scaled down; SAELens's evaluator scores each (MCC, F1, FVU);
    table over seeds."""

    out: str = ""
    """Folder of the runs, results.jsonl and table.md; empty: runs/bench-synthsaebench."""
    methods: str = ",".join((*METHODS, *PEERS))
    """Comma-separated methods: the paper bench's (see `choicesae bench --help`), and
    saelens_topk, saelens_batchtopk, saelens_matryoshka_batchtopk (SAELens's own SAEs, trained
    by SAELens)."""
    scale: int = 8
    """Divides SynthSAEBench-16k's 16384 true features, 128 hierarchy trees, correlation rank 25
    and recommended SAE width 4096: 8 gives 2048 features and SAE width 512. A power of two, at
    most 128."""
    hidden_dim: int = 192
    """Width d of the synthetic activations (SynthSAEBench-16k: 768; give 768 with --scale 1).
    768/scale would keep its 21 true features per dimension; 192 at scale 8 keeps the true L0
    per dimension nearer its 34/768 (10.9/192, against 10.9/96 at 768/8)."""
    k: int = 8
    """Mean L0 target of every SAE. SynthSAEBench-16k's 25 is the true L0 of its 4096 most
    frequent features; at scale 8 the 512 most frequent fire 8.3 times a sample."""
    seeds: int = 3
    """Seeds: each draws its own training stream and initialises every SAE (the synthetic model
    is SynthSAEBench's, seed 42, for every seed)."""
    steps: int = 4000
    """Optimiser steps of every run; the steps x batch_size training rows are each seen once."""
    batch_size: int = 1024
    """Rows per step (SynthSAEBench's 1024), and the evaluator's batch."""
    eval_samples: int = 100_000
    """Held-out samples the evaluator scores (its default)."""
    switch: float = TrainConfig.mutual_choice_share
    """Share of the phased Feature Choice methods' steps in their Mutual Choice phase (as in
    choicesae bench)."""
    lr_sweep: bool = False
    """Also train every method, SAELens's included, at the other factors of its library's
    default learning rate (lr_sweep.LR_FACTORS); the table gives each method at its default and
    at its best (mean MCC)."""
    lr_grid: str = ""
    """The sweep's factors of each library's default learning rate, comma-separated, 1
    included; empty: 0.5,1,2,4."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = False
    """Show each choicesae run's progress bar."""

    def __post_init__(self):
        unknown = set(self.method_list) - set(METHODS + OPTIONAL) - set(PEERS)
        if unknown or not self.method_list:
            names = ", ".join((*METHODS, *OPTIONAL, *PEERS))
            raise ConfigError(f"methods must be among {names}, got {self.methods!r}")
        if self.scale not in [2**i for i in range(8)]:
            raise ConfigError(f"scale must be a power of two from 1 to 128, got {self.scale}")
        if self.hidden_dim < 2:
            raise ConfigError(f"hidden_dim must be at least 2, got {self.hidden_dim}")
        if not 1 <= self.k < self.num_latents:
            raise ConfigError(f"k must be in [1, {self.num_latents}) at scale {self.scale}")
        for name in ("seeds", "steps", "batch_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        lr_factors(self.lr_sweep, self.lr_grid)  # a grid it can read
        paper_config(self)  # the paper bench's checks of the settings it shares (the switch)

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def num_features(self) -> int:
        return 16_384 // self.scale

    @property
    def num_latents(self) -> int:
        return 4096 // self.scale

    @property
    def folder(self) -> Path:
        return Path(self.out or "runs/bench-synthsaebench")


def model_config(cfg: SynthSAEBenchConfig):
    """SynthSAEBench-16k's SyntheticModelConfig (SAELens's docs/synth_sae_bench.md), its true
    features, trees and correlation rank divided by cfg.scale, its width cfg.hidden_dim."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=cfg.num_features,
        hidden_dim=cfg.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=5e-4
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=128 // cfg.scale,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(
            rank=max(1, round(25 / cfg.scale)), correlation_scale=0.1
        ),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )


def synthetic_model(cfg: SynthSAEBenchConfig):
    """SAELens's SyntheticModel of `model_config` (its dictionary orthogonalised, as published)."""
    from sae_lens.synthetic import SyntheticModel

    return SyntheticModel(model_config(cfg), device=cfg.device)


@contextlib.contextmanager
def seeded(seed: int, device: str) -> Iterator[None]:
    """torch's global generators seeded with `seed` inside, the caller's restored after: SAELens
    samples and initialises from them."""
    with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else None):
        torch.manual_seed(seed)
        yield


def sample_rows(model, rows: int, batch_size: int, seed: int) -> Tensor:
    """[rows, d] activations of the SyntheticModel `model`, drawn batch by batch (as SAELens's
    evaluator draws them) from the generator seeded with `seed`: one seed, one stream."""
    x = torch.empty(rows, model.cfg.hidden_dim, device=model.device)
    with seeded(seed, model.device):
        for start in range(0, rows, batch_size):
            x[start : start + batch_size] = model.sample(min(batch_size, rows - start))
    return x


def paper_config(cfg: SynthSAEBenchConfig) -> BenchConfig:
    """The paper bench's config with this bench's budget, SAE width, phase switch and folder:
    the settings paper.run_config and paper.calibrate_l1 read (data and the paper's token
    counts are not read there)."""
    return BenchConfig(
        data="synthetic",
        out=str(cfg.folder),
        ks=str(cfg.k),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        num_latents=cfg.num_latents,
        switch=cfg.switch,
        train_tokens=cfg.steps * cfg.batch_size,
        eval_tokens=cfg.batch_size,
        d_in=cfg.hidden_dim,
        device=cfg.device,
        progress=cfg.progress,
    )


def exported(sae: SAE, rows: Tensor, path: Path, batch_size: int, seed: int):
    """Our SAE as a SAELens SAE, through our SAELens export: Mutual and Feature Choice select
    within a batch, so they go as JumpReLU at per-feature thresholds, fitted on training rows in
    batches of the training size (appendix B)."""
    import sae_lens

    if saelens_form(sae, "") == "jumprelu":
        calibrate_thresholds_(sae, rows, batch_size, seed=seed)
    return sae_lens.SAE.load_from_disk(to_saelens(sae, path), device=str(sae.W_enc.device))


def default_lr(cfg: SynthSAEBenchConfig, method: str) -> float:
    """The learning rate the method's library trains it at by default: SAELens's synthetic
    runner's (SyntheticSAERunnerConfig: Adam, 3e-4, constant), or our recipe's at this width."""
    if method in PEERS:
        from sae_lens.synthetic import SyntheticSAERunnerConfig

        return SyntheticSAERunnerConfig.lr
    return recipe_lr(RECIPES[TrainConfig.recipe], cfg.num_latents)


def train_peer(cfg: SynthSAEBenchConfig, model, method: str, seed: int, rows: Tensor, lr: float):
    """SAELens's own TopK or BatchTopK SAE with its defaults, trained by SAELens's SAETrainer with
    the synthetic runner's defaults (SyntheticSAERunnerConfig: Adam, constant) but the learning
    rate, on `rows` [N, d] in order."""
    from sae_lens import LoggingConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.synthetic import SyntheticSAERunnerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae_class, sae_config = get_sae_training_class(PEERS[method])
    F, nested = cfg.num_latents, PEERS[method] == "matryoshka_batchtopk"
    widths = {"matryoshka_widths": [*prefixes(F), F]} if nested else {}
    sae_cfg = sae_config(k=cfg.k, d_in=cfg.hidden_dim, d_sae=F, device=cfg.device, **widths)
    runner = SyntheticSAERunnerConfig(
        synthetic_model=model.cfg,
        sae=sae_cfg,
        training_samples=len(rows),
        batch_size=cfg.batch_size,
        lr=lr,
        device=cfg.device,
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
    )
    with seeded(seed, cfg.device):  # SAELens initialises from torch's global generator
        sae = sae_class(sae_cfg)
    batches = iter(rows.split(cfg.batch_size))
    return SAETrainer(cfg=runner.to_sae_trainer_config(), sae=sae, data_provider=batches).fit()


def score(cfg: SynthSAEBenchConfig, model, sae) -> dict:
    """SAELens's evaluator on the held-out stream (every method the same samples, in batches of
    the training size as SAELens's synthetic runner scores), and FVU = 1 - explained variance."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    with seeded(HELD_OUT_SEED, cfg.device):
        result = eval_sae_on_synthetic_data(
            sae,
            model.feature_dict,
            model.activation_generator,
            num_samples=cfg.eval_samples,
            batch_size=cfg.batch_size,
        )
    return {"eval": result.to_dict(), "fvu": 1.0 - result.explained_variance}


def run_one(
    cfg: SynthSAEBenchConfig, model, rows: Tensor, method: str, seed: int, l1: float, factor: float
):
    """Train one method at `factor` x its default learning rate on the seed's rows and score
    it: the record for results.jsonl."""
    lr, start = factor * default_lr(cfg, method), time.perf_counter()
    if method in PEERS:
        sae = train_peer(cfg, model, method, seed, rows, lr)
        seconds = time.perf_counter() - start
    else:
        train_cfg = run_config(paper_config(cfg), method, cfg.k, seed, l1, cfg.hidden_dim)
        if factor != 1.0:  # a folder of its own; the default's keeps the paper bench's name
            train_cfg = dataclasses.replace(train_cfg, out=f"{train_cfg.out}-lr{lr:.2e}")
        ours = train(dataclasses.replace(train_cfg, lr=lr), rows)
        seconds = time.perf_counter() - start
        sae = exported(ours, rows, Path(train_cfg.out) / "saelens", cfg.batch_size, seed)
    record = settings(cfg, method, seed, factor) | {"lr": lr, "train_s": seconds}
    if method == "relu":
        record["l1_coeff"] = l1
    return record | score(cfg, model, sae)


def relu_l1(cfg: SynthSAEBenchConfig, model, rows: Tensor, done: dict) -> float:
    """relu's L1 coefficient as the paper bench sets it (paper.calibrate_l1: short ReLU runs until
    the mean L0 on held-out rows is k), calibrated once, at the default learning rate, on the rows
    at hand, and kept in results.jsonl."""
    key = _key(settings(cfg, "l1", 0))
    if key not in done:
        print(
            f"bench synthsaebench: calibrating relu's L1 coefficient for L0 = {cfg.k}", flush=True
        )
        test = sample_rows(model, 16 * cfg.batch_size, cfg.batch_size, HELD_OUT_SEED)
        data = BenchData(rows, test, torch.zeros(len(test), dtype=torch.bool))
        coeff, tried = calibrate_l1(paper_config(cfg), data, cfg.k)
        append(cfg, settings(cfg, "l1", 0) | {"l1_coeff": coeff, "tried": tried}, done)
    return done[key]["l1_coeff"]


def synthsaebench(cfg: SynthSAEBenchConfig) -> Path:
    """Run (or reuse from OUT/results.jsonl) every (method, seed), seed by seed on that seed's
    training stream; then write OUT/table.md and return its path."""
    if importlib.util.find_spec("sae_lens") is None:
        raise ConfigError("bench synthsaebench needs sae-lens: pip install 'choicesae[interop]'")
    cfg.folder.mkdir(parents=True, exist_ok=True)
    done = {_key(r): r for r in read_results(cfg.folder / "results.jsonl")}
    model = None
    runs = [(m, f) for m in cfg.method_list for f in lr_factors(cfg.lr_sweep, cfg.lr_grid)]
    for seed in range(cfg.seeds):
        todo = [(m, f) for m, f in runs if _key(settings(cfg, m, seed, f)) not in done]
        if not todo:
            continue
        if model is None:  # built once, and only when a run is left to do
            model = synthetic_model(cfg)
        rows = sample_rows(model, cfg.steps * cfg.batch_size, cfg.batch_size, seed)
        for method, factor in todo:
            l1 = relu_l1(cfg, model, rows, done) if method == "relu" else 0.0
            print(f"bench synthsaebench: {method} seed={seed} lr x{factor:g}", flush=True)
            append(cfg, run_one(cfg, model, rows, method, seed, l1, factor), done)
    wanted = {_key(settings(cfg, m, s, f)) for m, f in runs for s in range(cfg.seeds)}
    records = [r for key, r in done.items() if key in wanted]
    (cfg.folder / "table.md").write_text(table(cfg, records))
    return cfg.folder / "table.md"


def settings(cfg: SynthSAEBenchConfig, method: str, seed: int, factor: float = 1.0) -> dict:
    """What names a run in results.jsonl: the method, the seed, its factor of its default
    learning rate and the settings that change it."""
    named = {"method": method, "seed": seed, "lr_factor": factor}
    return named | {name: getattr(cfg, name) for name in SETTINGS}


def _key(record: dict) -> tuple:
    return (_factor(record), *(record[name] for name in ("method", "seed", *SETTINGS)))


def _factor(record: dict) -> float:
    return record.get("lr_factor", 1.0)  # records from before the sweep: the default


def append(cfg: SynthSAEBenchConfig, record: dict, done: dict) -> None:
    """Add a record to results.jsonl and to `done`."""
    with (cfg.folder / "results.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    done[_key(record)] = record


COLUMNS = {  # column title -> the value of a record
    "MCC": lambda r: r["eval"]["mcc"],
    "F1": lambda r: r["eval"]["classification"]["f1_score"],
    "precision": lambda r: r["eval"]["classification"]["precision"],
    "recall": lambda r: r["eval"]["classification"]["recall"],
    "uniqueness": lambda r: r["eval"]["uniqueness"],
    "FVU": lambda r: r["fvu"],
    "L0": lambda r: r["eval"]["sae_l0"],
    "dead": lambda r: r["eval"]["dead_latents"],
    "train s": lambda r: r["train_s"],
}


def table(cfg: SynthSAEBenchConfig, records: list[dict]) -> str:
    """table.md: the settings, then one row per method, mean ± std over seeds of each column."""
    true_l0 = np.mean([r["eval"]["true_l0"] for r in records]) if records else math.nan
    lines = [
        "# choicesae bench synthsaebench",
        "",
        f"SAELens's SynthSAEBench-16k at scale 1/{cfg.scale}: {cfg.num_features} true features "
        f"in d = {cfg.hidden_dim} (true L0 {true_l0:.2f}); SAE width {cfg.num_latents}, k = "
        f"{cfg.k}; {cfg.steps} steps x {cfg.batch_size} rows, each seen once, the same rows for "
        "every method of a seed. Scored by sae_lens.synthetic.eval_sae_on_synthetic_data on "
        f"{cfg.eval_samples} held-out samples; mean ± std over seeds; FVU = 1 - explained "
        "variance. Mutual and Feature Choice encode one sample at a time (JumpReLU at per-feature "
        "thresholds); saelens_batchtopk is scored as SAELens's runner scores it (BatchTopK over "
        f"batches of {cfg.batch_size}). Learning rates: each library's default x "
        f"{', '.join(map(str, lr_factors(cfg.lr_sweep, cfg.lr_grid)))}; a method's best has the "
        "best mean MCC.",
        "",
        "| method | lr | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for method in cfg.method_list:
        by_lr = {  # factor -> the method's records at it
            f: [r for r in records if r["method"] == method and _factor(r) == f]
            for f in lr_factors(cfg.lr_sweep, cfg.lr_grid)
        }
        by_lr = {f: group for f, group in by_lr.items() if group}
        mcc = {f: -np.mean([COLUMNS["MCC"](r) for r in group]) for f, group in by_lr.items()}
        for label, factor in default_and_best(mcc) if by_lr else []:
            group = by_lr[factor]
            cells = [_cell(title, [value(r) for r in group]) for title, value in COLUMNS.items()]
            name = method if label == "default" else f"{method}, best lr"
            lr = lr_cell(factor * default_lr(cfg, method), factor)
            lines.append(f"| {name} | {lr} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(title: str, values: list[float]) -> str:
    digits = {"L0": 2, "dead": 1, "train s": 0}.get(title, 4)
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"
