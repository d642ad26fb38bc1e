"""SAELens and sparsify on-disk formats: export our SAEs so that those libraries load and run
them, and import theirs (docs/interop.md).

Both formats hold the W_enc, b_enc, W_dec, b_dec of x̂ = σ((x − b_dec) W_enc + b_enc) W_dec + b_dec
as ours does (sparsify stores W_enc transposed, as nn.Linear's weight). Two things differ:

- The sparsifier. TopK is TopK everywhere; ReLU is SAELens's `standard` and sparsify's TopK with
  k = F (every positive affinity: the same function); Mutual and Feature Choice select within a
  batch, so for one token at a time they run as JumpReLU at the thresholds `choicesae eval`
  estimates (appendix B), and Mutual Choice also as SAELens's `batchtopk`, its batch form.
- The preprocessing (fold=True). A dataset scale c is linear and folds into the weights. Our
  per-token normalisation x_n = (x − μ)/|x − μ| is SAELens's `layer_norm`, (x − μ)/std with
  std = |x − μ|/√(d−1), up to the factor √(d−1), which folds into the weights; SAELens adds
  1e-5 to std, a relative difference of 1e-5/std. sparsify cannot normalise a token: export
  with fold=False, and the exported SAE expects inputs already normalised by
  `choicesae.core.preprocess.normalize`. Folding the factor g (the format sees u = g·x_n) keeps z'
  exactly: W_enc/g, W_dec·g, b_dec·g.
- Transcoders (ŷ_n = σ(x_n W_enc + b_enc) W_dec + b_dec, W_dec [F, d_out], no b_dec subtracted
  from the input). Both formats normalise only the input of a transcoder and return its output
  as it is, so the output has a factor of its own: the format sees u = g_in·x_n and returns
  g_out·ŷ_n, with g_out = 1/scale_out (the raw target) when folding. An autoencoder's output lives
  where its input does (g_out = g_in) and the format's own denormalisation maps it back.

What neither format holds travels in the same folder: our SAEConfig under the key "choicesae"
of cfg.json, and the SAE's buffers (dataset scales, Zipf fit, feature ranks, densities, both
thresholds) in choicesae.safetensors, so that ours -> theirs -> ours gives back the same model.
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from choicesae.core.config import SAEConfig, from_dict
from choicesae.core.sae import SAE
from choicesae.errors import ConfigError, DataError

CFG, BUFFERS = "cfg.json", "choicesae.safetensors"


SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "sae_weights.safetensors", "sae.safetensors"


WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
SKIP = "W_skip"  # a skip transcoder's linear path, [d_out, d_in] in every format


BUFFER_NAMES = (
    "scale",
    "scale_out",
    "zipf",
    "feature_rank",
    "density",
    "threshold",
    "threshold_global",
)


class Factors(NamedTuple):
    """The exported model sees u = g_in·x_n and returns g_out·x̂_n, x_n and x̂_n our normalized
    input and output (a transcoder's ŷ_n)."""

    g_in: float
    g_out: float

    def inverse(self) -> "Factors":
        return Factors(1 / self.g_in, 1 / self.g_out)


def fold_factors(sae: SAE, fold: bool, fmt: str) -> tuple[Factors, str]:
    """(g_in, g_out) and the format's normalize_activations for exporting `sae`."""
    g_in, normalization = input_factor(sae, fold, fmt)
    if not sae.cfg.transcoder:  # the format's denormalisation maps g_in·x̂_n back to raw
        return Factors(g_in, g_in), normalization
    # the formats leave a transcoder's output alone: folded, it must be the raw target
    return Factors(g_in, 1 / float(sae.scale_out) if fold else 1.0), normalization


def input_factor(sae: SAE, fold: bool, fmt: str) -> tuple[float, str]:
    """(g, normalize_activations): the exported SAE sees u = g·x_n, x_n our normalized input,
    after the format's own normalisation `normalize_activations`."""
    mode = sae.cfg.normalize
    if not fold or mode == "none":
        return 1.0, "none"
    if mode == "dataset":  # u = raw x = x_n / scale
        return 1.0 / float(sae.scale), "none"
    if fmt == "saelens":  # layer_norm gives (x − μ)/std = √(d−1)·x_n
        return math.sqrt(sae.cfg.d_in - 1), "layer_norm"
    raise ConfigError(
        "sparsify cannot normalise each token (--normalize token): export with fold=False "
        "(--no-fold); the exported SAE then expects inputs normalised by choicesae"
    )


def scaled(w: dict[str, Tensor], f: Factors, dtype: torch.dtype) -> dict[str, Tensor]:
    """Weights for inputs u = g_in·x_n: W_enc/g_in, W_dec·g_out, b_dec·g_out (and a skip
    transcoder's W_skip·g_out/g_in), so z' is unchanged and the output is g_out·x̂_n. In
    float64, so that factors 1 give the weights bit for bit. (An autoencoder's b_dec also
    centres the input: g_out = g_in keeps that.)"""
    factor = {"W_enc": 1 / f.g_in, "b_enc": 1.0, "W_dec": f.g_out, "b_dec": f.g_out}
    factor[SKIP] = f.g_out / f.g_in
    return {
        n: (w[n].detach().cpu().double() * c).to(dtype).contiguous()
        for n, c in factor.items()
        if n in w
    }


def folded(sae: SAE, f: Factors) -> dict[str, Tensor]:
    """Our weights W_enc [d_in, F], b_enc [F], W_dec [F, d_out], b_dec [d_out] for inputs
    g_in·x_n and outputs g_out·x̂_n; a skip transcoder's W_skip as every format stores it,
    [d_out, d_in] (applied as u W_skipᵀ: SAELens, sparsify and circuit-tracer alike)."""
    w = {n: getattr(sae, n) for n in WEIGHT_NAMES}
    if sae.W_skip is not None:
        w[SKIP] = sae.W_skip.T
    return scaled(w, f, sae.W_enc.dtype)


def unfolded(w: dict[str, Tensor], f: Factors) -> dict[str, Tensor]:
    """The inverse of `folded`: weights for our normalized inputs and outputs, float32."""
    ours = scaled(w, f.inverse(), torch.float32)
    if SKIP in ours:
        ours[SKIP] = ours[SKIP].T.contiguous()
    return ours


def provenance(sae: SAE, f: Factors, normalization: str, fold: bool) -> dict:
    """Our config and how the exported weights relate to ours, kept in the target's cfg.json."""
    mode = sae.cfg.normalize
    expects = "raw activations"
    if not fold and mode != "none":
        expects = (
            f"activations normalised by choicesae.core.preprocess.normalize(x, {mode!r}, scale)"
        )
    entry = {
        "config": dataclasses.asdict(sae.cfg),
        "input_factor": f.g_in,
        "output_factor": f.g_out,
        "normalize_activations": normalization,
        "inputs": expects,
    }
    if sae.cfg.transcoder:  # unfolded, the prediction is of the target times scale_out
        c = float(sae.scale_out)
        entry["outputs"] = "raw target activations" if fold or c == 1 else f"the target times {c!r}"
    return entry


def our_config(ours: dict) -> tuple[SAEConfig, Factors]:
    """The SAEConfig and factors that our export left in a cfg.json (exports made before
    transcoders have no output factor: an autoencoder's is its input factor)."""
    g_in = ours.get("input_factor") if isinstance(ours, dict) else None
    g_out = ours.get("output_factor", g_in) if isinstance(ours, dict) else None
    if not all(isinstance(g, int | float) and g > 0 for g in (g_in, g_out)):
        raise DataError(f"the choicesae entry of this cfg.json is damaged: {ours!r:.200}")
    return from_dict(SAEConfig, ours.get("config")), Factors(float(g_in), float(g_out))


def write_buffers(sae: SAE, path: Path) -> None:
    tensors = {name: getattr(sae, name).detach().cpu().contiguous() for name in BUFFER_NAMES}
    save_file(tensors, path / BUFFERS)


def read_json(path: Path) -> dict:
    try:
        cfg = json.loads((path / CFG).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path / CFG}: {e}") from e
    if not isinstance(cfg, dict):
        raise DataError(f"{path / CFG} must hold a JSON object")
    return cfg


def read_tensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except (OSError, SafetensorError) as e:
        raise DataError(f"cannot read the weights {file}: {e}") from e


@torch.no_grad()
def build(cfg: SAEConfig, w: dict[str, Tensor]) -> SAE:
    """An SAE with config `cfg` and the weights `w`, checked against the config's shapes."""
    sae = SAE(cfg)
    for name in WEIGHT_NAMES + ((SKIP,) if cfg.skip else ()):
        if name not in w:
            raise DataError(f"the weights lack {name}")
        param = getattr(sae, name)
        if tuple(w[name].shape) != tuple(param.shape):
            raise DataError(f"{name} has shape {list(w[name].shape)}, not {list(param.shape)}")
        param.copy_(w[name])
    return sae


@torch.no_grad()
def set_thresholds_(sae: SAE, theta: Tensor) -> None:
    """Per-feature thresholds from a file; a single value (or all equal) is also the global one."""
    theta = theta.to(sae.threshold.dtype).expand(sae.cfg.num_latents)
    sae.threshold.copy_(theta)
    if bool((theta == theta[0]).all()):
        sae.threshold_global.fill_(float(theta[0]))


@torch.no_grad()
def read_buffers_(sae: SAE, path: Path) -> None:
    """Restore the buffers our export left in the folder (none in a foreign one)."""
    if not (path / BUFFERS).is_file():
        return
    buffers = read_tensors(path / BUFFERS)
    for name in BUFFER_NAMES:
        buffer = getattr(sae, name)
        if name in buffers and buffers[name].shape != buffer.shape:
            raise DataError(
                f"{path / BUFFERS}: {name} has shape {list(buffers[name].shape)}, "
                f"not {list(buffer.shape)}"
            )
        if name in buffers:
            buffer.copy_(buffers[name])
