"""circuit-tracer's on-disk format of a per-layer transcoder set: export our transcoders, one per
layer of the model, so that circuit-tracer builds attribution graphs with them (docs/interop.md).

A set is a folder of `layer_{i}.safetensors`, one transcoder per layer, and a `config.yaml`
(model_kind transcoder_set, the hooks the transcoders read and write, a scan name, the files).
circuit-tracer's TranscoderSet needs a transcoder for EVERY layer 0..n_layers-1 of the model,
all with the same number of latents, each predicting a target as wide as its input (the
residual stream: an MLP's input and output). Each file holds W_enc [F, d_in] (the transpose of
ours and SAELens's), b_enc [F], W_dec [F, d_out], b_dec [d_out], and optionally
`activation_function.threshold` [F] (JumpReLU) and W_skip [d_out, d_in] (applied as x W_skipᵀ).

circuit-tracer feeds a transcoder the raw activations of its input hook and adds its output
as it is, so everything ours does around the weights is folded into them by interop/common.py's
`folded`, as for SAELens: the dataset scale c of the input (linear, so folded exactly) and the
target's scale_out, giving W_enc·c, W_dec/scale_out, b_dec/scale_out, W_skip·c/scale_out. A
per-token normalisation is not linear and is refused. The sparsifier becomes circuit-tracer's
activation: ReLU stays ReLU; Mutual and Feature Choice, which select within a batch, run per
token as JumpReLU at our thresholds (appendix B), as `sae.codes(x)` does; so does TopK, since
circuit-tracer does not pass k through for a per-layer set (its loader builds ReLU or JumpReLU
only). circuit-tracer's JumpReLU keeps z' > θ, ours z' > max(θ, 0): the file holds max(θ, 0).

A cross-layer transcoder (SAEConfig.layers = L > 1, one run) is written as circuit-tracer's
CrossLayerTranscoder, read by its `load_clt(folder)`: per layer i, `W_enc_{i}.safetensors` holds
W_enc_{i} [F, d] (latent block i's encoder, reading layer i's MLP input), b_enc_{i} [F],
b_dec_{i} [d] and threshold_{i} [F], and `W_dec_{i}.safetensors` holds W_dec_{i} [F, L − i, d],
block i's decoders to the MLP outputs of layers i … L−1. They are cut from the same folded
tensors as a set's (`transcoder_tensors`), and config.yaml has model_kind
cross_layer_transcoder. circuit-tracer 0.5.0's load_clt reads no skip path, and its CLT spans
every layer of the model from layer 0.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from safetensors.torch import save_file
from torch import Tensor

from choicesae.core.sae import SAE, Threshold
from choicesae.data.store import names
from choicesae.errors import ConfigError
from choicesae.interop.common import fold_factors, folded

CONFIG = "config.yaml"
# the hooks circuit-tracer's nnsight backend maps for Llama-family models (utils/
# tl_nnsight_mapping.py): the output of layers[L].post_attention_layernorm and of layers[L].mlp
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"
THRESHOLD = "activation_function.threshold"


def hook_layer(name: str) -> int | None:
    """The layer that a module path names, its first number (layers.3.mlp: 3); None if none."""
    numbers = re.findall(r"\d+", name)
    return int(numbers[0]) if numbers else None


def recorded_layer(sae: SAE) -> int | None:
    """The layer that the transcoder's recorded hookpoint names; None if it records none."""
    return hook_layer(sae.cfg.hookpoint)


def check_runnable(sae: SAE, where: str) -> None:
    """Refuse what circuit-tracer cannot run as a transcoder, per layer or cross-layer."""
    c = sae.cfg
    if not c.transcoder:
        raise ConfigError(
            f"{where}: circuit-tracer replaces MLPs by transcoders, and this is an SAE "
            "(train it with --transcoder on a store harvested with --target)"
        )
    if c.d_out != c.d_in:
        raise ConfigError(
            f"{where}: circuit-tracer's transcoders predict a target as wide as their "
            f"input; this one reads d_in={c.d_in} and predicts d_out={c.d_out}"
        )
    if c.normalize == "token":
        raise ConfigError(
            f"{where}: circuit-tracer feeds raw activations and a per-token normalisation "
            "cannot fold into the weights: train with --normalize dataset (a transcoder's "
            "default) or none"
        )


def check_layer(sae: SAE, layer: int) -> None:
    """Refuse what circuit-tracer cannot run as the transcoder of layer `layer`."""
    c = sae.cfg
    check_runnable(sae, f"layer {layer}")
    if c.layers > 1:
        raise ConfigError(
            f"layer {layer}: a cross-layer transcoder (layers={c.layers}) is not one layer's, "
            "and a per-layer set holds one transcoder per layer: export it alone"
        )
    if recorded_layer(sae) not in (None, layer):
        raise ConfigError(
            f"the transcoder in place {layer} reads {c.hookpoint!r}: give one transcoder per "
            "layer of the model, in layer order from layer 0"
        )


def transcoder_tensors(sae: SAE, threshold: Threshold = "feature") -> dict[str, Tensor]:
    """One transcoder's tensors in circuit-tracer's names and shapes, for raw inputs and raw
    targets: W_enc [F, d_in], b_enc [F], W_dec [F, d_out], b_dec [d_out], a skip transcoder's
    W_skip [d_out, d_in], and the JumpReLU thresholds [F] of every sparsifier but ReLU."""
    factors, _ = fold_factors(sae, True, "circuit-tracer")
    w = folded(sae, factors)  # W_skip, if any, as circuit-tracer holds it: [d_out, d_in]
    tensors = w | {"W_enc": w["W_enc"].T.contiguous()}
    if sae.cfg.sparsifier != "relu":
        theta = sae.thresholds(threshold).detach().cpu().clamp(min=0)  # [] or [F]
        theta = theta.to(w["W_enc"].dtype).expand(sae.cfg.num_latents).contiguous()
        tensors[THRESHOLD] = theta
    return tensors


def write_config(
    path: Path, model_kind: str, scan: str, input_hook: str, output_hook: str, **files
) -> None:
    """circuit-tracer's config.yaml; `files` its own keys for the weights (a transcoder set's
    `transcoders`: the layer files in layer order, as absolute paths; a cross-layer
    transcoder's files are found by their names, so it has none)."""
    cfg = {
        "model_kind": model_kind,
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "scan": scan or path.name,
    } | files
    (path / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))


def to_circuit_tracer(
    transcoders: Sequence[SAE],
    path: str | Path,
    *,
    threshold: Threshold = "feature",
    scan: str = "",
    input_hook: str = INPUT_HOOK,
    output_hook: str = OUTPUT_HOOK,
) -> Path:
    """Write `transcoders`, layer 0's first and one for every layer of the model, as a
    circuit-tracer transcoder set in the folder `path`; load it with
    `circuit_tracer.utils.hf_utils.load_transcoders(yaml.safe_load(open(path / "config.yaml")))`.
    `threshold`: the per-feature ("feature") or the one global JumpReLU threshold of a Mutual
    Choice, Feature Choice or TopK transcoder; `scan`: the set's name in circuit-tracer (empty:
    the folder's name)."""
    if not transcoders:
        raise ConfigError("a circuit-tracer transcoder set needs one transcoder per layer")
    for layer, sae in enumerate(transcoders):
        check_layer(sae, layer)
    widths = [sae.cfg.num_latents for sae in transcoders]
    if len(set(widths)) > 1:
        raise ConfigError(
            f"circuit-tracer's transcoder set needs the same number of latents on every layer, "
            f"not {widths}"
        )
    skips = [sae.cfg.skip for sae in transcoders]
    if len(set(skips)) > 1:  # its set reads layer 0's to decide whether every layer has one
        raise ConfigError(
            f"circuit-tracer's transcoder set has a skip path on every layer or on none, not "
            f"on layers {[i for i, skip in enumerate(skips) if skip]} only"
        )
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for layer, sae in enumerate(transcoders):
        files.append(str(path / f"layer_{layer}.safetensors"))
        save_file(transcoder_tensors(sae, threshold), files[-1])
    write_config(path, "transcoder_set", scan, input_hook, output_hook, transcoders=files)
    return path


def check_clt(sae: SAE) -> None:
    """Refuse a cross-layer transcoder that circuit-tracer's CrossLayerTranscoder cannot run."""
    c = sae.cfg
    check_runnable(sae, "the cross-layer transcoder")
    if c.skip:
        raise ConfigError(
            "circuit-tracer's load_clt reads no skip path (W_skip) of a cross-layer transcoder: "
            "train it without --skip"
        )
    hooks = names(c.hookpoint)
    if hooks and [hook_layer(h) for h in hooks] != list(range(c.layers)):
        raise ConfigError(
            f"circuit-tracer's cross-layer transcoder spans every layer of the model from layer 0, "
            f"in order; this one reads {c.hookpoint!r}: train it on a harvest of layers.*"
        )


def clt_files(sae: SAE, threshold: Threshold = "feature") -> dict[str, dict[str, Tensor]]:
    """A cross-layer transcoder's files for circuit-tracer, {file name: tensors}, for raw inputs
    and raw targets: `transcoder_tensors` of the whole model cut into its layers' blocks."""
    L = sae.cfg.layers
    F, d = sae.cfg.num_latents // L, sae.cfg.d_in // L
    t = transcoder_tensors(sae, threshold)  # W_enc [L·F, L·d], W_dec [L·F, L·d], ...
    files = {}
    for i in range(L):
        block, x = slice(i * F, (i + 1) * F), slice(i * d, (i + 1) * d)
        enc = {f"W_enc_{i}": t["W_enc"][block, x], f"b_enc_{i}": t["b_enc"][block]}
        enc[f"b_dec_{i}"] = t["b_dec"][x]
        if THRESHOLD in t:
            enc[f"threshold_{i}"] = t[THRESHOLD][block]
        dec = {f"W_dec_{i}": t["W_dec"][block, i * d :].reshape(F, L - i, d)}  # outputs i … L−1
        files[f"W_enc_{i}.safetensors"] = {n: w.contiguous() for n, w in enc.items()}
        files[f"W_dec_{i}.safetensors"] = {n: w.contiguous() for n, w in dec.items()}
    return files


def to_circuit_tracer_clt(
    sae: SAE,
    path: str | Path,
    *,
    threshold: Threshold = "feature",
    scan: str = "",
    input_hook: str = INPUT_HOOK,
    output_hook: str = OUTPUT_HOOK,
) -> Path:
    """Write the cross-layer transcoder `sae` (layers > 1, over every layer of the model) as
    circuit-tracer's CrossLayerTranscoder in the folder `path`; load it with
    `circuit_tracer.transcoder.cross_layer_transcoder.load_clt(path, feature_input_hook=...,
    feature_output_hook=...)` with the hooks of its config.yaml (circuit-tracer's
    `load_transcoders` reads a CLT from the Hugging Face Hub only). `threshold`, `scan`: as in
    `to_circuit_tracer`."""
    if sae.cfg.layers == 1:
        raise ConfigError("a cross-layer transcoder has layers > 1: export a per-layer set")
    check_clt(sae)
    path = Path(path).resolve()
    files = clt_files(sae, threshold)
    found = [*path.glob("W_enc_*.safetensors"), *path.glob("W_dec_*.safetensors")]
    stale = sorted(p.name for p in found if p.name not in files)
    if stale:  # load_clt counts the layers by the W_enc_* files in the folder
        raise ConfigError(f"{path} holds {', '.join(stale)} of another export: use a new folder")
    path.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, path / name)
    write_config(path, "cross_layer_transcoder", scan, input_hook, output_hook)
    return path
