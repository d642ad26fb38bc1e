"""`choicesae export` and `choicesae import`: an SAE or transcoder to or from SAELens's or
sparsify's format."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from choicesae.core.sae import SAE
from choicesae.errors import ConfigError
from choicesae.interop.saelens import from_saelens, to_saelens
from choicesae.interop.sparsify import from_sparsify, to_sparsify


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
    """Mutual/Feature Choice (and a TopK transcoder) as JumpReLU: per-feature thresholds or the
    global one."""
    form: str = ""
    """SAELens architecture for a Mutual Choice SAE: jumprelu (single-token inference) or
    batchtopk (batch inference, a SAELens training SAE); empty: jumprelu. A transcoder has one
    form: transcoder (relu) or jumprelu_transcoder (the others, at the thresholds)."""
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
