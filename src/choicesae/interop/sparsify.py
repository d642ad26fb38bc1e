"""EleutherAI sparsify's on-disk format (a TopK SparseCoder, also as a transcoder): export and
import (interop/common.py says what the formats share and how they differ from ours)."""

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from choicesae.core.config import SAEConfig
from choicesae.core.sae import SAE
from choicesae.errors import ConfigError, DataError
from choicesae.interop.common import (
    CFG,
    SKIP,
    SPARSIFY_WEIGHTS,
    Factors,
    build,
    fold_factors,
    folded,
    our_config,
    provenance,
    read_buffers_,
    read_json,
    read_tensors,
    unfolded,
    write_buffers,
)


def to_sparsify(sae: SAE, path: str | Path, *, fold: bool = True, as_topk: bool = False) -> Path:
    """Write `sae` as a sparsify SparseCoder folder (cfg.json, sae.safetensors); load it with
    sparsify.SparseCoder.load_from_disk. sparsify has only TopK: ReLU runs as TopK with k = F
    (the same function), Mutual and Feature Choice only with as_topk=True, as TopK(k). A
    transcoder becomes a `transcode` SparseCoder (a skip transcoder with skip_connection), whose
    folded output is the raw target."""
    c = sae.cfg
    if c.transcoder and c.d_out != c.d_in:  # its W_dec is [F, d_in] and b_dec [d_in]
        raise ConfigError(
            f"sparsify's transcoders predict a target as wide as their input; this one reads "
            f"d_in={c.d_in} and predicts d_out={c.d_out}: export it to SAELens instead"
        )
    if c.sparsifier == "jumprelu":
        raise ConfigError(
            "sparsify has no threshold activation and a jumprelu SAE no k to run as TopK: "
            "export it to SAELens instead"
        )
    if c.sparsifier in ("mutual_choice", "feature_choice") and not as_topk:
        raise ConfigError(
            f"sparsify has no batch or threshold activation for a {c.sparsifier} SAE; pass "
            "as_topk=True (--as-topk) to run it there as TopK(k) per token"
        )
    factors, normalization = fold_factors(sae, fold, "sparsify")
    w = folded(sae, factors)
    k = c.num_latents if c.sparsifier == "relu" else c.k
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, c.num_latents // c.d_in),
        "normalize_decoder": True,
        "num_latents": c.num_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": c.skip,
        "transcode": c.transcoder,
        "d_in": c.d_in,
        "choicesae": provenance(sae, factors, normalization, fold),
    }
    tensors = {
        "encoder.weight": w["W_enc"].T.contiguous(),  # nn.Linear: [F, d_in]
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    } | ({SKIP: w[SKIP]} if c.skip else {})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / SPARSIFY_WEIGHTS)
    (path / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    write_buffers(sae, path)
    return path


def sparsify_config(cfg: dict, w: dict[str, Tensor]) -> SAEConfig:
    """Our SAEConfig for a sparsify cfg.json written by someone else: TopK, or ReLU when k
    covers every latent; a transcoder (transcode, no b_dec on the input) predicts d_in wide."""
    if cfg.get("activation", "topk") != "topk":
        raise ConfigError("choicesae imports sparsify SAEs and transcoders with activation topk")
    if cfg.get("skip_connection") and not cfg.get("transcode"):
        raise ConfigError(
            "choicesae's skip path is a transcoder's: it cannot import a sparsify autoencoder "
            "with skip_connection"
        )
    d_in, F = w["W_enc"].shape
    k = int(cfg.get("k", 32))
    return SAEConfig(
        "relu" if k >= F else "topk",
        k=min(k, F - 1),
        num_latents=F,
        d_in=d_in,
        d_out=w["W_dec"].shape[1] if cfg.get("transcode") else 0,
        normalize="none",
        skip=bool(cfg.get("skip_connection")),
    )


def from_sparsify(path: str | Path) -> SAE:
    """Read a sparsify SparseCoder folder (ours or anyone's) into our SAE; a `transcode` one
    becomes a transcoder with d_out = d_in."""
    path = Path(path)
    cfg = read_json(path)
    state = read_tensors(path / SPARSIFY_WEIGHTS)
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(state)
    if missing:
        raise DataError(f"{path / SPARSIFY_WEIGHTS} lacks {', '.join(sorted(missing))}")
    w = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"]}
    w |= {"W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    w |= {SKIP: state[SKIP]} if SKIP in state else {}
    ours = cfg.get("choicesae")
    if ours:
        sae_cfg, factors = our_config(ours)
    else:
        sae_cfg, factors = sparsify_config(cfg, w), Factors(1.0, 1.0)
    sae = build(sae_cfg, unfolded(w, factors))
    read_buffers_(sae, path)
    return sae
