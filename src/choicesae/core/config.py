"""Flat config dataclasses, one per concern. Attribute docstrings become the CLI's --help text.

Settings that cannot work are refused here, in __post_init__, with the setting named.
"""

import argparse
import ast
import dataclasses
import functools
import importlib.util
import inspect
import itertools
import json
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from choicesae.core.schedule import RECIPES
from choicesae.core.sparsifiers import CHOICES, TRAINABLE
from choicesae.errors import ConfigError

LOGGERS = ("jsonl", "tensorboard", "wandb")  # the metrics writers (training/loggers.py)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the package each one needs
DEFAULT_STEPS = 10_000  # a run's length when neither --steps nor --schedule gives one
Normalize = Literal["auto", "token", "dataset", "none"]
SparsifierName = Literal[CHOICES]  # the registry's names (sparsifiers.SPARSIFIERS), jumprelu


@dataclass(frozen=True)
class SAEConfig:
    """The architecture: everything needed to rebuild and run a trained SAE."""

    sparsifier: SparsifierName = "topk"
    """Sparsifying activation: topk (Token Choice), mutual_choice (BatchTopK), feature_choice
    (capacities set by --capacities) or relu (standard SAE with an L1 penalty). With --schedule,
    the last phase's sparsifier is the model's. jumprelu (a threshold per feature) is not
    trained: it is what a SAELens jumprelu file imports as."""
    k: int = 32
    """Target active features per token: exact for topk, the batch mean for mutual_choice and
    feature_choice (budget M = k*B); unused by relu and jumprelu."""
    expansion: int = 16
    """Number of latents as a multiple of the input width (used when num_latents is 0)."""
    num_latents: int = 0
    """Number of latents F; 0 means expansion * d_in."""
    d_in: int = 0
    """Input width; 0 means taken from the activations."""
    d_out: int = 0
    """Output width of a transcoder (the target hookpoint's); 0 for an autoencoder, whose
    output is its input. Taken from the store by train --transcoder."""
    normalize: Normalize = "auto"
    """Input preprocessing: token = subtract each token's mean over d_in and scale it to unit L2
    norm (the paper's, section 5); dataset = one scale factor for the whole dataset giving unit
    mean norm; none = raw activations; auto = token for an SAE, dataset for a transcoder (a
    token's norm is information its target depends on: docs/training.md)."""

    capacities: Literal["uniform", "zipf", "density"] = "density"
    """Feature Choice capacities m_i: density = k*B shared in proportion to the features'
    measured densities (after a switch, the phase before's; uniform until a density window has
    closed), the default, chosen by the sweep in docs/training.md; uniform = floor(k*B/F) each
    (section 4.3); zipf = Algorithm 1's capacity at the feature's density rank (Zipf Feature
    Choice)."""
    zipf_alpha: float = 1.0
    """Zipf exponent alpha of the capacities and of the dying-feature expectation (the paper
    fixes 1). Fitted values from training are stored with the weights and take precedence."""
    zipf_beta: float = 6.8
    """Zipf offset beta before any fit (the paper's GPT-2 value); a phase switch to
    feature_choice replaces it with the fit from the previous phase."""
    m_min: int = 1
    """Smallest Zipf capacity: Algorithm 1 floors low ranks to 0, which can never fire; 0 keeps
    Algorithm 1 unchanged."""
    m_max: int = 0
    """Largest Zipf capacity (Algorithm 1's m_max); 0 means the batch size."""
    model: str = ""
    """The model whose activations the SAE reads (recorded with it, and exported as SAELens's
    model_name); filled in from the store's manifest by train --store."""
    hookpoint: str = ""
    """The module path of those activations (SAELens's hook_name); filled in from the store."""
    context: int = 0
    """Tokens per context of the harvest (SAELens's context_size); filled in from the store."""
    target: str = ""
    """A transcoder's target hookpoint, whose output it predicts (SAELens's hook_name_out);
    filled in from the store."""
    skip: bool = False
    """A skip transcoder: a linear path x W_skip [d_in, d_out] added to the prediction beside
    the sparse code (SAELens's skip_transcoder, sparsify's skip_connection); transcoders only."""
    layers: int = 1
    """Layers L of a cross-layer transcoder (CLT): its input is the L layers' MLP inputs side
    by side [x_0 … x_{L-1}], its target their MLP outputs, its latents L blocks of
    num_latents / L; block l reads x_l alone and writes to every output j >= l. 1: a plain SAE
    or transcoder. Taken from the store by train --cross-layer."""
    per_layer: bool = False
    """A CLT's topk and mutual_choice select within each layer's block of latents, k / layers
    per layer (per-layer TopK, per-layer Mutual Choice), instead of over every layer's latents
    at once (the default: the budget k is shared across depth). feature_choice and relu decide
    each latent alone: the same either way."""

    def __post_init__(self):
        if self.sparsifier not in CHOICES:
            raise ConfigError(
                f"unknown sparsifier {self.sparsifier!r}; choose one of {', '.join(CHOICES)}"
            )
        if self.normalize not in ("auto", "token", "dataset", "none"):
            raise ConfigError(
                f"normalize must be auto, token, dataset or none, not {self.normalize!r}"
            )
        for name in ("k", "expansion"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.capacities not in ("uniform", "zipf", "density"):
            raise ConfigError(
                f"capacities must be uniform, zipf or density, not {self.capacities!r}"
            )
        if self.zipf_alpha <= 0 or self.zipf_beta < 0:
            raise ConfigError("zipf_alpha must be positive and zipf_beta not negative")
        for name in ("num_latents", "d_in", "d_out", "m_min", "m_max", "context"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be positive (or 0 for the default)")
        uses_k = self.sparsifier not in ("relu", "jumprelu")
        if self.num_latents and uses_k and self.k >= self.num_latents:
            raise ConfigError(
                f"k={self.k} must be smaller than the number of latents ({self.num_latents})"
            )
        self.check_layers()

    def check_layers(self) -> None:
        """A CLT's widths and budget split into its layers' blocks."""
        L = self.layers
        if L < 1:
            raise ConfigError(f"layers must be at least 1, got {L}")
        if self.per_layer and (L == 1 or self.k % L):
            raise ConfigError(
                f"per_layer splits k={self.k} over a cross-layer transcoder's layers: it needs "
                f"layers > 1 dividing k, got layers={L}"
            )
        if L > 1 and self.normalize == "token":
            raise ConfigError(
                "a cross-layer transcoder normalizes by dataset (or none): token normalization "
                "would mix its layers' inputs"
            )
        for name in ("num_latents", "d_in", "d_out"):
            if getattr(self, name) % L:
                raise ConfigError(
                    f"{name}={getattr(self, name)} must split into the {L} layers' blocks"
                )
        if L > 1 and self.d_in and not self.d_out:
            raise ConfigError("a cross-layer transcoder (layers > 1) needs targets (d_out)")

    @property
    def transcoder(self) -> bool:
        """Whether this maps one hookpoint to another (d_out set) rather than autoencoding."""
        return self.d_out > 0

    @property
    def d_target(self) -> int:
        """Width of what is reconstructed: d_out for a transcoder, else d_in."""
        return self.d_out or self.d_in

    def resolve(self, d_in: int, d_out: int = 0) -> "SAEConfig":
        """This config with the input (and a transcoder's output) width, the number of latents
        and the normalisation filled in."""
        for name, width in (("d_in", d_in), ("d_out", d_out)):
            if getattr(self, name) and getattr(self, name) != width:
                raise ConfigError(
                    f"{name}={getattr(self, name)} does not match the activations' width {width}"
                )
        if self.skip and not d_out:
            raise ConfigError(
                "skip adds a linear path from a transcoder's input to its target: train a "
                "transcoder (--transcoder, a store harvested with --target) or drop --skip"
            )
        auto = "dataset" if d_out else "token"
        normalize = auto if self.normalize == "auto" else self.normalize
        return dataclasses.replace(
            self,
            d_in=d_in,
            d_out=d_out,
            num_latents=self.num_latents or self.expansion * d_in,
            normalize=normalize,
        )


@dataclass(frozen=True)
class TrainConfig:
    """A training run: data, SAE, optimisation and logging."""

    activations: str = ""
    """Activation file [N, d_in]: .npy (memory-mapped) or .safetensors."""
    activations_key: str = ""
    """Tensor name inside a .safetensors file holding several tensors."""
    store: str = ""
    """Activation store folder written by `choicesae harvest` (read through a shuffle buffer
    across its shards); used instead of --activations."""
    out: str = "runs/sae"
    """Run folder: config.json, metrics.jsonl and the trained SAE under sae/."""
    overwrite: bool = False
    """Allow writing into a run folder that already holds a run."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    batch_size: int = 1536
    """Tokens per step (the paper's 1536)."""
    steps: int = 0
    """Optimiser steps; the data is reshuffled and reused when one pass runs out. 0 means
    10000, or with --schedule the sum of its phases (a --steps given with --schedule must be
    that sum)."""
    schedule: str = ""
    """Phased training (section 4.4) as SPARSIFIER:STEPS,..., e.g.
    mutual_choice:8000,feature_choice:2000. Aux losses act outside feature_choice phases; on
    entering feature_choice the Zipf beta (and alpha with --fit-alpha) is fitted to the feature
    densities of the phase before. Empty: --sparsifier for --steps (feature_choice: after
    --mutual-choice-share of them with Mutual Choice)."""
    mutual_choice_share: float = 0.9
    """Share of a --sparsifier feature_choice run's steps trained with Mutual Choice first, the
    phased training of section 4.4 (the default, chosen by the sweep in docs/training.md); 0 =
    Feature Choice from the first step (section 4.3). Not read with --schedule."""
    recipe: Literal["fast", "paper"] = "fast"
    """Optimisation recipe for the settings below left at their 'recipe' value: fast =
    schedule-free AdamW at 2e-3 / sqrt(F / 2^14), 50 warm-up steps, no decay (the default,
    chosen by benchmarks/recipe.py: docs/training.md); paper = AdamW at 2e-4 / sqrt(F / 2^14),
    100 warm-up steps, linear decay over the last 20% (section 5, Gao et al.'s scaling)."""
    optimizer: Literal["recipe", "schedule_free", "adamw"] = "recipe"
    """schedule_free = AdamW with Defazio et al.'s schedule-free averaging (the saved SAE holds
    the averaged weights); adamw = plain AdamW; recipe = the recipe's."""
    lr: float = 0.0
    """Peak learning rate; 0 means the recipe's, scaled by 1 / sqrt(F / 2^14) (Gao et al.)."""
    warmup_steps: int = -1
    """Linear learning-rate warm-up from 0 over this many steps; -1 means the recipe's."""
    decay_fraction: float = -1.0
    """Linear decay to 0 over this last fraction of the steps; -1 means the recipe's."""
    weight_decay: float = 1e-5
    """AdamW weight decay on W_enc and W_dec."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    l1_coeff: float = 0.1
    """L1 penalty on activations, for the relu sparsifier only (inputs of unit norm: about
    0.03 to 0.3 spans L0 from dense to a few features per token)."""
    aux_k_coeff: float = 1 / 32
    """Weight of aux_k_loss (dead latents reconstruct the residual); 0 disables it."""
    k_aux: int = 512
    """Dead latents per token used by aux_k_loss."""
    dead_tokens: int = 1_000_000
    """A latent is dead when it has not fired for this many tokens."""
    aux_zipf_coeff: float = -1.0
    """Weight of aux_zipf_loss (dying latents, Definition 3.1, reconstruct the residual);
    0 disables it; -1 means 1/32 for mutual_choice (section 4.2) and 0 for topk, whose paper
    baseline trains with aux_k only (Gao et al.). Feature Choice and relu train without it."""
    density_tokens: int = 500_000
    """Window of tokens over which feature densities are counted; each closed window refreshes
    the Zipf fit, the dying features and the Zipf capacities' ranks."""
    fit_alpha: bool = False
    """Fit the Zipf exponent alpha too (default: fixed at --zipf-alpha, as in the paper)."""
    dying_expectation: Literal["fit", "budget"] = "fit"
    """The density Definition 3.1 expects at each rank: fit = the Zipf law fitted to the
    window's middle ranks (its level included); budget = appendix G, Algorithm 1's capacity at
    the fitted (alpha, beta) for the budget k*batch_size, over batch_size."""
    nfm_coeff: float = 0.0
    """Weight of nfm_loss = |nfm(W_dec)|_F (appendix C)."""
    nfm_inf_coeff: float = 0.0
    """Weight of nfm_inf_loss, the mean largest similarity between decoder rows (appendix C)."""
    nfm_inf_sample: int = 1024
    """Decoder rows sampled per step for nfm_inf_loss (0: all rows, F^2 d work)."""
    threshold_tokens: int = 32_768
    """Tokens of the training data after the last step (whole batches, at least one and at
    most one per 100 steps trained, so that it costs at most about 2% of the run) on which the
    end of training estimates the JumpReLU thresholds that encode a token on its own
    (appendix B), saved with the SAE; 0 skips them. Every sparsifier but relu."""
    checkpoint_every: int = 1000
    """Write RUN/checkpoint-STEP.pt every this many steps, at the end, and on SIGINT/SIGTERM."""
    keep_checkpoints: int = 3
    """How many of the latest checkpoints to keep."""
    skip_bad_batches: bool = False
    """Skip (and count) batches whose loss is NaN or Inf instead of stopping the run."""
    resume: bool = False
    """Continue the run in --out from its checkpoint."""
    matryoshka: str = ""
    """Prefix sizes m_1 < m_2 < ... < F of a Matryoshka SAE (Bussmann et al. 2025), e.g.
    256,1024: the code is selected once over all latents, then each prefix's latents (feature
    index below m_j) reconstruct the input on their own, and their MSE joins the loss. Empty: a
    plain SAE."""
    matryoshka_weights: str = ""
    """Comma-separated weight of each --matryoshka prefix's MSE (the whole dictionary's MSE
    keeps weight 1); empty: 1 for every prefix."""
    transcoder: bool = False
    """Train a transcoder: read the store's --hookpoint rows and predict its --target rows
    (`choicesae harvest --target`); b_dec is then an output bias the encoder does not
    subtract, and the target is scaled by one dataset factor, as it is unknown at inference."""
    cross_layer: bool = False
    """With --transcoder, train one cross-layer transcoder over every hookpoint of a
    several-hookpoint store (its rows [x_0 … x_{L-1} | y_0 … y_{L-1}]), layers taken from the
    store, rather than one transcoder per hookpoint (docs/training.md)."""
    multi_topk: bool = False
    """Add the Multi-TopK term L(4k)/8 (Gao et al. 5.3.1) for progressive codes."""
    log_every: int = 50
    """Write metrics to metrics.jsonl and the progress bar every this many steps."""
    log: str = "jsonl"
    """Metric writers, comma-separated: jsonl (RUN/metrics.jsonl, always written), tensorboard
    (event files in RUN/tensorboard), wandb (Weights & Biases, in RUN/wandb)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """W&B mode for --log wandb: offline writes the run to RUN/wandb only (upload it later with
    `wandb sync`); online streams it to the W&B server (needs a login)."""
    wandb_project: str = "choicesae"
    """W&B project name for --log wandb."""
    seed: int = 0
    """Seed for initialisation and shuffling."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    kernels: Literal["sparse", "dense"] = "sparse"
    """Training step: sparse = selection, decoder and encoder backward touch only the selected
    (token, feature) pairs (kernels.py; relu once few affinities are positive); dense = plain
    autograd through [B, F] activations, the reference."""
    progress: bool = True
    """Show a progress bar."""
    distributed_selection: Literal["global", "local"] = "global"
    """Under torchrun (several processes, each a slice of --batch-size): global = Mutual
    Choice and Feature Choice select over the whole global batch, as one process would
    (candidate values are exchanged); local = each process selects on its own slice."""
    parallel: Literal["data", "features"] = "data"
    """Under torchrun: data = each process holds the whole SAE and a slice of the batch;
    features = each process sees the whole batch and holds a slice of the latents (encoder
    columns, decoder rows), for SAEs too wide for one device (docs/distributed.md)."""

    def phases(self) -> list[tuple[str, int]]:
        """[(sparsifier, steps)] of the run: the parsed --schedule, or one phase."""
        if not self.schedule:
            steps = self.steps or DEFAULT_STEPS
            first = round(self.mutual_choice_share * steps)
            if self.sae.sparsifier != "feature_choice" or not 0 < first < steps:
                return [(self.sae.sparsifier, steps)]
            return [("mutual_choice", first), ("feature_choice", steps - first)]
        phases = []
        for part in self.schedule.split(","):
            name, _, steps = part.strip().partition(":")
            if name not in TRAINABLE or not steps.strip().isdigit() or int(steps) < 1:
                raise ConfigError(
                    f"schedule entry {part!r} must be SPARSIFIER:STEPS with SPARSIFIER one of "
                    f"{', '.join(TRAINABLE)} and STEPS a positive integer"
                )
            phases.append((name, int(steps)))
        return phases

    @functools.cached_property  # parsed once per config, not at every step's objective
    def prefixes(self) -> list[tuple[int, float]]:
        """[(m_j, weight_j)] of --matryoshka and --matryoshka-weights; [] for a plain SAE."""
        sizes = _numbers(self.matryoshka, int, "matryoshka")
        weights = _numbers(self.matryoshka_weights, float, "matryoshka_weights")
        F = self.sae.num_latents
        if sizes and (sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(sizes))):
            raise ConfigError(f"matryoshka prefix sizes must increase from 1, got {sizes}")
        if F and sizes and sizes[-1] >= F:
            raise ConfigError(
                f"matryoshka prefix sizes must stay below num_latents ({F}), got {sizes}"
            )
        if self.matryoshka_weights and len(weights) != len(sizes):
            raise ConfigError(
                f"matryoshka_weights needs one weight per prefix ({len(sizes)}), got {weights}"
            )
        if any(w < 0 for w in weights):
            raise ConfigError(f"matryoshka_weights must not be negative, got {weights}")
        return list(zip(sizes, weights or [1.0] * len(sizes), strict=True))

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.phases())

    def __post_init__(self):
        positive = (
            "batch_size",
            "log_every",
            "k_aux",
            "dead_tokens",
            "density_tokens",
            "checkpoint_every",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        nonnegative = (
            "steps",
            "threshold_tokens",
            "lr",
            "weight_decay",
            "grad_clip",
            "l1_coeff",
            "aux_k_coeff",
            "nfm_coeff",
            "nfm_inf_coeff",
            "nfm_inf_sample",
        )
        for name in nonnegative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.aux_zipf_coeff < 0 and self.aux_zipf_coeff != -1:
            raise ConfigError(
                f"aux_zipf_coeff must not be negative (or be -1: the sparsifier's default), got "
                f"{self.aux_zipf_coeff}"
            )
        check_loggers(self.log)
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")
        if self.optimizer not in ("recipe", "schedule_free", "adamw"):
            raise ConfigError(
                f"optimizer must be recipe, schedule_free or adamw, not {self.optimizer!r}"
            )
        if not (0 <= self.decay_fraction <= 1 or self.decay_fraction == -1):
            raise ConfigError(
                f"decay_fraction must lie in [0, 1] (or be -1: the recipe's), got "
                f"{self.decay_fraction}"
            )
        if not 0 <= self.mutual_choice_share < 1:
            raise ConfigError(
                f"mutual_choice_share must lie in [0, 1), got {self.mutual_choice_share}"
            )
        if self.warmup_steps < -1:
            raise ConfigError(
                f"warmup_steps must be at least 0 (or -1: the recipe's), got {self.warmup_steps}"
            )
        phases = self.phases()
        if self.sae.sparsifier not in TRAINABLE:
            raise ConfigError(
                f"sparsifier {self.sae.sparsifier!r} is not trainable (a SAELens jumprelu file "
                f"imports as one); train one of {', '.join(TRAINABLE)}"
            )
        if self.schedule and self.steps and self.steps != self.total_steps:
            raise ConfigError(
                f"steps={self.steps} disagrees with schedule {self.schedule!r}, which runs "
                f"{self.total_steps} steps: leave steps out (0) or make them agree"
            )
        if self.multi_topk and any(name == "relu" for name, _ in phases):
            raise ConfigError("multi_topk needs a k-based sparsifier, not relu")
        if self.multi_topk and self.sae.num_latents and 4 * self.sae.k > self.sae.num_latents:
            raise ConfigError(
                f"multi_topk needs 4k <= num_latents, got k={self.sae.k} and "
                f"num_latents={self.sae.num_latents}"
            )
        if self.cross_layer and not self.transcoder:
            raise ConfigError("cross_layer trains a cross-layer transcoder: add --transcoder")
        self.prefixes  # noqa: B018 -- parsed and checked here, once
        check_feature_parallel(self)


def _numbers(text: str, kind: type, name: str) -> list:
    """The comma-separated numbers of a setting; a clear error for anything else."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers, got {text!r}") from None


def check_feature_parallel(cfg: "TrainConfig") -> None:
    """Refuse what --parallel features does not implement yet (docs/distributed.md)."""
    if cfg.parallel != "features":
        return
    missing = {
        "--distributed-selection local": cfg.distributed_selection == "local",
        "nfm_coeff / nfm_inf_coeff": bool(cfg.nfm_coeff or cfg.nfm_inf_coeff),
        "--matryoshka": bool(cfg.matryoshka),
    }
    refused = [name for name, used in missing.items() if used]
    if refused:
        raise ConfigError(f"--parallel features does not support {', '.join(refused)}")


def chosen(log: str) -> list[str]:
    """The writers named by a --log value (comma-separated); jsonl is always one of them."""
    names = [name.strip() for name in log.split(",") if name.strip()]
    return ["jsonl", *(name for name in names if name != "jsonl")]


def check_loggers(log: str) -> None:
    """Refuse an unknown --log writer, or one whose package is not installed, before the run."""
    for name in chosen(log):
        if name not in LOGGERS:
            raise ConfigError(f"log {name!r} is not one of {', '.join(LOGGERS)}")
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"--log {name} needs the {PACKAGES[name]} package: pip install 'choicesae[log]'"
            )


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each attribute of a dataclass, keyed by attribute name."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of the dataclass `cls` (nested dataclasses become groups)."""
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            add_arguments(parser.add_argument_group(f.name, tp.__doc__), tp)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        if tp is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=default, help=text)
        elif typing.get_origin(tp) is Literal:
            parser.add_argument(flag, choices=typing.get_args(tp), default=default, help=text)
        else:
            parser.add_argument(flag, type=tp, default=default, help=text)


def from_arguments(cls: type, args: argparse.Namespace):
    """Build the dataclass `cls` from parsed arguments (the inverse of `add_arguments`)."""
    hints = typing.get_type_hints(cls)
    return cls(
        **{
            f.name: from_arguments(hints[f.name], args)
            if dataclasses.is_dataclass(hints[f.name])
            else getattr(args, f.name)
            for f in dataclasses.fields(cls)
        }
    )


def from_dict(cls: type, values: dict):
    """Build the dataclass `cls` from a dict such as a saved config.json; unknown or
    ill-typed keys are a ConfigError naming them."""
    if not isinstance(values, dict):
        raise ConfigError(f"a {cls.__name__} must be a JSON object, not {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value)
        elif not _has_type(value, tp):
            raise ConfigError(f"{cls.__name__}.{name} must be {_type_name(tp)}, not {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _has_type(value, tp) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def read_config_file(path: str | Path) -> dict:
    """The settings in a YAML (.yaml, .yml) or JSON (.json) config file, as a dict."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:  # JSONDecodeError is a ValueError
        mark = getattr(e, "problem_mark", None)  # YAML's own message spans several lines
        detail = f"{e.problem} at line {mark.line + 1}" if mark else e
        raise ConfigError(f"cannot read the config file {path}: {detail}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {values!r}")
    return values


def nest(cls: type, values: dict) -> dict:
    """Settings as a config file may write them (flag names with - or _, nested dataclasses'
    settings at the top level or under their field, as in a run's config.json) in the nesting
    of `cls`, for `from_dict`."""
    hints = typing.get_type_hints(cls)
    nested = {n: tp for n, tp in hints.items() if dataclasses.is_dataclass(tp)}
    out: dict = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        owner = next((n for n, tp in nested.items() if name in typing.get_type_hints(tp)), None)
        if name in nested and isinstance(value, dict):
            out.setdefault(name, {}).update(nest(nested[name], value))
        elif name not in hints and owner is not None:
            out.setdefault(owner, {})[name] = value
        else:
            out[name] = value
    return out


def flatten(obj) -> dict:
    """A config dataclass as argparse's flat namespace (nested dataclasses' fields inlined)."""
    flat = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        flat |= flatten(value) if dataclasses.is_dataclass(value) else {f.name: value}
    return flat


def file_defaults(cls: type, path: str | Path) -> dict:
    """The settings of the config file `path` for the dataclass `cls`, as argparse defaults:
    checked (unknown names, wrong types, impossible values) before any flag overrides them."""
    try:
        return flatten(from_dict(cls, nest(cls, read_config_file(path))))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from e
