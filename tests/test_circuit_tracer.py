"""circuit-tracer's transcoder sets (interop/circuit_tracer.py) against the real package (the
`circuit` extra): its loader reads our export, its transcoders give our codes and predictions
on the same raw rows, and its attribution runs end to end on a tiny Llama with one of our
transcoders on every layer."""

import dataclasses
import pydoc_data.topics

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_interop import inputs
from test_interop_transcoder import make_transcoder
from tiny_models import ARCHITECTURES, bpe_tokenizer

from choicesae.cli.main import main
from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE
from choicesae.data.hooks import capture_all, find_module, load_model
from choicesae.errors import ConfigError
from choicesae.interop.circuit_tracer import CONFIG, to_circuit_tracer
from choicesae.training.loop import train

SPARSIFIERS = ("topk", "mutual_choice", "feature_choice", "relu")
LAYERS = 3


def layer_set(sparsifier="mutual_choice", normalize="dataset", **kw):
    """One random 16 -> 64 -> 16 transcoder per layer, each with weights and scales of its own."""
    return [make_transcoder(sparsifier, normalize, d_out=16, seed=i, **kw) for i in range(LAYERS)]


def load_set(path):
    """The transcoder set that circuit-tracer's own loader reads from our config.yaml."""
    hf_utils = pytest.importorskip(
        "circuit_tracer.utils.hf_utils", reason="the circuit extra installs circuit-tracer"
    )
    config = yaml.safe_load((path / CONFIG).read_text())
    return hf_utils.load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32)


def test_the_files_hold_circuit_tracers_names_and_shapes(tmp_path):
    path = to_circuit_tracer(layer_set(), tmp_path / "set", scan="tiny")
    config = yaml.safe_load((path / CONFIG).read_text())
    assert config == {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "tiny",
        "transcoders": [str(path / f"layer_{i}.safetensors") for i in range(LAYERS)],
    }
    shapes = {n: list(t.shape) for n, t in load_file(path / "layer_0.safetensors").items()}
    assert shapes == {
        "W_enc": [64, 16],
        "b_enc": [64],
        "W_dec": [64, 16],
        "b_dec": [16],
        "activation_function.threshold": [64],
    }
    skip = to_circuit_tracer(layer_set(skip=True), tmp_path / "skip")
    assert list(load_file(skip / "layer_1.safetensors")["W_skip"].shape) == [16, 16]
    relu = to_circuit_tracer(layer_set("relu"), tmp_path / "relu")
    assert "activation_function.threshold" not in load_file(relu / "layer_2.safetensors")
    assert yaml.safe_load((relu / CONFIG).read_text())["scan"] == "relu"


@pytest.mark.parametrize(
    "sparsifier,threshold",
    [(s, t) for s in SPARSIFIERS for t in ("feature", "global") if s != "relu"] + [("relu", None)],
)
@pytest.mark.parametrize("normalize", ["dataset", "none"])
@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_loads_our_set_and_agrees(tmp_path, sparsifier, threshold, normalize, skip):
    ours = layer_set(sparsifier, normalize, skip=skip)
    theirs = load_set(to_circuit_tracer(ours, tmp_path, threshold=threshold or "feature"))
    assert len(theirs) == LAYERS and theirs.d_transcoder == 64 and theirs.skip_connection == skip
    assert (theirs.feature_input_hook, theirs.feature_output_hook) == (
        "mlp.hook_in",
        "mlp.hook_out",
    )
    for layer, sae in enumerate(ours):
        x = inputs(seed=10 + layer)  # raw rows, as circuit-tracer reads them from the model
        acts = sae.codes(x, threshold=threshold)
        with torch.no_grad():
            their_acts, their_y = theirs[layer].encode(x), theirs[layer](x)
        assert acts.count_nonzero() > 0
        assert torch.equal(their_acts != 0, acts != 0)
        torch.testing.assert_close(their_acts, acts, rtol=1e-4, atol=1e-5)
        y = sae.reconstruct(x, threshold=threshold)
        torch.testing.assert_close(their_y, y, rtol=1e-4, atol=1e-4)


def test_what_circuit_tracer_cannot_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--normalize dataset"):
        to_circuit_tracer(layer_set(normalize="token"), tmp_path)
    with pytest.raises(ConfigError, match="d_out=8"):
        to_circuit_tracer([make_transcoder(normalize="dataset", d_out=8)], tmp_path)
    relu = SAEConfig("relu", num_latents=64, d_in=16, normalize="dataset")
    with pytest.raises(ConfigError, match="--transcoder"):
        to_circuit_tracer([SAE(relu)], tmp_path)
    with pytest.raises(ConfigError, match=r"same number of latents.*\[64, 64, 32\]"):
        narrow = SAE(dataclasses.replace(relu, num_latents=32, d_out=16))
        to_circuit_tracer([*layer_set("relu")[:2], narrow], tmp_path)
    with pytest.raises(
        ConfigError, match=r"skip path on every layer or on none, not on layers \[1, 2\]"
    ):
        to_circuit_tracer([*layer_set()[:1], *layer_set(skip=True)[1:]], tmp_path)
    with pytest.raises(ConfigError, match="layer order"):
        saes = layer_set(hookpoint="layers.1.post_attention_layernorm")
        to_circuit_tracer(saes, tmp_path)
    with pytest.raises(ConfigError, match="one transcoder per layer"):
        to_circuit_tracer([], tmp_path)
    with pytest.raises(ConfigError, match="cross-layer transcoder"):
        clt = SAEConfig("relu", num_latents=64, d_in=32, d_out=32, normalize="dataset", layers=2)
        to_circuit_tracer([SAE(clt)], tmp_path)
    with pytest.raises(ConfigError, match="thresholds"):
        sae = make_transcoder(normalize="dataset", d_out=16)
        sae.threshold.fill_(float("nan"))
        to_circuit_tracer([sae], tmp_path)


def test_export_command_takes_one_run_per_layer(tmp_path, capsys):
    ours = layer_set()
    runs = []
    for layer, sae in enumerate(ours):
        sae.save_pretrained(tmp_path / f"run{layer}" / "sae")
        runs.append(str(tmp_path / f"run{layer}"))
    args = ["export", "--sae", ",".join(runs), "--format", "circuit-tracer"]
    assert main([*args, "--out", str(tmp_path / "set"), "--scan", "mine"]) == 0
    config = yaml.safe_load((tmp_path / "set" / CONFIG).read_text())
    assert config["scan"] == "mine" and len(config["transcoders"]) == LAYERS
    for layer, sae in enumerate(ours):
        w = load_file(tmp_path / "set" / f"layer_{layer}.safetensors")
        torch.testing.assert_close(w["W_enc"], (sae.W_enc * sae.scale).T.detach())
        torch.testing.assert_close(w["W_dec"], (sae.W_dec / sae.scale_out).detach())
    assert main([*args, "--out", str(tmp_path / "nofold"), "--no-fold"]) == 2
    assert "--no-fold" in capsys.readouterr().err


def test_a_folder_of_runs_exports_in_the_order_of_its_hookpoints_layers(tmp_path, capsys):
    ours = layer_set(hookpoint="")  # as train writes one run per hookpoint of a store
    for name, layer in (("a", 2), ("b", 0), ("c", 1)):  # names out of the layers' order
        sae = ours[layer]
        sae.cfg = dataclasses.replace(sae.cfg, hookpoint=f"layers.{layer}.mlp_in")
        sae.save_pretrained(tmp_path / "runs" / name / "sae")
    (tmp_path / "runs" / "notes").mkdir()
    args = ["export", "--sae", str(tmp_path / "runs"), "--format", "circuit-tracer"]
    assert main([*args, "--out", str(tmp_path / "set")]) == 0
    for layer, sae in enumerate(ours):
        w = load_file(tmp_path / "set" / f"layer_{layer}.safetensors")
        torch.testing.assert_close(w["b_enc"], sae.b_enc.detach())
    SAE(dataclasses.replace(ours[0].cfg, hookpoint="")).save_pretrained(tmp_path / "runs" / "d")
    assert main([*args, "--out", str(tmp_path / "set2")]) == 2
    assert "names no layer" in capsys.readouterr().err


# ------------------------------------------------ attribution on a tiny Llama, end to end


def tiny_llama(folder):
    """A random 3-layer LlamaForCausalLM (d_model 32) and its byte-level BPE tokenizer, saved."""
    from transformers import AutoModelForCausalLM

    tokenizer = bpe_tokenizer()
    make_config, _ = ARCHITECTURES["llama"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def mlp_rows(folder, input_ids):
    """Each layer's (MLP input, MLP output) rows [N, 32] for input_ids [B, T], hooked where our
    harvest hooks them: the outputs of layers.L.post_attention_layernorm and layers.L.mlp."""
    model, _ = load_model(str(folder))
    names = [f"layers.{L}.{m}" for L in range(LAYERS) for m in ("post_attention_layernorm", "mlp")]
    outs = capture_all(
        model, [find_module(model, n) for n in names], input_ids, torch.ones_like(input_ids)
    )
    rows = [out.reshape(-1, out.shape[-1]) for out in outs]
    return [(rows[2 * L], rows[2 * L + 1]) for L in range(LAYERS)]


@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_attributes_a_prompt_with_our_transcoders(tmp_path, skip):
    """Mutual Choice transcoders trained on every MLP of a tiny Llama, exported, and
    circuit-tracer's nnsight backend building a graph offline: its feature nodes are exactly
    the features our transcoders activate on the prompt, at our activations."""
    ct = pytest.importorskip("circuit_tracer", reason="the circuit extra installs circuit-tracer")
    folder = tiny_llama(tmp_path / "llama")
    tokenizer = bpe_tokenizer()
    topics = pydoc_data.topics.topics
    text = [tokenizer.encode(topics[k])[:64] for k in sorted(topics)[:24]]
    pairs = mlp_rows(folder, torch.tensor([ids for ids in text if len(ids) == 64]))
    saes = []
    for layer, (x, y) in enumerate(pairs):
        cfg = TrainConfig(
            sae=SAEConfig(
                "mutual_choice",
                k=4,
                num_latents=64,
                hookpoint=f"layers.{layer}.post_attention_layernorm",
                target=f"layers.{layer}.mlp",
                skip=skip,
            ),
            transcoder=True,
            steps=40,
            batch_size=128,
            out=str(tmp_path / f"run{layer}"),
            progress=False,
        )
        saes.append(train(cfg, (x, y)))
    transcoders = load_set(to_circuit_tracer(saes, tmp_path / "set"))
    model = ct.ReplacementModel.from_pretrained_and_transcoders(
        str(folder), transcoders, backend="nnsight", device=torch.device("cpu")
    )
    # the tokenizer's one special token (id 0) first, where circuit-tracer zeroes the features
    prompt = [0] + tokenizer.encode("def main(): return the value")
    graph = ct.attribute(prompt, model, max_n_logits=3, batch_size=64)

    ours = []  # (layer, position, feature, activation) of our codes on the prompt, position 0 aside
    for layer, (x, _) in enumerate(mlp_rows(folder, torch.tensor([prompt]))):
        acts = saes[layer].codes(x)[1:]  # [T - 1, F]
        ours += [(layer, p + 1, f, float(acts[p, f])) for p, f in acts.nonzero().tolist()]
    assert len(ours) > LAYERS
    nodes = {
        tuple(row): float(a)
        for row, a in zip(graph.active_features.tolist(), graph.activation_values, strict=True)
    }
    assert set(nodes) == {(L, p, f) for L, p, f, _ in ours}
    for L, p, f, a in ours:
        assert nodes[(L, p, f)] == pytest.approx(a, rel=1e-4, abs=1e-5)
    n_features, n_logits = len(nodes), len(graph.logit_targets)
    assert graph.adjacency_matrix.shape[0] == n_features + (len(prompt) * (LAYERS + 1)) + n_logits
    assert graph.adjacency_matrix.isfinite().all()
    assert graph.adjacency_matrix[-n_logits:, :n_features].abs().sum() > 0  # features -> logits
