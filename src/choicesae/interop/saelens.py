"""SAELens's on-disk format (its `standard`, `topk`, `batchtopk` and `jumprelu` SAEs, and its
`transcoder` and `jumprelu_transcoder`): export and import (interop/common.py says what the
formats share and how they differ from ours)."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from choicesae.core.config import SAEConfig
from choicesae.core.sae import SAE
from choicesae.errors import ConfigError, DataError
from choicesae.interop.common import (
    CFG,
    SAELENS_WEIGHTS,
    WEIGHT_NAMES,
    Factors,
    build,
    fold_factors,
    folded,
    our_config,
    provenance,
    read_buffers_,
    read_json,
    read_tensors,
    set_thresholds_,
    unfolded,
    write_buffers,
)

SAELENS_VERSION = "6.54.12"  # the SAELens version whose loader these files were checked with


SAELENS_FORMS = {
    "topk": ("topk",),
    "relu": ("standard",),
    "mutual_choice": ("jumprelu", "batchtopk"),
    "feature_choice": ("jumprelu",),
    "jumprelu": ("jumprelu",),
}


# SAELens's transcoders are ReLU or JumpReLU only: TopK, like Mutual and Feature Choice, runs
# there per token at our thresholds
SAELENS_TRANSCODER_FORMS = {
    "topk": ("jumprelu_transcoder",),
    "relu": ("transcoder",),
    "mutual_choice": ("jumprelu_transcoder",),
    "feature_choice": ("jumprelu_transcoder",),
    "jumprelu": ("jumprelu_transcoder",),
}


# a skip transcoder (W_skip) is SAELens's skip form of the same transcoder
SKIP_FORMS = {"transcoder": "skip_transcoder", "jumprelu_transcoder": "jumprelu_skip_transcoder"}


JUMPRELU = ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder")


TRANSCODERS = ("transcoder", "jumprelu_transcoder", *SKIP_FORMS.values())


def saelens_form(sae: SAE, form: str) -> str:
    """The SAELens architecture to export as; `form` empty picks the default."""
    c = sae.cfg
    forms = (SAELENS_TRANSCODER_FORMS if c.transcoder else SAELENS_FORMS)[c.sparsifier]
    forms = tuple(SKIP_FORMS[f] for f in forms) if c.skip else forms
    if not form:
        return forms[0]
    if form not in forms:
        kind = "transcoder" if c.transcoder else "SAE"
        raise ConfigError(
            f"a {c.sparsifier} {kind} exports to SAELens as {' or '.join(forms)}, not {form!r}"
        )
    return form


def saelens_fields(sae: SAE, arch: str, threshold: str) -> tuple[dict, dict[str, Tensor]]:
    """The architecture's own cfg.json fields and extra weights."""
    F, k = sae.cfg.num_latents, sae.cfg.k
    if arch in ("standard", "transcoder", SKIP_FORMS["transcoder"]):
        return {}, {}
    if arch == "topk":
        return {"k": k, "rescale_acts_by_decoder_norm": False}, {}
    theta = sae.thresholds(threshold).detach().cpu().to(sae.W_enc.dtype)  # [] or [F]
    if arch in JUMPRELU:
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
    sae_lens.SAE.load_from_disk (TrainingSAE.load_from_disk for form="batchtopk"). A transcoder
    becomes a SAELens `transcoder` (ReLU) or `jumprelu_transcoder` (the others, at our
    thresholds), whose folded output is the raw target."""
    arch = saelens_form(sae, form)
    fields, extra = saelens_fields(sae, arch, threshold)
    factors, normalization = fold_factors(sae, fold, "saelens")
    c = sae.cfg
    metadata = {
        "sae_lens_version": SAELENS_VERSION,
        "model_name": c.model or None,
        "hook_name": c.hookpoint or None,  # a Hugging Face module path, not a TransformerLens one
        "context_size": c.context or None,
        "model_from_pretrained_kwargs": {},
        "choicesae": provenance(sae, factors, normalization, fold),
    }
    if c.transcoder:  # widths and hook of the target; SAELens refuses b_dec on the input
        fields |= {"d_out": c.d_out}
        metadata |= {"hook_name_out": c.target or None}
    cfg = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.num_latents,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": not c.transcoder,
        "normalize_activations": normalization,
        "reshape_activations": "none",
        **fields,
        "metadata": metadata,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(folded(sae, factors) | extra, path / SAELENS_WEIGHTS)
    (path / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    write_buffers(sae, path)
    return path


FOREIGN_SPARSIFIERS = {  # SAELens architecture -> ours, each with the codes SAELens gives it
    "topk": "topk",
    "standard": "relu",
    "jumprelu": "jumprelu",  # its thresholds are the model: no k, no batch rule
    "batchtopk": "mutual_choice",  # BatchTopK(k) in batches; its topk_threshold per token
    "transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "skip_transcoder": "relu",
    "jumprelu_skip_transcoder": "jumprelu",
}


def saelens_config(cfg: dict, state: dict[str, Tensor]) -> tuple[SAEConfig, Factors]:
    """Our SAEConfig and factors for a SAELens cfg.json written by someone else."""
    arch, norm = cfg.get("architecture"), cfg.get("normalize_activations", "none")
    sparsifier = FOREIGN_SPARSIFIERS.get(arch)
    if sparsifier is None:
        raise ConfigError(
            f"cannot import SAELens architecture {arch!r}: choicesae reads "
            f"{', '.join(FOREIGN_SPARSIFIERS)}"
        )
    if norm not in ("none", "expected_average_only_in", "layer_norm"):
        raise ConfigError(
            f"cannot import normalize_activations={norm!r}: choicesae has no "
            "equivalent (it reads none and layer_norm)"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise ConfigError("cannot import reshape_activations other than none")
    d_in, F = state["W_enc"].shape
    transcoder = arch in TRANSCODERS
    meta = cfg.get("metadata") or {}
    sae_cfg = SAEConfig(
        sparsifier=sparsifier,
        k=round(cfg.get("k") or SAEConfig.k),  # a float in SAELens's batchtopk; jumprelu: unused
        num_latents=F,
        d_in=d_in,
        d_out=state["W_dec"].shape[1] if transcoder else 0,
        normalize="token" if norm == "layer_norm" else "none",
        model=meta.get("model_name") or "",
        hookpoint=meta.get("hook_name") or "",
        context=meta.get("context_size") or 0,
        target=(meta.get("hook_name_out") or "") if transcoder else "",
        skip=arch in SKIP_FORMS.values(),
    )
    g_in = math.sqrt(d_in - 1) if norm == "layer_norm" else 1.0
    # SAELens denormalises an SAE's output but leaves a transcoder's raw (scale_out stays 1)
    return sae_cfg, Factors(g_in, 1.0 if transcoder else g_in)


@torch.no_grad()
def foreign_weights(cfg: dict, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bring a SAELens SAE's options into our form: apply_b_dec_to_input=False (z' = x W_enc +
    b_enc) moves b_dec·W_enc into b_enc (an SAE's; a transcoder's b_dec is an output bias, as
    ours); rescale_acts_by_decoder_norm (z' scaled by the decoder row norms n) moves n into the
    encoder and divides it out of the decoder."""
    w = {name: state[name].double() for name in WEIGHT_NAMES}
    transcoder = cfg.get("architecture") in TRANSCODERS
    if not cfg.get("apply_b_dec_to_input", True) and not transcoder:
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        n = w["W_dec"].norm(dim=-1)  # [F]
        w = w | {"W_enc": w["W_enc"] * n, "b_enc": w["b_enc"] * n, "W_dec": w["W_dec"] / n[:, None]}
    return {name: t.to(state[name].dtype) for name, t in w.items()}


def from_saelens(path: str | Path) -> SAE:
    """Read a SAELens SAE or transcoder folder (ours or anyone's) into our SAE, whose default
    codes are SAELens's: a jumprelu SAE (jumprelu_transcoder) becomes a jumprelu SAE
    (transcoder) at the file's per-feature thresholds; a batchtopk SAE (a SAELens training SAE)
    a Mutual Choice SAE with its k, encoding a token alone at its topk_threshold (what SAELens
    saves it as for inference) and BatchTopK(k) with batch=True."""
    path = Path(path)
    cfg = read_json(path)
    state = read_tensors(path / SAELENS_WEIGHTS)
    missing = set(WEIGHT_NAMES) - set(state)
    if missing:
        raise DataError(f"{path / SAELENS_WEIGHTS} lacks {', '.join(sorted(missing))}")
    ours = (cfg.get("metadata") or {}).get("choicesae")
    if ours:
        sae_cfg, factors = our_config(ours)
    else:
        sae_cfg, factors = saelens_config(cfg, state)
        state |= foreign_weights(cfg, state)
    sae = build(sae_cfg, unfolded(state, factors))
    theta = state.get("threshold", state.get("topk_threshold"))
    if theta is not None:  # the format's thresholds, unless our buffers below say more
        set_thresholds_(sae, theta)
    read_buffers_(sae, path)
    return sae
