"""Transcoders in the SAELens and sparsify formats: round trips through our reader, the real
libraries loading our exports and agreeing with our predictions on the same raw inputs, their
own transcoders read into ours, and the shapes and forms a format cannot hold refused."""

import json

import pytest
import torch
from test_interop import (  # the SAE tests' helpers: `ours` reads sae.output_stats, so a
    assert_same_model,  # transcoder's prediction is compared in its target's space
    assert_same_outputs,
    inputs,
    ours,
)

from choicesae.cli.main import main
from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.preprocess import normalize
from choicesae.core.sae import SAE
from choicesae.errors import ConfigError
from choicesae.interop.saelens import from_saelens, to_saelens
from choicesae.interop.sparsify import from_sparsify, to_sparsify
from choicesae.training.loop import train

SPARSIFIERS = ("topk", "mutual_choice", "feature_choice", "relu")


def targets(x: torch.Tensor, d_out: int, seed=2) -> torch.Tensor:
    """A smooth function of x [n, d_out] with an offset of its own: what a transcoder predicts."""
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.tanh(x @ torch.randn(16, d_out, generator=g) / 4) + 1.5


@torch.no_grad()
def set_thresholds_(sae: SAE, x: torch.Tensor) -> None:
    """Per-feature thresholds at each affinity's 90th percentile on raw x, the median as the
    global one: plainly, without the estimator of `choicesae eval`."""
    z_pre = sae.pre_acts(normalize(x, sae.cfg.normalize, sae.scale)[0])
    sae.threshold.copy_(z_pre.quantile(0.9, dim=0).clamp(min=0))
    sae.threshold_global.fill_(float(sae.threshold.median()))


@torch.no_grad()
def make_transcoder(sparsifier="topk", normalize="token", d_out=8, seed=0, **kw) -> SAE:
    """A 16 -> 64 -> d_out transcoder with random weights, non-zero biases, distinct input and
    target scales (the target's stays 1 with normalize="none", as training leaves it), a Zipf
    fit, ranks, densities and thresholds."""
    torch.manual_seed(seed)
    cfg = SAEConfig(
        sparsifier, k=4, num_latents=64, d_in=16, d_out=d_out, normalize=normalize, **kw
    )
    sae = SAE(cfg)
    sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    sae.b_enc.copy_(0.05 * torch.randn(64) - 0.05)
    sae.b_dec.copy_(0.1 * torch.randn(d_out))
    sae.scale.fill_(0.37)
    sae.scale_out.fill_(1.0 if normalize == "none" else 2.3)
    sae.zipf.copy_(torch.tensor([1.1, 5.3]))
    sae.feature_rank.copy_(torch.randperm(64) + 1)
    sae.density.copy_(torch.rand(64))
    if sae.W_skip is not None:
        sae.W_skip.copy_(0.2 * torch.randn_like(sae.W_skip))
    set_thresholds_(sae, inputs(seed + 1))
    return sae


def assert_agree(acts, y, their_acts, their_y):
    assert acts.count_nonzero() > 0
    assert torch.equal(acts != 0, their_acts != 0)
    torch.testing.assert_close(their_acts, acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(their_y, y, rtol=1e-4, atol=1e-4)


def saelens_outputs(path, x):
    sae_lens = pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    theirs = sae_lens.SAE.load_from_disk(path)
    assert isinstance(theirs, sae_lens.Transcoder)
    with torch.no_grad():  # forward: decode, and a skip transcoder's x W_skipᵀ
        return theirs.encode(x), theirs(x)


def sparsify_outputs(path, x):
    sparsify = pytest.importorskip("sparsify", reason="the interop extra installs eai-sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(path)
    assert theirs.cfg.transcode
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        y = theirs(x).sae_out  # decode, and a skip transcoder's x W_skipᵀ
    acts = torch.zeros(len(x), theirs.num_latents).scatter(-1, top_indices, top_acts)
    return acts, y


def their_outputs(outputs, sae: SAE, path, x, fold: bool):
    """A format's codes and prediction on raw x: folded, it takes x and predicts the raw target;
    unfolded, it takes our normalized x_n and predicts the target times scale_out."""
    if fold:
        return outputs(path, x)
    acts, y_scaled = outputs(path, normalize(x, sae.cfg.normalize, sae.scale)[0])
    return acts, y_scaled / sae.scale_out


# ---------------------------------------------------------------- round trips, our reader


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
@pytest.mark.parametrize("normalize", ["token", "dataset", "none"])
def test_saelens_round_trip(tmp_path, sparsifier, normalize):
    sae = make_transcoder(sparsifier, normalize, capacities="zipf", hookpoint="h.3", target="m.3")
    x = inputs()
    back = from_saelens(to_saelens(sae, tmp_path / "raw", fold=False))
    assert_same_model(sae, back)
    assert_same_outputs(sae, back, x)
    back = from_saelens(to_saelens(sae, tmp_path / "folded"))
    assert_same_model(sae, back, exact_weights=normalize == "none")
    assert_same_outputs(sae, back, x)


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
@pytest.mark.parametrize("normalize", ["token", "dataset", "none"])
def test_sparsify_round_trip(tmp_path, sparsifier, normalize):
    sae = make_transcoder(sparsifier, normalize, d_out=16)
    back = from_sparsify(to_sparsify(sae, tmp_path / "raw", fold=False, as_topk=True))
    assert_same_model(sae, back)
    assert_same_outputs(sae, back, inputs())
    if normalize != "token":  # sparsify cannot normalise a token: nothing to fold
        back = from_sparsify(to_sparsify(sae, tmp_path / "folded", as_topk=True))
        assert_same_model(sae, back, exact_weights=normalize == "none")
        assert_same_outputs(sae, back, inputs())


def test_saelens_config_fields(tmp_path):
    sae = make_transcoder("relu", model="gpt2", hookpoint="h.6.ln_2", target="h.6.mlp", context=64)
    cfg = json.loads((to_saelens(sae, tmp_path / "t") / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder"
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (16, 64, 8)
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "layer_norm"
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"]) == ("h.6.ln_2", "h.6.mlp")
    ours_entry = meta["choicesae"]
    assert ours_entry["output_factor"] == pytest.approx(1 / 2.3)
    assert ours_entry["outputs"] == "raw target activations"
    cfg = json.loads((to_saelens(sae, tmp_path / "n", fold=False) / "cfg.json").read_text())
    assert cfg["metadata"]["choicesae"]["outputs"].startswith("the target times 2.29")
    sae_lens = pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "t")
    assert theirs.cfg.metadata.hook_name_out == "h.6.mlp" and theirs.cfg.d_out == 8


def test_exports_made_before_transcoders_still_import(tmp_path):
    """An autoencoder's cfg.json without output_factor: its output factor is its input one."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig("topk", k=4, num_latents=64, d_in=16, normalize="dataset"))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16))
        sae.scale.fill_(0.37)
    path = to_saelens(sae, tmp_path / "old")
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["metadata"]["choicesae"]["output_factor"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert_same_model(sae, from_saelens(path), exact_weights=False)


# ---------------------------------------------------------------- refusals


def test_forms_and_widths_the_formats_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="d_in=16 and predicts d_out=8"):
        to_sparsify(make_transcoder("topk", "none"), tmp_path / "a")
    with pytest.raises(ConfigError, match="topk transcoder exports to SAELens as jumprelu_t"):
        to_saelens(make_transcoder("topk"), tmp_path / "b", form="topk")
    with pytest.raises(ConfigError, match="jumprelu_transcoder, not 'batchtopk'"):
        to_saelens(make_transcoder("mutual_choice"), tmp_path / "c", form="batchtopk")
    with pytest.raises(ConfigError, match="transcoder, not 'standard'"):
        to_saelens(make_transcoder("relu"), tmp_path / "d", form="standard")
    with pytest.raises(ConfigError, match="no-fold"):
        to_sparsify(make_transcoder("topk", "token", d_out=16), tmp_path / "e")


def test_a_topk_transcoder_needs_thresholds_for_saelens(tmp_path):
    sae = make_transcoder("topk")
    sae.threshold.fill_(float("nan"))
    with pytest.raises(ConfigError, match="choicesae eval"):
        to_saelens(sae, tmp_path / "x")
    to_saelens(make_transcoder("relu"), tmp_path / "r")  # ReLU needs none


# ---------------------------------------------------------------- the real SAELens


SAELENS_CASES = [  # sparsifier, normalize, export options, our inference
    ("relu", "token", {}, None),
    ("relu", "dataset", {}, None),
    ("relu", "none", {}, None),
    ("relu", "token", {"fold": False}, None),
    ("topk", "token", {}, "feature"),
    ("topk", "dataset", {"threshold": "global"}, "global"),
    ("topk", "none", {}, "feature"),
    ("mutual_choice", "token", {}, "feature"),
    ("mutual_choice", "dataset", {}, "feature"),
    ("feature_choice", "token", {}, "feature"),
    ("feature_choice", "none", {"threshold": "global"}, "global"),
    ("feature_choice", "dataset", {"fold": False}, "feature"),
]


@pytest.mark.parametrize("sparsifier,normalize,options,threshold", SAELENS_CASES)
def test_saelens_loads_our_export_and_agrees(tmp_path, sparsifier, normalize, options, threshold):
    sae = make_transcoder(sparsifier, normalize)
    x = inputs()
    path = to_saelens(sae, tmp_path / "t", **options)
    theirs = their_outputs(saelens_outputs, sae, path, x, options.get("fold", True))
    assert_agree(*ours(sae, x, threshold), *theirs)


@pytest.mark.parametrize("architecture", ["transcoder", "jumprelu_transcoder"])
@pytest.mark.parametrize("normalization", ["none", "layer_norm"])
def test_saelens_native_transcoder_imports(tmp_path, architecture, normalization):
    """A transcoder written by SAELens itself reads into ours and predicts the same."""
    sae_lens = pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    torch.manual_seed(3)
    cls, cfg_cls = sae_lens.registry.get_sae_class(architecture)
    metadata = sae_lens.saes.sae.SAEMetadata(hook_name="h.2.ln_2", hook_name_out="h.2.mlp")
    cfg = cfg_cls(
        d_in=16,
        d_sae=64,
        d_out=8,
        apply_b_dec_to_input=False,
        normalize_activations=normalization,
        metadata=metadata,
    )
    theirs = cls(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        if architecture == "jumprelu_transcoder":
            theirs.threshold.copy_(torch.rand(64) * 0.3)
    theirs.save_model(tmp_path / "native")
    sae = from_saelens(tmp_path / "native")
    c = sae.cfg
    assert (c.d_in, c.d_out, c.num_latents) == (16, 8, 64)
    assert (c.hookpoint, c.target) == ("h.2.ln_2", "h.2.mlp")
    assert c.sparsifier == ("relu" if architecture == "transcoder" else "jumprelu")
    assert c.normalize == ("token" if normalization == "layer_norm" else "none")
    x = inputs()
    with torch.no_grad():
        their_acts = theirs.encode(x)
        their_y = theirs.decode(their_acts)
    assert_agree(*ours(sae, x), their_acts, their_y)  # the default codes: the file's own


@pytest.mark.parametrize("sparsifier", ["relu", "mutual_choice"])
@pytest.mark.parametrize("normalize", ["dataset", "none"])
def test_skip_transcoders_round_trip_and_run_in_saelens(tmp_path, sparsifier, normalize):
    sae = make_transcoder(sparsifier, normalize, skip=True)
    x = inputs()
    path = to_saelens(sae, tmp_path / "t")
    assert json.loads((path / "cfg.json").read_text())["architecture"] == (
        "skip_transcoder" if sparsifier == "relu" else "jumprelu_skip_transcoder"
    )
    back = from_saelens(path)
    assert_same_model(sae, back, exact_weights=normalize == "none")
    assert_same_outputs(sae, back, x)
    assert_agree(*ours(sae, x), *saelens_outputs(path, x))


@pytest.mark.parametrize("architecture", ["skip_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_native_skip_transcoder_imports(tmp_path, architecture):
    sae_lens = pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    torch.manual_seed(5)
    cls, cfg_cls = sae_lens.registry.get_sae_class(architecture)
    theirs = cls(cfg_cls(d_in=16, d_sae=64, d_out=8, apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        if architecture == "jumprelu_skip_transcoder":
            theirs.threshold.copy_(torch.rand(64) * 0.3)
    theirs.save_model(tmp_path / "native")
    sae = from_saelens(tmp_path / "native")
    assert sae.cfg.skip and sae.W_skip.shape == (16, 8)
    x = inputs()
    assert_agree(*ours(sae, x), *saelens_outputs(tmp_path / "native", x))


# ---------------------------------------------------------------- the real sparsify


SPARSIFY_CASES = [  # sparsifier, normalize, fold, our sparsifier for the comparison
    ("topk", "none", True, None),
    ("topk", "dataset", True, None),
    ("topk", "token", False, None),
    ("relu", "dataset", True, None),
    ("relu", "token", False, None),
    ("mutual_choice", "none", True, "topk"),
    ("feature_choice", "dataset", False, "topk"),
]


@pytest.mark.parametrize("sparsifier,normalize,fold,compare", SPARSIFY_CASES)
def test_sparsify_loads_our_export_and_agrees(tmp_path, sparsifier, normalize, fold, compare):
    sae = make_transcoder(sparsifier, normalize, d_out=16)
    x = inputs()
    path = to_sparsify(sae, tmp_path / "t", fold=fold, as_topk=True)
    theirs = their_outputs(sparsify_outputs, sae, path, x, fold)
    assert_agree(*ours(sae, x, sparsifier=compare), *theirs)


def test_sparsify_native_transcoder_imports(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="the interop extra installs eai-sparsify")
    torch.manual_seed(4)
    theirs = sparsify.SparseCoder(16, sparsify.TranscoderConfig(num_latents=64, k=6))
    with torch.no_grad():
        theirs.encoder.bias.copy_(0.1 * torch.randn(64))
        theirs.W_dec.copy_(0.3 * torch.randn(64, 16))  # a transcoder starts at zero
        theirs.b_dec.copy_(0.2 * torch.randn(16))
    theirs.save_to_disk(tmp_path / "native")
    sae = from_sparsify(tmp_path / "native")
    c = sae.cfg
    assert (c.sparsifier, c.k, c.normalize, c.d_in, c.d_out) == ("topk", 6, "none", 16, 16)
    x = inputs()
    assert_agree(*ours(sae, x), *sparsify_outputs(tmp_path / "native", x))


@pytest.mark.parametrize("normalize", ["dataset", "none"])
def test_skip_transcoders_round_trip_and_run_in_sparsify(tmp_path, normalize):
    sae = make_transcoder("topk", normalize, d_out=16, skip=True)
    x = inputs()
    path = to_sparsify(sae, tmp_path / "t")
    assert json.loads((path / "cfg.json").read_text())["skip_connection"]
    back = from_sparsify(path)
    assert_same_model(sae, back, exact_weights=normalize == "none")
    assert_same_outputs(sae, back, x)
    assert_agree(*ours(sae, x), *sparsify_outputs(path, x))


def test_sparsify_native_skip_transcoder_imports_and_skip_autoencoders_are_refused(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="the interop extra installs eai-sparsify")
    torch.manual_seed(6)
    cfg = sparsify.TranscoderConfig(num_latents=64, k=6, skip_connection=True)
    theirs = sparsify.SparseCoder(16, cfg)
    with torch.no_grad():
        theirs.W_dec.copy_(0.3 * torch.randn(64, 16))
        theirs.W_skip.copy_(0.3 * torch.randn(16, 16))
    theirs.save_to_disk(tmp_path / "native")
    sae = from_sparsify(tmp_path / "native")
    assert sae.cfg.skip
    x = inputs()
    assert_agree(*ours(sae, x), *sparsify_outputs(tmp_path / "native", x))
    cfg = sparsify.SparseCoderConfig(num_latents=64, k=6, skip_connection=True)
    sparsify.SparseCoder(16, cfg).save_to_disk(tmp_path / "skip")
    with pytest.raises(ConfigError, match="cannot import a sparsify autoencoder with skip"):
        from_sparsify(tmp_path / "skip")


# ---------------------------------------------------------------- trained transcoders


def trained(tmp_path, normalize: str, d_out: int) -> SAE:
    x = inputs(n=2048)
    sae_cfg = SAEConfig("topk", k=4, num_latents=64, normalize=normalize)
    cfg = TrainConfig(
        sae=sae_cfg,
        transcoder=True,
        steps=50,
        batch_size=128,
        out=str(tmp_path / "run"),
        progress=False,
    )
    sae = train(cfg, (x, targets(x, d_out)))
    set_thresholds_(sae, x)
    return sae


def test_a_trained_transcoder_runs_in_saelens(tmp_path):
    sae = trained(tmp_path, "token", d_out=8)
    assert float(sae.scale_out) != 1  # the target's own scale, folded into the export
    x = inputs(seed=5)
    path = to_saelens(sae, tmp_path / "t")
    assert_agree(*ours(sae, x, "feature"), *saelens_outputs(path, x))
    assert_same_model(sae, from_saelens(path), exact_weights=False)


def test_a_trained_transcoder_runs_in_sparsify(tmp_path):
    sae = trained(tmp_path, "dataset", d_out=16)
    assert float(sae.scale) != 1 and float(sae.scale_out) != 1
    x = inputs(seed=5)
    path = to_sparsify(sae, tmp_path / "t")
    assert_agree(*ours(sae, x), *sparsify_outputs(path, x))
    assert_same_model(sae, from_sparsify(path), exact_weights=False)


def test_export_and_import_commands(tmp_path):
    sae = make_transcoder("mutual_choice", target="h.1.mlp")
    sae.save_pretrained(tmp_path / "run" / "sae")
    assert main(["export", "--sae", str(tmp_path / "run"), "--out", str(tmp_path / "sl")]) == 0
    assert main(["import", "--path", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 0
    assert_same_model(sae, SAE.from_pretrained(tmp_path / "back"), exact_weights=False)
