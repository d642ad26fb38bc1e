"""A cross-layer transcoder exported to circuit-tracer (interop/circuit_tracer.py
`to_circuit_tracer_clt`) against the real package (the `circuit` extra): its `load_clt` reads
our files, its encoder and decoder give our codes and predictions layer by layer on the same raw
rows, and its attribution runs end to end on a tiny Llama with one CLT over all its layers."""

import dataclasses
import pydoc_data.topics

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_circuit_tracer import LAYERS, mlp_rows, tiny_llama
from test_interop_transcoder import set_thresholds_
from tiny_models import bpe_tokenizer

from choicesae.cli.main import main
from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.sae import SAE, layer_mask
from choicesae.errors import ConfigError
from choicesae.interop.circuit_tracer import CONFIG, to_circuit_tracer, to_circuit_tracer_clt
from choicesae.training.loop import train

L, D, F = LAYERS, 8, 16  # layers, width per layer, latents per layer
RULES = [  # (sparsifier, per_layer)
    ("topk", False),
    ("topk", True),
    ("mutual_choice", False),
    ("mutual_choice", True),
    ("feature_choice", False),
    ("relu", False),
]
HOOKS = ",".join(f"layers.{i}.post_attention_layernorm" for i in range(L))
TARGETS = ",".join(f"layers.{i}.mlp" for i in range(L))


@torch.no_grad()
def make_clt(sparsifier="mutual_choice", per_layer=False, normalize="dataset", **kw) -> SAE:
    """A random CLT over L layers of width D, its zero blocks zero, with non-zero biases,
    distinct input and target scales and thresholds."""
    cfg = SAEConfig(
        sparsifier, k=6, num_latents=L * F, d_in=L * D, d_out=L * D, layers=L,
        per_layer=per_layer, normalize=normalize, hookpoint=HOOKS, target=TARGETS, **kw,
    )  # fmt: skip
    sae = SAE(cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    sae.W_enc.add_(
        0.3 * torch.randn(L * D, L * F, generator=g) * layer_mask(cfg, "W_enc", sae.latents)
    )
    sae.b_enc.copy_(0.05 * torch.randn(L * F, generator=g) - 0.05)
    sae.b_dec.copy_(0.1 * torch.randn(L * D, generator=g))
    sae.scale.fill_(0.37)
    sae.scale_out.fill_(1.0 if normalize == "none" else 2.3)
    set_thresholds_(sae, rows())
    return sae


def rows(seed=1, n=96) -> torch.Tensor:
    """Raw MLP inputs [n, L·D] of every layer, with an offset and a spread of norms."""
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, L * D, generator=g) + torch.randn(L * D, generator=g)


def load(path, lazy_decoder=True):
    """Our export as circuit-tracer's load_clt reads it, with the hooks and scan of config.yaml."""
    clt = pytest.importorskip(
        "circuit_tracer.transcoder.cross_layer_transcoder",
        reason="the circuit extra installs circuit-tracer",
    )
    config = yaml.safe_load((path / CONFIG).read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    return clt.load_clt(
        str(path), config["feature_input_hook"], config["feature_output_hook"], config["scan"],
        device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=lazy_decoder,
    )  # fmt: skip


def by_layer(t: torch.Tensor) -> torch.Tensor:
    """Our [n, L·w] -> circuit-tracer's [L, n, w]."""
    return t.view(len(t), L, -1).transpose(0, 1)


def test_the_files_hold_circuit_tracers_names_and_shapes(tmp_path):
    path = to_circuit_tracer_clt(make_clt(), tmp_path / "clt", scan="tiny")
    assert yaml.safe_load((path / CONFIG).read_text()) == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "tiny",
    }
    for i in range(L):
        enc = {n: list(t.shape) for n, t in load_file(path / f"W_enc_{i}.safetensors").items()}
        assert enc == {
            f"W_enc_{i}": [F, D],
            f"b_enc_{i}": [F],
            f"b_dec_{i}": [D],
            f"threshold_{i}": [F],
        }
        dec = load_file(path / f"W_dec_{i}.safetensors")
        assert list(dec) == [f"W_dec_{i}"] and list(dec[f"W_dec_{i}"].shape) == [F, L - i, D]
    relu = to_circuit_tracer_clt(make_clt("relu"), tmp_path / "relu")
    assert "threshold_0" not in load_file(relu / "W_enc_0.safetensors")


@pytest.mark.parametrize(
    "sparsifier,per_layer,threshold",
    [(s, p, t) for s, p in RULES for t in ("feature", "global") if s != "relu"]
    + [("relu", False, None)],
)
@pytest.mark.parametrize("normalize", ["dataset", "none"])
def test_circuit_tracer_loads_our_clt_and_agrees(
    tmp_path, sparsifier, per_layer, threshold, normalize
):
    ours = make_clt(sparsifier, per_layer, normalize)
    path = to_circuit_tracer_clt(ours, tmp_path, threshold=threshold or "feature")
    theirs = load(path, lazy_decoder=threshold == "global")  # both ways of reading W_dec_{i}
    assert (theirs.n_layers, theirs.d_transcoder, theirs.d_model) == (L, F, D)
    assert theirs.W_skip is None
    x = rows(seed=7)  # raw rows, as circuit-tracer reads them from the model
    acts = by_layer(ours.codes(x, threshold=threshold))  # [L, n, F]
    y = by_layer(ours.reconstruct(x, threshold=threshold))  # [L, n, D]
    with torch.no_grad():
        their_acts = theirs.encode(by_layer(x))
        for i in range(L):  # the replacement model encodes layer by layer
            torch.testing.assert_close(theirs.encode_layer(by_layer(x)[i], i), their_acts[i])
        their_y = theirs.decode(their_acts.to_sparse())
    assert all(acts[i].count_nonzero() > 0 for i in range(L)) and acts[:, -1].any()
    assert torch.equal(their_acts != 0, acts != 0)
    torch.testing.assert_close(their_acts, acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(their_y, y, rtol=1e-4, atol=1e-4)


def test_what_circuit_tracer_cannot_run_is_refused(tmp_path):
    narrow = SAEConfig("relu", num_latents=L * F, d_in=L * D, d_out=L * 4, layers=L)
    with pytest.raises(ConfigError, match="predicts d_out=12"):
        to_circuit_tracer_clt(SAE(dataclasses.replace(narrow, normalize="dataset")), tmp_path)
    with pytest.raises(ConfigError, match="without --skip"):
        to_circuit_tracer_clt(make_clt(skip=True), tmp_path)
    sae = make_clt()
    sae.cfg = dataclasses.replace(sae.cfg, hookpoint=HOOKS.replace("layers.0", "layers.5"))
    with pytest.raises(ConfigError, match="every layer of the model from layer 0"):
        to_circuit_tracer_clt(sae, tmp_path)
    (tmp_path / "W_enc_3.safetensors").touch()  # a 4-layer CLT's, exported here before
    with pytest.raises(ConfigError, match="W_enc_3.safetensors of another export"):
        to_circuit_tracer_clt(make_clt(), tmp_path)
    with pytest.raises(ConfigError, match="export it alone"):
        to_circuit_tracer([make_clt()], tmp_path)
    sae = make_clt()
    sae.threshold.fill_(float("nan"))
    with pytest.raises(ConfigError, match="thresholds"):
        to_circuit_tracer_clt(sae, tmp_path)


def test_export_command_writes_a_clt_run_as_a_clt(tmp_path, capsys):
    ours = make_clt()
    ours.save_pretrained(tmp_path / "run" / "sae")
    args = ["export", "--sae", str(tmp_path / "run"), "--format", "circuit-tracer"]
    assert main([*args, "--out", str(tmp_path / "clt"), "--scan", "mine"]) == 0
    config = yaml.safe_load((tmp_path / "clt" / CONFIG).read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["scan"] == "mine"
    w = load_file(tmp_path / "clt" / "W_dec_1.safetensors")["W_dec_1"]  # [F, L - 1, D]
    expected = ours.W_dec[F : 2 * F, D:] / ours.scale_out
    torch.testing.assert_close(w, expected.detach().view(F, L - 1, D))
    args[-1] = "saelens"
    assert main([*args, "--out", str(tmp_path / "saelens")]) == 2
    assert "--format circuit-tracer" in capsys.readouterr().err


def test_circuit_tracer_attributes_a_prompt_with_our_clt(tmp_path):
    """A global Mutual Choice CLT trained on every MLP of a tiny Llama, exported, and
    circuit-tracer's nnsight backend building a graph offline: its feature nodes are exactly
    the (layer, position, feature) our CLT activates on the prompt, at our activations."""
    ct = pytest.importorskip("circuit_tracer", reason="the circuit extra installs circuit-tracer")
    folder = tiny_llama(tmp_path / "llama")
    tokenizer = bpe_tokenizer()
    topics = pydoc_data.topics.topics
    text = [tokenizer.encode(topics[k])[:64] for k in sorted(topics)[:24]]
    pairs = mlp_rows(folder, torch.tensor([ids for ids in text if len(ids) == 64]))
    x, y = (torch.cat(side, 1) for side in zip(*pairs, strict=True))  # [N, L·32] each
    cfg = TrainConfig(
        sae=SAEConfig(
            "mutual_choice", k=12, num_latents=L * 64, layers=L, hookpoint=HOOKS, target=TARGETS
        ),
        transcoder=True, steps=40, batch_size=128, out=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    sae = train(cfg, (x, y))
    path = to_circuit_tracer_clt(sae, tmp_path / "clt")
    model = ct.ReplacementModel.from_pretrained_and_transcoders(
        str(folder), load(path), backend="nnsight", device=torch.device("cpu")
    )
    # the tokenizer's one special token (id 0) first, where circuit-tracer zeroes the features
    prompt = [0] + tokenizer.encode("def main(): return the value")
    graph = ct.attribute(prompt, model, max_n_logits=3, batch_size=64)

    x = torch.cat([x for x, _ in mlp_rows(folder, torch.tensor([prompt]))], 1)
    acts = by_layer(sae.codes(x))[:, 1:]  # [L, T - 1, F]: position 0 aside
    ours = {(i, p + 1, f): float(acts[i, p, f]) for i, p, f in acts.nonzero().tolist()}
    assert len({i for i, _, _ in ours}) == L  # every layer's block has active features
    nodes = {
        tuple(row): float(a)
        for row, a in zip(graph.active_features.tolist(), graph.activation_values, strict=True)
    }
    assert set(nodes) == set(ours)
    for key, a in ours.items():
        assert nodes[key] == pytest.approx(a, rel=1e-4, abs=1e-5)
    n_features, n_logits = len(nodes), len(graph.logit_targets)
    assert graph.adjacency_matrix.shape[0] == n_features + (len(prompt) * (L + 1)) + n_logits
    assert graph.adjacency_matrix.isfinite().all()
    assert graph.adjacency_matrix[-n_logits:, :n_features].abs().sum() > 0  # features -> logits
