"""`choicesae export` and `choicesae import`: an SAE or transcoder to or from SAELens's or
sparsify's format, and a set of per-layer transcoders or a cross-layer transcoder to
circuit-tracer's."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from choicesae.core.sae import CONFIG, SAE
from choicesae.errors import ConfigError
from choicesae.interop.circuit_tracer import (
    INPUT_HOOK,
    OUTPUT_HOOK,
    recorded_layer,
    to_circuit_tracer,
    to_circuit_tracer_clt,
)
from choicesae.interop.saelens import from_saelens, to_saelens
from choicesae.interop.sparsify import from_sparsify, to_sparsify


@dataclass(frozen=True)
class ExportConfig:
    """Write a trained SAE in SAELens's or sparsify's format, or per-layer transcoders or a
    cross-layer transcoder in circuit-tracer's."""

    sae: str = ""
    """The SAE: a run folder (its sae/ is used) or a folder written by save_pretrained. For
    circuit-tracer, one cross-layer transcoder's run (train --cross-layer), or one transcoder
    per layer of the model: comma-separated in layer order (runs/l0,runs/l1,...), or a folder
    of runs (as train writes one per hookpoint of a store), ordered by the layer each one's
    hookpoint names."""
    format: Literal["saelens", "sparsify", "circuit-tracer"] = "saelens"
    """Target format: saelens (cfg.json + sae_weights.safetensors), sparsify (cfg.json +
    sae.safetensors) or circuit-tracer (config.yaml and a transcoder set's
    layer_{i}.safetensors, or a cross-layer transcoder's W_enc_{i} and W_dec_{i}.safetensors)."""
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
    scan: str = ""
    """circuit-tracer only: the transcoder set's name there (empty: the --out folder's name)."""
    input_hook: str = INPUT_HOOK
    """circuit-tracer only: the hook its transcoders read (nnsight backend; mlp.hook_in is the
    output of a Llama layer's post_attention_layernorm)."""
    output_hook: str = OUTPUT_HOOK
    """circuit-tracer only: the hook its transcoders replace (mlp.hook_out: a Llama layer's
    mlp output)."""


@dataclass(frozen=True)
class ImportConfig:
    """Read an SAE in SAELens's or sparsify's format and save it as ours."""

    path: str = ""
    """Folder in SAELens's or sparsify's format."""
    format: Literal["saelens", "sparsify"] = "saelens"
    """Source format."""
    out: str = ""
    """Folder to write our SAE to (SAE.from_pretrained reads it)."""


def sae_folder(path: Path) -> Path:
    """Where the SAE of a run folder (its sae/) or of a save_pretrained folder is."""
    return path / "sae" if (path / "sae" / CONFIG).is_file() else path


def load_any(path: str | Path) -> SAE:
    """Our SAE from a run folder (its sae/) or a save_pretrained folder."""
    return SAE.from_pretrained(sae_folder(Path(path)))


def load_layers(spec: str) -> list[SAE]:
    """The transcoders of --sae for circuit-tracer: runs comma-separated in layer order, or one
    folder holding a run per layer, put in the order of the layers their hookpoints name."""
    folder = Path(spec)
    if "," in spec or not folder.is_dir() or (sae_folder(folder) / CONFIG).is_file():
        return [load_any(p) for p in spec.split(",")]
    runs = [p for p in sorted(folder.iterdir()) if (sae_folder(p) / CONFIG).is_file()]
    saes = [load_any(p) for p in runs]
    unplaced = [str(p) for p, sae in zip(runs, saes, strict=True) if recorded_layer(sae) is None]
    if unplaced or not saes:
        what = (
            f"runs whose hookpoint names no layer: {', '.join(unplaced)}" if unplaced else "no run"
        )
        raise ConfigError(
            f"{spec} holds {what}; list the runs as --sae run0,run1,... in layer order"
        )
    return sorted(saes, key=recorded_layer)


def export(cfg: ExportConfig) -> Path:
    """`choicesae export`: the SAE in cfg.sae written to cfg.out in cfg.format."""
    if not cfg.sae or not cfg.out:
        raise ConfigError("export needs --sae (a run or SAE folder) and --out")
    if cfg.format == "circuit-tracer":
        if not cfg.fold:
            raise ConfigError("circuit-tracer runs transcoders on raw activations: drop --no-fold")
        saes = load_layers(cfg.sae)
        clt = len(saes) == 1 and saes[0].cfg.layers > 1  # one run over every layer
        write = to_circuit_tracer_clt if clt else to_circuit_tracer
        return write(
            saes[0] if clt else saes,
            cfg.out,
            threshold=cfg.threshold,
            scan=cfg.scan,
            input_hook=cfg.input_hook,
            output_hook=cfg.output_hook,
        )
    sae = load_any(cfg.sae)
    if sae.cfg.layers > 1:
        raise ConfigError(
            f"{cfg.format} has no cross-layer transcoder (layers={sae.cfg.layers}): export it "
            "with --format circuit-tracer"
        )
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
