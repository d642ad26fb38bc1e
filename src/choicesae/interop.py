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
  `choicesae.preprocess.normalize`. Folding the factor g (the format sees u = g·x_n) keeps z'
  exactly: W_enc/g, W_dec·g, b_dec·g.

What neither format holds travels in the same folder: our SAEConfig under the key "choicesae"
of cfg.json, and the SAE's buffers (dataset scale, Zipf fit, feature ranks, densities, both
thresholds) in choicesae.safetensors, so that ours -> theirs -> ours gives back the same model.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from choicesae.config import SAEConfig, from_dict
from choicesae.errors import ConfigError, DataError
from choicesae.sae import SAE

CFG, BUFFERS = "cfg.json", "choicesae.safetensors"
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "sae_weights.safetensors", "sae.safetensors"
SAELENS_VERSION = "6.54.12"  # the SAELens version whose loader these files were checked with
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
BUFFER_NAMES = ("scale", "zipf", "feature_rank", "density", "threshold", "threshold_global")
# SAELens architecture(s) of each sparsifier, the default first
SAELENS_FORMS = {
    "topk": ("topk",),
    "relu": ("standard",),
    "mutual_choice": ("jumprelu", "batchtopk"),
    "feature_choice": ("jumprelu",),
}


@dataclass(frozen=True)
class ExportConfig:
    """Write a trained SAE in SAELens's or sparsify's format."""

    sae: str = ""
    """The SAE: a run folder (its sae/ is used) or a folder written by save_pretrained."""
    format: Literal["saelens", "sparsify"] = "saelens"
    """Target format: saelens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json +
    sae.safetensors)."""
    out: str = ""
    """Folder to write."""
    threshold: Literal["feature", "global"] = "feature"
    """Mutual/Feature Choice as JumpReLU: per-feature thresholds or the global one."""
    form: str = ""
    """SAELens architecture for a Mutual Choice SAE: jumprelu (single-token inference) or
    batchtopk (batch inference, a SAELens training SAE); empty: jumprelu."""
    fold: bool = True
    """Fold the preprocessing into the exported SAE so it takes raw activations (SAELens:
    layer_norm for --normalize token); --no-fold writes our weights unchanged, for inputs
    already normalised by choicesae."""
    as_topk: bool = False
    """sparsify only: run a Mutual or Feature Choice SAE there as TopK(k) per token (sparsify
    has no batch or threshold activation)."""


@dataclass(frozen=True)
class ImportConfig:
    """Read an SAE in SAELens's or sparsify's format and save it as ours."""

    path: str = ""
    """Folder in SAELens's or sparsify's format."""
    format: Literal["saelens", "sparsify"] = "saelens"
    """Source format."""
    out: str = ""
    """Folder to write our SAE to (SAE.from_pretrained reads it)."""


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


def scaled(w: dict[str, Tensor], g: float, dtype: torch.dtype) -> dict[str, Tensor]:
    """Weights for inputs u = g·x_n: W_enc/g, W_dec·g, b_dec·g, so z' is unchanged and the
    reconstruction is g·x̂_n. In float64, so that g = 1 gives the weights bit for bit."""
    factor = {"W_enc": 1 / g, "b_enc": 1.0, "W_dec": g, "b_dec": g}
    return {n: (w[n].detach().cpu().double() * factor[n]).to(dtype).contiguous() for n in factor}


def folded(sae: SAE, g: float) -> dict[str, Tensor]:
    """Our weights W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d] for inputs g·x_n."""
    return scaled({n: getattr(sae, n) for n in WEIGHT_NAMES}, g, sae.W_enc.dtype)


def unfolded(w: dict[str, Tensor], g: float) -> dict[str, Tensor]:
    """The inverse of `folded`: weights for our normalized inputs x_n, float32."""
    return scaled(w, 1 / g, torch.float32)


def provenance(sae: SAE, g: float, normalization: str, fold: bool) -> dict:
    """Our config and how the exported weights relate to ours, kept in the target's cfg.json."""
    mode = sae.cfg.normalize
    expects = "raw activations"
    if not fold and mode != "none":
        expects = f"activations normalised by choicesae.preprocess.normalize(x, {mode!r}, scale)"
    return {
        "config": dataclasses.asdict(sae.cfg),
        "input_factor": g,
        "normalize_activations": normalization,
        "inputs": expects,
    }


def our_config(ours: dict) -> tuple[SAEConfig, float]:
    """The SAEConfig and input factor g that our export left in a cfg.json."""
    g = ours.get("input_factor") if isinstance(ours, dict) else None
    if not isinstance(g, int | float) or not g > 0:
        raise DataError(f"the choicesae entry of this cfg.json is damaged: {ours!r:.200}")
    return from_dict(SAEConfig, ours.get("config")), float(g)


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


# ---------------------------------------------------------------------------- SAELens


def saelens_form(sae: SAE, form: str) -> str:
    """The SAELens architecture to export as; `form` empty picks the default."""
    forms = SAELENS_FORMS[sae.cfg.sparsifier]
    if not form:
        return forms[0]
    if form not in forms:
        raise ConfigError(
            f"a {sae.cfg.sparsifier} SAE exports to SAELens as {' or '.join(forms)}, not {form!r}"
        )
    return form


def saelens_fields(sae: SAE, arch: str, threshold: str) -> tuple[dict, dict[str, Tensor]]:
    """The architecture's own cfg.json fields and extra weights."""
    F, k = sae.cfg.num_latents, sae.cfg.k
    if arch == "standard":
        return {}, {}
    if arch == "topk":
        return {"k": k, "rescale_acts_by_decoder_norm": False}, {}
    theta = sae.thresholds(threshold).detach().cpu().to(sae.W_enc.dtype)  # [] or [F]
    if arch == "jumprelu":
        return {}, {"threshold": theta.expand(F).contiguous()}
    # batchtopk, a SAELens training SAE: BatchTopK(k) on the batch; its topk_threshold (the
    # global threshold) becomes the JumpReLU threshold when SAELens saves it for inference
    fields = {
        "k": k,
        "rescale_acts_by_decoder_norm": False,  # our decoder rows are unit-norm already
        "use_sparse_activations": False,
        "aux_loss_coefficient": 1.0,
        "decoder_init_norm": None,
        "topk_threshold_lr": 0.01,
    }
    return fields, {"topk_threshold": sae.thresholds("global").detach().cpu().double()}


def to_saelens(
    sae: SAE, path: str | Path, *, threshold: str = "feature", form: str = "", fold: bool = True
) -> Path:
    """Write `sae` as a SAELens SAE folder (cfg.json, sae_weights.safetensors); load it with
    sae_lens.SAE.load_from_disk (TrainingSAE.load_from_disk for form="batchtopk")."""
    arch = saelens_form(sae, form)
    fields, extra = saelens_fields(sae, arch, threshold)
    g, normalization = input_factor(sae, fold, "saelens")
    c = sae.cfg
    metadata = {
        "sae_lens_version": SAELENS_VERSION,
        "model_name": c.model or None,
        "hook_name": c.hookpoint or None,  # a Hugging Face module path, not a TransformerLens one
        "context_size": c.context or None,
        "model_from_pretrained_kwargs": {},
        "choicesae": provenance(sae, g, normalization, fold),
    }
    cfg = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.num_latents,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalization,
        "reshape_activations": "none",
        **fields,
        "metadata": metadata,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(folded(sae, g) | extra, path / SAELENS_WEIGHTS)
    (path / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    write_buffers(sae, path)
    return path


def saelens_config(cfg: dict, state: dict[str, Tensor]) -> tuple[SAEConfig, float]:
    """Our SAEConfig and input factor g for a SAELens cfg.json written by someone else."""
    arch, norm = cfg.get("architecture"), cfg.get("normalize_activations", "none")
    sparsifier = {"topk": "topk", "standard": "relu", "jumprelu": "mutual_choice"}.get(arch)
    if arch == "batchtopk":
        sparsifier = "mutual_choice"
    if sparsifier is None:
        raise ConfigError(
            f"cannot import SAELens architecture {arch!r}: choicesae reads "
            "topk, standard, jumprelu and batchtopk"
        )
    if norm not in ("none", "expected_average_only_in", "layer_norm"):
        raise ConfigError(
            f"cannot import normalize_activations={norm!r}: choicesae has no "
            "equivalent (it reads none and layer_norm)"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise ConfigError("cannot import reshape_activations other than none")
    d_in, F = state["W_enc"].shape
    meta = cfg.get("metadata") or {}
    sae_cfg = SAEConfig(
        sparsifier=sparsifier,
        k=int(cfg.get("k") or min(32, F - 1)),
        num_latents=F,
        d_in=d_in,
        normalize="token" if norm == "layer_norm" else "none",
        model=meta.get("model_name") or "",
        hookpoint=meta.get("hook_name") or "",
        context=meta.get("context_size") or 0,
    )
    return sae_cfg, math.sqrt(d_in - 1) if norm == "layer_norm" else 1.0


@torch.no_grad()
def foreign_weights(cfg: dict, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bring a SAELens SAE's options into our form: apply_b_dec_to_input=False (z' = x W_enc +
    b_enc) moves b_dec·W_enc into b_enc; rescale_acts_by_decoder_norm (z' scaled by the decoder
    row norms n) moves n into the encoder and divides it out of the decoder."""
    w = {name: state[name].double() for name in WEIGHT_NAMES}
    if not cfg.get("apply_b_dec_to_input", True):
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        n = w["W_dec"].norm(dim=-1)  # [F]
        w = w | {"W_enc": w["W_enc"] * n, "b_enc": w["b_enc"] * n, "W_dec": w["W_dec"] / n[:, None]}
    return {name: t.to(state[name].dtype) for name, t in w.items()}


def from_saelens(path: str | Path) -> SAE:
    """Read a SAELens SAE folder (ours or anyone's) into our SAE. A jumprelu SAE becomes a
    Mutual Choice SAE whose thresholds are the file's: run it with encode(x, threshold=...)."""
    path = Path(path)
    cfg = read_json(path)
    state = read_tensors(path / SAELENS_WEIGHTS)
    missing = set(WEIGHT_NAMES) - set(state)
    if missing:
        raise DataError(f"{path / SAELENS_WEIGHTS} lacks {', '.join(sorted(missing))}")
    ours = (cfg.get("metadata") or {}).get("choicesae")
    if ours:
        sae_cfg, g = our_config(ours)
    else:
        sae_cfg, g = saelens_config(cfg, state)
        state |= foreign_weights(cfg, state)
    sae = build(sae_cfg, unfolded(state, g))
    theta = state.get("threshold", state.get("topk_threshold"))
    if theta is not None:  # the format's thresholds, unless our buffers below say more
        set_thresholds_(sae, theta)
    read_buffers_(sae, path)
    return sae


# ---------------------------------------------------------------------------- sparsify


def to_sparsify(sae: SAE, path: str | Path, *, fold: bool = True, as_topk: bool = False) -> Path:
    """Write `sae` as a sparsify SparseCoder folder (cfg.json, sae.safetensors); load it with
    sparsify.SparseCoder.load_from_disk. sparsify has only TopK: ReLU runs as TopK with k = F
    (the same function), Mutual and Feature Choice only with as_topk=True, as TopK(k)."""
    c = sae.cfg
    if c.sparsifier in ("mutual_choice", "feature_choice") and not as_topk:
        raise ConfigError(
            f"sparsify has no batch or threshold activation for a {c.sparsifier} SAE; pass "
            "as_topk=True (--as-topk) to run it there as TopK(k) per token"
        )
    g, normalization = input_factor(sae, fold, "sparsify")
    w = folded(sae, g)
    k = c.num_latents if c.sparsifier == "relu" else c.k
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.num_latents // c.d_in),
        "normalize_decoder": True,
        "num_latents": c.num_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": c.d_in,
        "choicesae": provenance(sae, g, normalization, fold),
    }
    tensors = {
        "encoder.weight": w["W_enc"].T.contiguous(),  # nn.Linear: [F, d_in]
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / SPARSIFY_WEIGHTS)
    (path / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    write_buffers(sae, path)
    return path


def from_sparsify(path: str | Path) -> SAE:
    """Read a sparsify SparseCoder folder (ours or anyone's) into our SAE."""
    path = Path(path)
    cfg = read_json(path)
    state = read_tensors(path / SPARSIFY_WEIGHTS)
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(state)
    if missing:
        raise DataError(f"{path / SPARSIFY_WEIGHTS} lacks {', '.join(sorted(missing))}")
    w = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"]}
    w |= {"W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    ours = cfg.get("choicesae")
    if ours:
        sae_cfg, g = our_config(ours)
    else:
        if (
            cfg.get("activation", "topk") != "topk"
            or cfg.get("skip_connection")
            or cfg.get("transcode")
        ):
            raise ConfigError(
                "choicesae imports sparsify SAEs with activation topk, without "
                "skip connection or transcoding"
            )
        d_in, F = w["W_enc"].shape
        k = int(cfg.get("k", 32))
        sparsifier = "relu" if k >= F else "topk"
        sae_cfg, g = (
            SAEConfig(sparsifier, k=min(k, F - 1), num_latents=F, d_in=d_in, normalize="none"),
            1.0,
        )
    sae = build(sae_cfg, unfolded(w, g))
    read_buffers_(sae, path)
    return sae


# ---------------------------------------------------------------------------- shared


@torch.no_grad()
def build(cfg: SAEConfig, w: dict[str, Tensor]) -> SAE:
    """An SAE with config `cfg` and the weights `w`, checked against the config's shapes."""
    sae = SAE(cfg)
    for name in WEIGHT_NAMES:
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


def load_any(path: str | Path) -> SAE:
    """Our SAE from a run folder (its sae/) or a save_pretrained folder."""
    path = Path(path)
    return SAE.from_pretrained(path / "sae" if (path / "sae" / "config.json").is_file() else path)


def export(cfg: ExportConfig) -> Path:
    """`choicesae export`: the SAE in cfg.sae written to cfg.out in cfg.format."""
    if not cfg.sae or not cfg.out:
        raise ConfigError("export needs --sae (a run or SAE folder) and --out")
    sae = load_any(cfg.sae)
    if cfg.format == "sparsify":
        return to_sparsify(sae, cfg.out, fold=cfg.fold, as_topk=cfg.as_topk)
    return to_saelens(sae, cfg.out, threshold=cfg.threshold, form=cfg.form, fold=cfg.fold)


def import_(cfg: ImportConfig) -> Path:
    """`choicesae import`: an SAE in cfg.format read from cfg.path and saved as ours to cfg.out."""
    if not cfg.path or not cfg.out:
        raise ConfigError("import needs --path (a SAELens or sparsify folder) and --out")
    sae = from_sparsify(cfg.path) if cfg.format == "sparsify" else from_saelens(cfg.path)
    sae.save_pretrained(cfg.out)
    return Path(cfg.out)
