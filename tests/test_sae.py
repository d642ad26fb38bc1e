import json

import pytest
import torch

from choicesae.core.config import SAEConfig
from choicesae.core.preprocess import denormalize, normalize
from choicesae.core.sae import CHUNK, SAE
from choicesae.errors import ConfigError, DataError


def make_sae(**kw):
    torch.manual_seed(0)
    return SAE(SAEConfig(k=4, **kw).resolve(16))


def test_shapes_and_tied_init():
    sae = make_sae(expansion=4)
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_a_shard_holds_the_whole_saes_initial_latents():
    """Feature sharding builds only its latents, drawn as the whole SAE draws them (in chunks
    of sae.CHUNK rows, here several), and leaves the RNG where the whole SAE does."""
    cfg = SAEConfig(k=4, num_latents=2 * CHUNK + 8).resolve(3)
    torch.manual_seed(0)
    whole, after = SAE(cfg), torch.randn(2)
    for lo, hi in [(0, 8), (CHUNK - 4, 2 * CHUNK + 4), (2 * CHUNK, 2 * CHUNK + 8)]:
        torch.manual_seed(0)
        shard = SAE(cfg, slice(lo, hi))
        assert torch.equal(torch.randn(2), after)
        assert shard.W_dec.shape == (hi - lo, 3) and shard.b_enc.shape == (hi - lo,)
        assert torch.equal(shard.W_dec, whole.W_dec[lo:hi])
        assert torch.equal(shard.W_enc, whole.W_enc[:, lo:hi])
        assert shard.density.shape == whole.density.shape  # the [F] buffers stay whole


def test_unresolved_config_is_refused():
    with pytest.raises(ConfigError, match="resolve"):
        SAE(SAEConfig())


def test_encode_decode_forward():
    sae = make_sae(expansion=4)
    x = torch.randn(8, 16)
    z_pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.allclose(sae.pre_acts(x), z_pre)
    codes = sae.encode(x)
    assert (codes.l0 <= 4).all()
    assert torch.allclose(sae(x), codes.acts @ sae.W_dec + sae.b_dec)
    assert (sae.encode(x, k=9).l0 <= 9).all() and sae.encode(x, k=9).l0.max() > 4


def test_decoder_projection_and_parallel_gradient_removal():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1) + 0.5)
    sae.unit_norm_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.W_dec.shape[0]))

    grad = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grad_()
    W = sae.W_dec.detach()
    assert torch.allclose((sae.W_dec.grad * W).sum(-1), torch.zeros(W.shape[0]), atol=1e-6)
    # only the parallel part was removed
    parallel = (grad * W).sum(-1, keepdim=True) * W
    assert torch.allclose(sae.W_dec.grad + parallel, grad, atol=1e-6)


@pytest.mark.parametrize("mode", ["token", "dataset", "none"])
def test_normalize_round_trip(mode):
    x = torch.randn(10, 16) * 5 + 3
    x_n, stats = normalize(x, mode, 0.25)
    assert torch.allclose(denormalize(x_n, stats), x, atol=1e-5)
    if mode == "token":
        assert torch.allclose(x_n.mean(-1), torch.zeros(10), atol=1e-6)
        assert torch.allclose(x_n.norm(dim=-1), torch.ones(10))
    if mode == "dataset":
        assert torch.allclose(x_n, x * 0.25)


def test_init_from_data_sets_scale_and_b_dec():
    sae = make_sae(normalize="dataset")
    sample = torch.randn(512, 16) * 7 + 1
    sae.init_from_data_(sample)
    assert torch.isclose((sample * sae.scale).norm(dim=-1).mean(), torch.tensor(1.0))
    assert torch.allclose(sae.b_dec, (sample * sae.scale).mean(0))


def test_reconstruct_works_in_raw_space():
    sae = make_sae(normalize="token")
    x = torch.randn(6, 16) * 4 + 2
    x_n, stats = normalize(x, "token")
    assert torch.allclose(sae.reconstruct(x), denormalize(sae(x_n), stats))


def test_save_load_round_trip(tmp_path):
    sae = make_sae(normalize="dataset", sparsifier="mutual_choice")
    sae.scale.fill_(0.5)
    sae.save_pretrained(tmp_path / "sae")
    loaded = SAE.from_pretrained(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(
            loaded.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True
        )
    x = torch.randn(5, 16)
    assert torch.equal(loaded.reconstruct(x, batch=True), sae.reconstruct(x, batch=True))
    assert (
        json.loads((tmp_path / "sae" / "config.json").read_text())["sparsifier"] == "mutual_choice"
    )


def test_load_corrupt_or_missing(tmp_path):
    with pytest.raises(DataError, match="cannot load"):
        SAE.from_pretrained(tmp_path / "nowhere")
    make_sae().save_pretrained(tmp_path / "sae")
    (tmp_path / "sae" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot load"):
        SAE.from_pretrained(tmp_path / "sae")
