"""The sparse autoencoder: affine encoder, a sparsifier, and a unit-norm linear decoder.

No losses and no statistics live here; the training loop owns both.
"""

import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from choicesae.core.allocation import density_capacities, feature_capacities, warn_if_degenerate
from choicesae.core.config import SAEConfig, from_dict
from choicesae.core.preprocess import Stats, denormalize, estimate_dataset_scale, normalize
from choicesae.core.sparsifiers import (
    SPARSIFIERS,
    Rule,
    Sparse,
    jumprelu,
    sparsify,
    uniform_capacities,
    within_layers,
)
from choicesae.errors import ConfigError, DataError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
Threshold = Literal["feature", "global"]  # which JumpReLU thresholds (SAE.thresholds)


CHUNK = 4096  # rows of W_dec drawn at a time


def init_decoder(
    num_latents: int, d_in: int, latents: slice, generator: torch.Generator | None = None
) -> Tensor:
    """Rows `latents` [hi − lo, d_in] of a random W_dec [F, d_in] with unit-norm rows. The
    rows are drawn from `generator` (None: torch's global RNG) CHUNK at a time, every chunk (so
    the RNG ends where the whole draw leaves it) but only the wanted rows kept: a shard's rows
    are exactly the whole SAE's at any world size, and memory stays O(CHUNK + hi − lo) rows."""
    lo, hi = latents.start, latents.stop
    W_dec = torch.empty(hi - lo, d_in)
    for start in range(0, num_latents, CHUNK):
        n = min(CHUNK, num_latents - start)
        chunk = torch.randn(n, d_in, generator=generator)  # rows [start, start + n)
        a, b = max(lo, start), min(hi, start + len(chunk))
        if a < b:
            W_dec[a - lo : b - lo] = chunk[a - start : b - start]
    return W_dec / W_dec.norm(dim=-1, keepdim=True)


def layer_mask(cfg: SAEConfig, name: str, latents: slice, device=None) -> Tensor:
    """Where weight `name` of a cross-layer transcoder (cfg.layers = L blocks) may be non-zero,
    for its latents `latents`: W_enc [d_in, n] block-diagonal (latent block l reads x_l alone),
    W_dec [n, d_out] block upper-triangular (block l writes to the outputs of layers j >= l),
    W_skip [d_in, d_out] block-diagonal (x_l to y_l, a skip transcoder per layer)."""
    L = cfg.layers
    latent = torch.arange(latents.start, latents.stop, device=device) // (cfg.num_latents // L)
    x = torch.arange(cfg.d_in, device=device) // (cfg.d_in // L)  # the layer of each column
    y = torch.arange(cfg.d_out, device=device) // (cfg.d_out // L)
    rows, cols = {"W_enc": (x, latent), "W_dec": (latent, y), "W_skip": (x, y)}[name]
    return rows[:, None] <= cols if name == "W_dec" else rows[:, None] == cols


MASKED = ("W_enc", "W_dec", "W_skip")  # a CLT's weights with blocks kept at zero


class SAE(nn.Module):
    """x̂ = σ_s((x − b_dec) W_enc + b_enc) W_dec + b_dec, rows of W_dec unit-norm.

    Shapes follow SAELens: W_enc [d_in, F], W_dec [F, d_in]. A transcoder (cfg.d_out set) reads
    one hookpoint and predicts another, ŷ = σ_s(x W_enc + b_enc) W_dec + b_dec with W_dec
    [F, d_out]: b_dec is an output bias only, as in SAELens's and sparsify's transcoders.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        latents: slice | None = None,
        generator: torch.Generator | None = None,
    ):
        """`latents` [lo, hi): hold only these latents' W_enc columns, b_enc and W_dec rows,
        initialised as in the whole SAE (feature sharding, parallel/features.py); the [F] buffers
        stay whole. `generator` draws the initial weights (None: torch's global RNG, as nn.Linear);
        training passes one seeded with its seed, so that it leaves the caller's RNG alone and
        every rank draws the same weights."""
        super().__init__()
        if not (cfg.d_in and cfg.num_latents) or cfg.normalize == "auto":
            raise ConfigError("SAE needs a resolved config: call cfg.resolve(d_in) first")
        self.cfg = cfg
        F, d = cfg.num_latents, cfg.d_target
        latents = slice(0, F) if latents is None else latents
        W_dec = init_decoder(F, d, latents, generator)
        self.latents = latents
        # tied initialisation (Gao et al.); a transcoder's encoder reads another space, so it
        # gets unit columns of its own
        W_enc = init_decoder(F, cfg.d_in, latents, generator) if cfg.transcoder else W_dec
        if cfg.layers > 1:  # a CLT: its blocks drawn as a transcoder's, then unit-norm again
            W_dec = W_dec * layer_mask(cfg, "W_dec", latents)
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
            W_enc = (W_enc.T * layer_mask(cfg, "W_enc", latents)).T
            W_enc /= W_enc.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_enc.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(len(W_dec)))
        self.b_dec = nn.Parameter(torch.zeros(d))
        # a skip transcoder's linear path [d_in, d_out], from zero (SAELens's and sparsify's)
        skip = nn.Parameter(torch.zeros(cfg.d_in, d)) if cfg.skip else None
        self.register_parameter("W_skip", skip)
        # state learnt in training and saved with the weights: the dataset-level normalisation
        # factors of the input (normalize="dataset") and of a transcoder's target, the Zipf
        # (alpha, beta) in use, each feature's density rank (Zipf Feature Choice) and the
        # densities of the last window (NaN: none yet)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("scale_out", torch.ones(()))
        self.register_buffer("zipf", torch.tensor([cfg.zipf_alpha, cfg.zipf_beta]).double())
        self.register_buffer("feature_rank", torch.arange(1, F + 1))
        self.register_buffer("density", torch.full((F,), float("nan")))
        # JumpReLU thresholds on z' for single-token inference (appendix B), NaN until the end
        # of training estimates them (core/thresholds.py): `threshold` [F] one per feature,
        # calibrated to each feature's batch-inference density; `threshold_global` [] one for
        # all, the mean smallest selected activation (BatchTopK, as SAELens does)
        self.register_buffer("threshold", torch.full((F,), float("nan")))
        self.register_buffer("threshold_global", torch.tensor(float("nan")))

    @property
    def b_in(self) -> Tensor | None:
        """The bias subtracted from the input before encoding: b_dec for an autoencoder, none
        for a transcoder (its b_dec lives in the output space)."""
        return None if self.cfg.transcoder else self.b_dec

    def centred(self, x: Tensor) -> Tensor:
        """x − b_dec [B, d_in] for an autoencoder, x itself for a transcoder."""
        return x if self.b_in is None else x - self.b_in

    def pre_acts(self, x: Tensor) -> Tensor:
        """Affinities z' [B, F] of normalized inputs x [B, d_in]."""
        return self.product(self.centred(x)) + self.b_enc

    def product(self, xc: Tensor, feature_major: bool = False) -> Tensor:
        """The encoder's one dense product xc W_enc [B, F] of centred inputs (feature_major:
        its transpose [F, B], contiguous). A cross-layer transcoder that holds all its latents
        multiplies only the L diagonal blocks of its block-diagonal W_enc (`layer_mask`): 1/L of
        the dense product's work, the same values. A shard of one (feature sharding) cuts
        across blocks and takes the dense product."""
        L = self.cfg.layers
        if L == 1 or self.latents != slice(0, self.cfg.num_latents):
            return torch.mm(self.W_enc.t(), xc.t()) if feature_major else xc @ self.W_enc
        W = self.W_enc.unflatten(0, (L, -1)).unflatten(2, (L, -1))  # [L, d, L, f]
        W = W.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # block l: [d, f]
        x = xc.unflatten(1, (L, -1)).transpose(0, 1)  # [L, B, d]
        if feature_major:
            return torch.bmm(W.transpose(1, 2), x.transpose(1, 2)).flatten(0, 1)
        return torch.bmm(x, W).transpose(0, 1).flatten(1)

    def as_input(self, x: Tensor | np.ndarray) -> Tensor:
        """Inputs [B, d_in] as a tensor in the weights' dtype and on their device: a numpy array
        or a tensor of any float dtype (float64 included)."""
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise DataError(f"activations must be floats, got {x.dtype}")
        if x.ndim != 2 or x.shape[-1] != self.cfg.d_in:
            raise DataError(
                f"activations of shape {list(x.shape)} given to an SAE that reads "
                f"[tokens, {self.cfg.d_in}]"
            )
        return x.to(dtype=self.W_enc.dtype, device=self.W_enc.device)

    def select(
        self,
        z_pre: Tensor,
        k: int | None = None,
        threshold: Threshold | None = None,
        batch: bool = False,
    ) -> Sparse:
        """The codes of affinities z' [B, F]: how a token is encoded, decided here once.

        By default every token is encoded on its own, so its code never depends on the other
        rows: TopK and ReLU by their own rule, Mutual and Feature Choice (which select within
        a batch) and an imported JumpReLU SAE by JumpReLU at the per-feature thresholds
        (appendix B), which training estimates and saves. `threshold="global"` uses the one
        global threshold instead. `batch=True` selects within the rows given, as training does
        (Mutual Choice's k·B largest, Feature Choice's capacities for B = len(z')); `k`
        overrides the budget of a rule that has one (TopK, or batch=True)."""
        if batch and threshold is not None:
            raise ConfigError(
                f"threshold={threshold!r} encodes each token on its own and batch=True selects "
                "within the batch: ask for one of them"
            )
        threshold = None if batch else threshold or self.default_threshold
        name = self.cfg.sparsifier
        if threshold is None and name in SPARSIFIERS:  # the model's own rule
            k = k or self.cfg.k
            if batch and SPARSIFIERS[name].capacities:
                warn_if_degenerate(self.capacities(len(z_pre), k), k, len(z_pre))
            return self.sparsify(name, z_pre, k)
        if k is not None:
            raise ConfigError(
                f"k={k} is a budget of batch selection, and a {name} SAE encodes each token "
                "alone at its thresholds: pass batch=True to select within the batch"
            )
        return jumprelu(z_pre, self.thresholds(threshold or "feature"))

    @property
    def default_threshold(self) -> Threshold | None:
        """The thresholds that encode a token by default: "feature" for a rule that selects
        within the batch (Mutual and Feature Choice) and for jumprelu, None for TopK and ReLU,
        whose own rule reads one token at a time. A cross-layer transcoder's code at layer l
        may read no later layer (the replacement model runs layer by layer), so TopK across
        its layers encodes by the thresholds too; per-layer TopK by its own rule."""
        c, rule = self.cfg, SPARSIFIERS.get(self.cfg.sparsifier)
        across = c.layers > 1 and not c.per_layer and c.sparsifier == "topk"
        return None if rule is not None and not rule.batch and not across else "feature"

    def encode(
        self,
        x: Tensor,
        k: int | None = None,
        threshold: Threshold | None = None,
        batch: bool = False,
    ) -> Sparse:
        """Sparse codes of normalized x [B, d_in] (a numpy array or a tensor of any float
        dtype), every token on its own unless `batch=True` (see `select`)."""
        return self.select(self.pre_acts(self.as_input(x)), k, threshold, batch)

    def has_thresholds(self, which: str) -> bool:
        """Whether the "feature" or "global" thresholds have been estimated (or read)."""
        theta = self.threshold if which == "feature" else self.threshold_global
        return not bool(theta.isnan().any())

    def thresholds(self, which: str) -> Tensor:
        """The JumpReLU thresholds on z': "feature" -> `threshold` [F], "global" ->
        `threshold_global` []; an error if they were never estimated (an SAE saved before
        training estimated them, or built by hand)."""
        theta = {"feature": self.threshold, "global": self.threshold_global}.get(which)
        if theta is None:
            raise ConfigError(f"threshold must be 'feature' or 'global', not {which!r}")
        if theta.isnan().any():
            raise ConfigError(
                f"this {self.cfg.sparsifier} SAE has no {which} thresholds to encode a token on "
                "its own: estimate them with choicesae.calibrate_thresholds_(sae, activations, "
                "batch_size) or `choicesae eval RUN`, or select within the batch with batch=True"
            )
        return theta

    def sparsify(self, name: str, z_pre: Tensor, k: int) -> Sparse:
        """Apply sparsifier `name` to affinities z_pre [B, F], with this model's Feature Choice
        capacities for a batch of B tokens (the batch rule itself, as training applies it)."""
        reads_m = name in SPARSIFIERS and SPARSIFIERS[name].capacities
        m = self.capacities(z_pre.shape[0], k) if reads_m else None
        if name in SPARSIFIERS:
            return self.rule(name)(z_pre, k, m)
        return sparsify(name, z_pre, k=k, m=m)

    def rule(self, name: str) -> Rule:
        """The reference selection (z' [B, F], k, m) -> codes of sparsifier `name` for this
        model: the registry's, or within each layer's block (a CLT's cfg.per_layer)."""
        rule = SPARSIFIERS[name].reference
        return within_layers(rule, self.cfg.layers) if self.cfg.per_layer else rule

    def capacities(self, batch_size: int, k: int) -> Tensor:
        """[F] Feature Choice capacities for a batch: uniform, Zipf by density rank, or in
        proportion to the densities (uniform until a density window has closed)."""
        c, device = self.cfg, self.feature_rank.device
        if c.capacities == "zipf":
            alpha, beta = self.zipf.tolist()
            return feature_capacities(
                self.feature_rank, k, batch_size, alpha, beta, c.m_min, c.m_max
            )
        if c.capacities == "density" and not self.density.isnan().any():
            return density_capacities(self.density, k, batch_size, c.m_min, c.m_max).to(device)
        return uniform_capacities(k, batch_size, c.num_latents).to(device)

    def base(self, x: Tensor | None = None) -> Tensor:
        """What the prediction holds before any latent adds to it: b_dec [d_target], and a skip
        transcoder's linear path x W_skip [B, d_out] of its normalized inputs x [B, d_in]."""
        if self.W_skip is None:
            return self.b_dec
        if x is None:
            raise ConfigError("a skip transcoder decodes with its inputs: pass x to decode")
        return x @ self.W_skip + self.b_dec

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction [B, d_target] (normalized space) of activations [B, F]; a skip
        transcoder adds the linear path of its normalized inputs x [B, d_in]."""
        return acts @ self.W_dec + self.base(x)

    def forward(self, x: Tensor, threshold: Threshold | None = None, batch: bool = False) -> Tensor:
        """Reconstruction of normalized x [B, d_in], every token on its own unless `batch=True`
        (see `select`)."""
        return self.decode(self.encode(x, threshold=threshold, batch=batch).acts, x)

    @torch.no_grad()
    def codes(
        self,
        x: Tensor | np.ndarray,
        threshold: Threshold | None = None,
        dense: bool = True,
        batch: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The sparse codes of raw model activations x [B, d_in] (a numpy array or a tensor
        of any float dtype), normalized as in training: dense [B, F], or with `dense=False`
        (indices [B, L], values [B, L]) of each token's active features, largest first, L the
        batch's largest L0 (shorter rows end in value-0 padding). Each token is encoded on its
        own (Mutual and Feature Choice: JumpReLU at the per-feature thresholds, or the global
        one with threshold="global"); batch=True selects within the rows given, as training
        does. No autograd history."""
        x_n, _ = normalize(self.as_input(x), self.cfg.normalize, self.scale)
        acts = self.encode(x_n, threshold=threshold, batch=batch).acts  # [B, F]
        if dense:
            return acts
        values, indices = acts.topk(int(Sparse(acts).l0.max()), dim=-1)  # [B, L]
        return indices, values

    @torch.no_grad()
    def reconstruct(
        self, x: Tensor | np.ndarray, threshold: Threshold | None = None, batch: bool = False
    ) -> Tensor:
        """Raw model activations x [B, d_in] (numpy or a tensor of any float dtype) ->
        reconstruction (a transcoder's prediction of its target [B, d_out]) in the model's raw
        space, every token encoded on its own unless `batch=True` (see `codes`). No autograd
        history."""
        x = self.as_input(x)
        x_n, _ = normalize(x, self.cfg.normalize, self.scale)
        return denormalize(self(x_n, threshold, batch), self.output_stats(x))

    def output_stats(self, x: Tensor) -> Stats:
        """What maps the normalized reconstruction of raw inputs x [B, d_in] back to the raw
        target space: the input's own normalisation for an SAE, the one dataset factor
        scale_out for a transcoder (its prediction lives in the target's space)."""
        if self.cfg.transcoder:
            return Stats(torch.zeros_like(self.scale_out), self.scale_out)
        return normalize(x, self.cfg.normalize, self.scale)[1]

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Raw rows [B, d_in (+ d_out)] -> (input x [B, d_in], target [B, d_target]): a
        transcoder's store rows hold [hookpoint | target], an autoencoder's target is x."""
        c = self.cfg
        if rows.shape[-1] != c.d_in + c.d_out:
            what = f"d_in {c.d_in} + d_out {c.d_out}" if c.transcoder else f"d_in {c.d_in}"
            raise DataError(f"rows of width {rows.shape[-1]} given to an SAE that reads {what}")
        x = rows[:, : c.d_in]
        return x, (rows[:, c.d_in :] if c.transcoder else x)

    def prepare(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Raw rows [B, d_in (+ d_out)] -> (normalized input, normalized target): what the
        training step reads and reconstructs. A transcoder's target is scaled by the one
        dataset factor scale_out (1 with normalize="none"): its own norm is unknown at
        inference, being what the transcoder predicts."""
        x, y = self.split(rows)
        x_n, _ = normalize(x, self.cfg.normalize, self.scale)
        return x_n, (y * self.scale_out if self.cfg.transcoder else x_n)

    @torch.no_grad()
    def init_from_data_(self, sample: Tensor) -> None:
        """Set the dataset scales (normalize="dataset"; a transcoder's target always but with
        normalize="none") and b_dec to the mean of the normalized target, from a sample [N,
        d_in (+ d_out)] of raw rows, so that training starts centred on the data; a
        transcoder's b_enc so that its affinities start centred on the input's mean."""
        x, y = self.split(sample)
        if self.cfg.normalize == "dataset":
            self.scale.fill_(estimate_dataset_scale(x))
        if self.cfg.transcoder and self.cfg.normalize != "none":
            self.scale_out.fill_(estimate_dataset_scale(y))
        x_n, y_n = self.prepare(sample)
        self.b_dec.copy_(y_n.mean(0))
        if self.cfg.transcoder:  # centre the input as an SAE's b_dec does: z' = (x − x̄) W_enc
            self.b_enc.copy_(-(x_n.mean(0) @ self.W_enc))

    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        """Project every decoder row back onto the unit sphere (after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def mask_grad_(self) -> None:
        """Zero a cross-layer transcoder's gradient outside its blocks (`layer_mask`), so that
        the absent blocks stay zero: the dense products compute them, nothing may move them."""
        if self.cfg.layers == 1:
            return
        for name in MASKED:
            p = getattr(self, name)
            if p is not None and p.grad is not None:
                p.grad.mul_(layer_mask(self.cfg, name, self.latents, p.device))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each (unit) decoder row: it would only change the
        row's norm, which the projection undoes anyway, and it disturbs Adam's statistics."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    def save_pretrained(self, path: str | Path) -> None:
        """Write model.safetensors and config.json into the folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, path / WEIGHTS)
        (path / CONFIG).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "SAE":
        """Load an SAE written by `save_pretrained`."""
        path = Path(path)
        try:
            cfg = from_dict(SAEConfig, json.loads((path / CONFIG).read_text()))
            state = load_file(path / WEIGHTS, device=device)
        except (OSError, ValueError, SafetensorError) as e:  # ConfigError is a ValueError
            raise DataError(f"cannot load an SAE from {path}: {e}") from e
        state.setdefault("threshold_global", torch.tensor(float("nan")))  # saved before it
        state.setdefault("scale_out", torch.ones(()))  # saved before transcoders
        sae = cls(cfg, generator=torch.Generator()).to(device)  # the caller's RNG untouched
        sae.load_state_dict(state)
        return sae
