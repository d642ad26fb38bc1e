"""SAELens and sparsify formats: round trips through our reader, and the real libraries (the
`interop` extra) loading our files and agreeing with our outputs on the same inputs."""

import json

import pytest
import torch

from choicesae.cli.main import main
from choicesae.core.config import SAEConfig
from choicesae.core.preprocess import denormalize, normalize
from choicesae.core.sae import SAE
from choicesae.errors import ConfigError, DataError
from choicesae.interop.common import BUFFER_NAMES as BUFFERS
from choicesae.interop.saelens import from_saelens, to_saelens
from choicesae.interop.sparsify import from_sparsify, to_sparsify

SPARSIFIERS = ("topk", "mutual_choice", "feature_choice", "relu")


@torch.no_grad()
def make_sae(sparsifier="topk", normalize="token", seed=0, **kw) -> SAE:
    """A 16 -> 64 SAE with untied weights, non-zero biases, a dataset scale, a Zipf fit, ranks,
    densities and thresholds (as `choicesae eval` leaves them), all distinct from the defaults."""
    torch.manual_seed(seed)
    cfg = SAEConfig(sparsifier, k=4, expansion=4, normalize=normalize, **kw).resolve(16)
    sae = SAE(cfg)
    sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    sae.b_enc.copy_(0.05 * torch.randn(64) - 0.05)
    sae.b_dec.copy_(0.1 * torch.randn(16))
    sae.scale.fill_(0.37)
    sae.zipf.copy_(torch.tensor([1.1, 5.3]))
    sae.feature_rank.copy_(torch.randperm(64) + 1)
    sae.density.copy_(torch.rand(64))
    z_pre = sae.pre_acts(normalize_inputs(sae, inputs(seed + 1)))
    sae.threshold.copy_(z_pre.quantile(0.9, dim=0).clamp(min=0))
    sae.threshold_global.fill_(float(sae.threshold.median()))
    return sae


def inputs(seed=1, n=96) -> torch.Tensor:
    """Raw activations [n, 16] with a shared offset and a spread of norms."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(16, generator=g)
    return 3 * torch.randn(n, 16, generator=g) + offset


def normalize_inputs(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    return normalize(x, sae.cfg.normalize, sae.scale)[0]


@torch.no_grad()
def ours(sae: SAE, x: torch.Tensor, threshold=None, sparsifier=None, batch=False):
    """(codes [B, F], reconstruction [B, d_target] in the raw space: a transcoder's prediction
    of its target) of raw x: the default codes, JumpReLU at `threshold`, batch inference, or
    another `sparsifier` on the same affinities."""
    x_n, _ = normalize(x, sae.cfg.normalize, sae.scale)
    if sparsifier:
        acts = sae.sparsify(sparsifier, sae.pre_acts(x_n), sae.cfg.k).acts
    else:
        acts = sae.encode(x_n, threshold=threshold, batch=batch).acts
    return acts, denormalize(sae.decode(acts, x_n), sae.output_stats(x))


def assert_same_model(a: SAE, b: SAE, exact_weights=True):
    assert a.cfg == b.cfg
    for name in BUFFERS:  # exactly, NaN (not estimated yet) included
        torch.testing.assert_close(
            getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True
        )
    for name, _ in a.named_parameters():  # a skip transcoder's W_skip among them
        if exact_weights:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        else:  # factors folded in and out again: within float32 rounding
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=3e-7, atol=0)


def assert_same_outputs(a: SAE, b: SAE, x: torch.Tensor):
    for threshold, batch in ((None, False), (None, True), ("feature", False), ("global", False)):
        acts_a, x_hat_a = ours(a, x, threshold, batch=batch)
        acts_b, x_hat_b = ours(b, x, threshold, batch=batch)
        assert torch.equal(acts_a != 0, acts_b != 0)
        torch.testing.assert_close(acts_a, acts_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_hat_a, x_hat_b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- round trips, our reader


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
@pytest.mark.parametrize("normalize", ["token", "dataset", "none"])
def test_saelens_round_trip(tmp_path, sparsifier, normalize):
    sae = make_sae(sparsifier, normalize, capacities="zipf", model="m", hookpoint="h.3")
    x = inputs()
    # unfolded: our weights verbatim, bit for bit
    back = from_saelens(to_saelens(sae, tmp_path / "raw", fold=False))
    assert_same_model(sae, back)
    assert_same_outputs(sae, back, x)
    # folded (raw activations in): a dataset scale or the layer_norm factor in and out again
    back = from_saelens(to_saelens(sae, tmp_path / "folded"))
    assert_same_model(sae, back, exact_weights=normalize == "none")
    assert_same_outputs(sae, back, x)


@pytest.mark.parametrize("sparsifier", SPARSIFIERS)
@pytest.mark.parametrize("normalize", ["token", "dataset", "none"])
def test_sparsify_round_trip(tmp_path, sparsifier, normalize):
    sae = make_sae(sparsifier, normalize)
    back = from_sparsify(to_sparsify(sae, tmp_path / "raw", fold=False, as_topk=True))
    assert_same_model(sae, back)
    assert_same_outputs(sae, back, inputs())
    if normalize != "token":  # sparsify cannot normalise a token: nothing to fold
        back = from_sparsify(to_sparsify(sae, tmp_path / "folded", as_topk=True))
        assert_same_model(sae, back, exact_weights=normalize == "none")
        assert_same_outputs(sae, back, inputs())


def test_batchtopk_form_round_trip(tmp_path):
    sae = make_sae("mutual_choice")
    back = from_saelens(to_saelens(sae, tmp_path / "b", form="batchtopk", fold=False))
    assert_same_model(sae, back)


def test_saelens_config_fields(tmp_path):
    sae = make_sae("mutual_choice", model="gpt2", hookpoint="h.6", context=64)
    cfg = json.loads((to_saelens(sae, tmp_path / "j", threshold="global") / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and (cfg["d_in"], cfg["d_sae"]) == (16, 64)
    assert cfg["normalize_activations"] == "layer_norm" and cfg["apply_b_dec_to_input"] is True
    meta = cfg["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["context_size"]) == ("gpt2", "h.6", 64)
    assert meta["choicesae"]["inputs"] == "raw activations"
    from safetensors.torch import load_file

    theta = load_file(tmp_path / "j" / "sae_weights.safetensors")["threshold"]
    assert torch.equal(theta, sae.threshold_global.expand(64))  # global: one value everywhere
    cfg = json.loads((to_saelens(sae, tmp_path / "n", fold=False) / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    assert "normalize(x, 'token'" in cfg["metadata"]["choicesae"]["inputs"]


# ---------------------------------------------------------------- refusals


def test_thresholds_must_be_estimated(tmp_path):
    sae = make_sae("feature_choice")
    sae.threshold.fill_(float("nan"))
    with pytest.raises(ConfigError, match="choicesae eval"):
        to_saelens(sae, tmp_path / "x")
    to_saelens(make_sae("topk"), tmp_path / "t")  # TopK needs no thresholds


def test_formats_that_cannot_hold_the_model_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="batchtopk"):
        to_saelens(make_sae("feature_choice"), tmp_path / "a", form="batchtopk")
    with pytest.raises(ConfigError, match="no-fold"):
        to_sparsify(make_sae("topk", "token"), tmp_path / "b")
    with pytest.raises(ConfigError, match="as-topk"):
        to_sparsify(make_sae("mutual_choice", "none"), tmp_path / "c")
    with pytest.raises(DataError, match="cfg.json"):
        from_saelens(tmp_path / "missing")
    path = to_saelens(make_sae(), tmp_path / "d")
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["metadata"]["choicesae"]
    cfg["normalize_activations"] = "covariance_whitening"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="covariance_whitening"):
        from_saelens(path)


def test_damaged_exports_are_named_errors(tmp_path):
    from safetensors.torch import save_file

    path = to_sparsify(make_sae("topk", "none"), tmp_path / "a")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["choicesae"]["input_factor"] = "two"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="choicesae entry"):
        from_sparsify(path)
    path = to_saelens(make_sae("topk", "none"), tmp_path / "b")
    save_file({"density": torch.zeros(3)}, path / "choicesae.safetensors")
    with pytest.raises(DataError, match="density has shape"):
        from_saelens(path)
    (path / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot read the weights"):
        from_saelens(path)


# ---------------------------------------------------------------- the real SAELens


def saelens_outputs(path, x, training=False):
    sae_lens = pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    cls = sae_lens.TrainingSAE if training else sae_lens.SAE
    theirs = cls.load_from_disk(path)
    with torch.no_grad():
        acts = theirs.encode(x)
        return acts, theirs.decode(acts)


SAELENS_CASES = [  # sparsifier, normalize, export options, our inference
    ("topk", "token", {}, None),
    ("topk", "dataset", {}, None),
    ("relu", "token", {}, None),
    ("relu", "none", {}, None),
    ("mutual_choice", "token", {}, "feature"),
    ("mutual_choice", "token", {"threshold": "global"}, "global"),
    ("mutual_choice", "dataset", {}, "feature"),
    ("feature_choice", "token", {}, "feature"),
    ("feature_choice", "token", {"fold": False}, "feature"),
    ("topk", "token", {"fold": False}, None),
]


@pytest.mark.parametrize("sparsifier,normalize,options,threshold", SAELENS_CASES)
def test_saelens_loads_our_export_and_agrees(tmp_path, sparsifier, normalize, options, threshold):
    sae = make_sae(sparsifier, normalize)
    x = inputs()
    acts, x_hat = ours(sae, x, threshold)
    path = to_saelens(sae, tmp_path / "sae", **options)
    if options.get("fold", True):
        their_acts, their_x_hat = saelens_outputs(path, x)
    else:  # the unfolded SAE takes our normalized inputs and gives normalized outputs
        x_n, stats = normalize_inputs_with_stats(sae, x)
        their_acts, their_x_hat_n = saelens_outputs(path, x_n)
        their_x_hat = denormalize(their_x_hat_n, stats)
    assert acts.count_nonzero() > 0
    assert torch.equal(acts != 0, their_acts != 0)
    torch.testing.assert_close(their_acts, acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(their_x_hat, x_hat, rtol=1e-4, atol=1e-4)


def normalize_inputs_with_stats(sae, x):
    return normalize(x, sae.cfg.normalize, sae.scale)


def test_saelens_batchtopk_form_agrees_with_mutual_choice(tmp_path):
    sae = make_sae("mutual_choice", "token")
    x = inputs()
    acts, x_hat = ours(sae, x, batch=True)  # batch inference: the k·B largest of the batch
    path = to_saelens(sae, tmp_path / "b", form="batchtopk")
    their_acts, their_x_hat = saelens_outputs(path, x, training=True)
    assert torch.equal(acts != 0, their_acts != 0) and int((acts != 0).sum()) == 4 * len(x)
    torch.testing.assert_close(their_acts, acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(their_x_hat, x_hat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_native_sae_imports(tmp_path, architecture):
    """An SAE written by SAELens itself (with its own options on) reads into ours."""
    sae_lens = pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    torch.manual_seed(3)
    cls, cfg_cls = sae_lens.registry.get_sae_class(architecture)
    extra = {"k": 5, "rescale_acts_by_decoder_norm": True} if architecture == "topk" else {}
    apply_b_dec = architecture != "standard"
    theirs = cls(cfg_cls(d_in=16, d_sae=64, apply_b_dec_to_input=apply_b_dec, **extra))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        if architecture == "jumprelu":
            theirs.threshold.copy_(torch.rand(64) * 0.3)
    theirs.save_model(tmp_path / "native")
    sae = from_saelens(tmp_path / "native")
    assert sae.cfg.sparsifier == {"standard": "relu"}.get(architecture, architecture)
    x = inputs()
    acts, x_hat = ours(sae, x)  # the default codes: a jumprelu file's own thresholds
    with torch.no_grad():
        their_acts = theirs.encode(x)
        their_x_hat = theirs.decode(their_acts)
    assert torch.equal(acts != 0, their_acts != 0)
    torch.testing.assert_close(acts, their_acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_hat, their_x_hat, rtol=1e-4, atol=1e-4)


def test_saelens_batchtopk_file_imports_with_its_k_and_threshold(tmp_path):
    """A SAELens BatchTopK training SAE (its default rescale_acts_by_decoder_norm on): our
    default codes are its inference form's (JumpReLU at topk_threshold, what SAELens saves it
    as), and batch=True gives its BatchTopK(k) on the same batch."""
    pytest.importorskip("sae_lens", reason="the interop extra installs sae-lens")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(5)
    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=5))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    theirs.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    theirs.save_model(tmp_path / "training")
    theirs.save_inference_model(tmp_path / "inference")
    sae = from_saelens(tmp_path / "training")
    assert (sae.cfg.sparsifier, sae.cfg.k) == ("mutual_choice", 5)
    assert float(sae.threshold_global) == pytest.approx(0.4) and (sae.threshold == 0.4).all()
    x = inputs()
    for batch, path, training in ((False, "inference", False), (True, "training", True)):
        acts, x_hat = ours(sae, x, batch=batch)
        their_acts, their_x_hat = saelens_outputs(tmp_path / path, x, training)
        assert acts.count_nonzero() > 0 and torch.equal(acts != 0, their_acts != 0)
        torch.testing.assert_close(acts, their_acts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x_hat, their_x_hat, rtol=1e-4, atol=1e-4)
    assert int((ours(sae, x, batch=True)[0] != 0).sum()) == 5 * len(x)


# ---------------------------------------------------------------- the real sparsify


def sparsify_outputs(path, x):
    sparsify = pytest.importorskip("sparsify", reason="the interop extra installs eai-sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(path)
    with torch.no_grad():
        top_acts, top_indices, _ = theirs.encode(x)
        x_hat = theirs.decode(top_acts, top_indices)
    acts = torch.zeros(len(x), theirs.num_latents).scatter(-1, top_indices, top_acts)
    return acts, x_hat


SPARSIFY_CASES = [  # sparsifier, normalize, fold, our sparsifier for the comparison
    ("topk", "none", True, None),
    ("topk", "dataset", True, None),
    ("topk", "token", False, None),
    ("relu", "dataset", True, None),
    ("mutual_choice", "none", True, "topk"),
    ("feature_choice", "token", False, "topk"),
]


@pytest.mark.parametrize("sparsifier,normalize,fold,compare", SPARSIFY_CASES)
def test_sparsify_loads_our_export_and_agrees(tmp_path, sparsifier, normalize, fold, compare):
    sae = make_sae(sparsifier, normalize)
    x = inputs()
    acts, x_hat = ours(sae, x, sparsifier=compare)
    path = to_sparsify(sae, tmp_path / "sae", fold=fold, as_topk=True)
    if fold:
        their_acts, their_x_hat = sparsify_outputs(path, x)
    else:
        x_n, stats = normalize_inputs_with_stats(sae, x)
        their_acts, their_x_hat_n = sparsify_outputs(path, x_n)
        their_x_hat = denormalize(their_x_hat_n, stats)
    assert acts.count_nonzero() > 0
    assert torch.equal(acts != 0, their_acts != 0)
    torch.testing.assert_close(their_acts, acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(their_x_hat, x_hat, rtol=1e-4, atol=1e-4)


def test_sparsify_native_sae_imports(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="the interop extra installs eai-sparsify")
    torch.manual_seed(4)
    theirs = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=64, k=6))
    with torch.no_grad():
        theirs.encoder.bias.copy_(0.1 * torch.randn(64))
        theirs.b_dec.copy_(0.2 * torch.randn(16))
    theirs.save_to_disk(tmp_path / "native")
    sae = from_sparsify(tmp_path / "native")
    assert (sae.cfg.sparsifier, sae.cfg.k, sae.cfg.normalize) == ("topk", 6, "none")
    x = inputs()
    acts, x_hat = ours(sae, x)
    their_acts, their_x_hat = sparsify_outputs(tmp_path / "native", x)
    assert torch.equal(acts != 0, their_acts != 0)
    torch.testing.assert_close(acts, their_acts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_hat, their_x_hat, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the commands


def test_export_and_import_commands(tmp_path, capsys):
    sae = make_sae("mutual_choice")
    sae.save_pretrained(tmp_path / "run" / "sae")
    assert main(["export", "--sae", str(tmp_path / "run"), "--out", str(tmp_path / "sl")]) == 0
    assert main(["import", "--path", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 0
    assert_same_model(sae, SAE.from_pretrained(tmp_path / "back"), exact_weights=False)
    args = ["export", "--sae", str(tmp_path / "run"), "--format", "sparsify"]
    assert main([*args, "--out", str(tmp_path / "sp")]) == 2
    assert "--as-topk" in capsys.readouterr().err


def test_training_on_a_store_records_its_model_and_hookpoint(tmp_path):
    """The model, hookpoint and context of the store travel with the SAE into the exports."""
    import numpy as np

    from choicesae.core.config import TrainConfig
    from choicesae.data.store import StoreWriter
    from choicesae.training.loop import train

    meta = {"model": "gpt2-tiny", "hookpoint": "h.1", "d_model": 16, "dtype": "float32"}
    writer = StoreWriter(tmp_path / "s", meta | {"context": 8})
    writer.write_shard(inputs(n=1024), np.zeros(1024))
    writer.finish()
    sae_cfg = SAEConfig("topk", k=4, expansion=4)
    run = tmp_path / "run"
    cfg = TrainConfig(
        store=str(tmp_path / "s"),
        out=str(run),
        steps=3,
        batch_size=128,
        sae=sae_cfg,
        progress=False,
    )
    train(cfg)
    sae = SAE.from_pretrained(run / "sae")
    assert (sae.cfg.model, sae.cfg.hookpoint, sae.cfg.context) == ("gpt2-tiny", "h.1", 8)
    meta = json.loads((to_saelens(sae, tmp_path / "x") / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["context_size"]) == ("gpt2-tiny", "h.1", 8)
    cfg = json.loads((to_sparsify(sae, tmp_path / "y", fold=False) / "cfg.json").read_text())
    assert cfg["choicesae"]["config"]["hookpoint"] == "h.1"
