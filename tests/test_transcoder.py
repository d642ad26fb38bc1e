"""Transcoders: an SAE that reads one hookpoint and predicts another (core/sae.py, the
objective's target, training on (input, target) pairs)."""

import dataclasses

import pytest
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.losses import l1
from choicesae.core.sae import SAE
from choicesae.core.sparsifiers import SPARSIFIERS
from choicesae.errors import ConfigError, DataError
from choicesae.step.objective import Masks, objective
from choicesae.step.ops import Dense, Sparse
from choicesae.training.loop import train

SPARSIFIER_NAMES = ["topk", "mutual_choice", "feature_choice", "relu"]
D_IN, D_OUT, TRUE = 48, 16, 32  # input and target widths, true features


def known_map(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, D_IN], y [n, D_OUT], the true target directions [TRUE, D_OUT]): 3 of TRUE
    features active per token, each with an input direction (no superposition: D_IN > TRUE) and
    a target direction, plus a target offset that b_dec must learn."""
    g = torch.Generator().manual_seed(0)
    D_x = torch.nn.functional.normalize(torch.randn(TRUE, D_IN, generator=g), dim=-1)
    D_y = torch.nn.functional.normalize(torch.randn(TRUE, D_OUT, generator=g), dim=-1)
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, TRUE)
    active = torch.rand(n, TRUE, generator=g).argsort(-1)[:, :3]
    codes.scatter_(1, active, torch.rand(n, 3, generator=g) + 0.5)
    return codes @ D_x, codes @ D_y + 0.5, D_y


# (FVU at most, mean cosine of each true direction's best decoder row at least), measured
# 0.05 / 0.97, 0.07 / 0.90, 0.08 / 0.92, 0.001 / 0.98: a transcoder that ignored its input
# would score FVU 1
BOUNDS = {
    "topk": (0.1, 0.93),
    "mutual_choice": (0.15, 0.85),
    "feature_choice": (0.15, 0.85),
    "relu": (0.01, 0.95),
}


@pytest.mark.parametrize("sparsifier", SPARSIFIER_NAMES)
def test_a_transcoder_recovers_a_known_map(sparsifier, tmp_path):
    x, y, D_y = known_map(8192, seed=1)
    cfg = TrainConfig(
        sae=SAEConfig(sparsifier=sparsifier, k=3, num_latents=64),
        transcoder=True,
        steps=1000,
        batch_size=256,
        l1_coeff=0.01,
        out=str(tmp_path),
        progress=False,
    )
    sae = train(cfg, (x, y))
    assert sae.cfg.normalize == "dataset"  # auto: a transcoder keeps each token's norm
    assert (sae.W_enc.shape, sae.W_dec.shape, sae.b_dec.shape) == (
        (D_IN, 64),
        (64, D_OUT),
        (D_OUT,),
    )
    x_test, y_test, _ = known_map(2048, seed=2)
    with torch.no_grad():
        err = (sae.reconstruct(x_test) - y_test).pow(2).sum()
        fvu = float(err / (y_test - y_test.mean(0)).pow(2).sum())
        mmcs = float((sae.W_dec @ D_y.T).max(0).values.mean())
    worst_fvu, least_mmcs = BOUNDS[sparsifier]
    assert fvu < worst_fvu and mmcs > least_mmcs, (fvu, mmcs)


def reference_loss(sae: SAE, x, y, cfg: TrainConfig, sparsifier: str) -> torch.Tensor:
    """A transcoder's loss written out: z' = x W_enc + b_enc (no b_dec on the input side),
    the sparsifier's reference selection, ŷ = z W_dec + b_dec against the target y; with
    Matryoshka prefixes, each prefix's latents predict y on their own too."""
    z = x @ sae.W_enc + sae.b_enc
    skip = 0.0 if sae.W_skip is None else x @ sae.W_skip  # a skip transcoder's linear path
    rule = SPARSIFIERS[sparsifier]
    m = sae.capacities(len(x), sae.cfg.k) if rule.capacities else None
    acts = rule.reference(z, sae.cfg.k, m).acts
    loss = 0.0
    for size, weight in [*cfg.prefixes, (sae.cfg.num_latents, 1.0)]:
        y_hat = acts[:, :size] @ sae.W_dec[:size] + sae.b_dec + skip
        loss = loss + weight * ((y - y_hat) ** 2).sum(-1).mean()
    return loss + (cfg.l1_coeff * l1(acts, sae.W_dec) if rule.l1 else 0.0)


@pytest.mark.parametrize("skip", [False, True], ids=["", "skip"])
@pytest.mark.parametrize("matryoshka", ["", "16,64"], ids=["plain", "matryoshka"])
@pytest.mark.parametrize("ops", [Dense(), Sparse()], ids=["dense", "sparse"])
@pytest.mark.parametrize("sparsifier", SPARSIFIER_NAMES)
def test_the_loss_and_gradients_equal_a_reference(sparsifier, ops, matryoshka, skip):
    sae_cfg = SAEConfig(sparsifier=sparsifier, k=4, num_latents=128, capacities="uniform")
    sae_cfg = dataclasses.replace(sae_cfg, skip=skip).resolve(D_IN, D_OUT)
    cfg = TrainConfig(sae=sae_cfg, transcoder=True, matryoshka=matryoshka)
    torch.manual_seed(0)
    sae = SAE(sae_cfg)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3).sub_(2.0 if sparsifier == "relu" else 0.0)  # sparse relu
        sae.b_dec.normal_(std=0.1)
        if skip:
            sae.W_skip.normal_(std=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, D_IN, generator=g), torch.randn(64, D_OUT, generator=g)
    none = torch.zeros(sae_cfg.num_latents, dtype=torch.bool)
    out = objective(sae, x, cfg, sparsifier, Masks(none, none), ops=ops, target=y)
    ref = reference_loss(sae, x, y, cfg, sparsifier)
    torch.testing.assert_close(out.loss, ref)
    params = dict(sae.named_parameters())
    ours = torch.autograd.grad(out.loss, list(params.values()))
    theirs = torch.autograd.grad(ref, list(params.values()))
    for name, a, b in zip(params, ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_the_encoder_does_not_read_b_dec_and_a_saved_transcoder_loads_back(tmp_path):
    x, y, _ = known_map(1024, seed=3)
    cfg = TrainConfig(
        sae=SAEConfig(k=3, num_latents=64), transcoder=True, steps=20, batch_size=128,
        out=str(tmp_path), progress=False,
    )  # fmt: skip
    sae = train(cfg, (x, y))
    loaded = SAE.from_pretrained(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and float(loaded.scale_out) == float(sae.scale_out) != 1.0
    torch.testing.assert_close(loaded.reconstruct(x[:256]), sae.reconstruct(x[:256]))
    codes = sae.codes(x[:256])
    with torch.no_grad():
        sae.b_dec.add_(1.0)  # an output bias: the codes do not move, the prediction does
    torch.testing.assert_close(sae.codes(x[:256]), codes)
    assert not torch.allclose(sae.reconstruct(x[:256]), loaded.reconstruct(x[:256]))


def test_targets_without_transcoder_and_the_reverse_are_refused(tmp_path):
    x, y, _ = known_map(512, seed=4)
    base = dict(sae=SAEConfig(k=3, num_latents=64), steps=2, batch_size=128, progress=False)
    with pytest.raises(DataError, match="holds no targets and the SAE is a transcoder"):
        train(TrainConfig(transcoder=True, out=str(tmp_path / "a"), **base), x)
    with pytest.raises(DataError, match=r"holds \(hookpoint, target\) pairs.*--transcoder"):
        train(TrainConfig(out=str(tmp_path / "b"), **base), (x, y))
    with pytest.raises(DataError, match="inputs hold 512 rows but targets 100"):
        train(TrainConfig(transcoder=True, out=str(tmp_path / "c"), **base), (x, y[:100]))
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written


def test_initial_affinities_are_centred_on_the_input_mean():
    """An SAE's encoder subtracts b_dec (the data mean) from its input; a transcoder's cannot,
    so b_enc starts at −x̄ W_enc: without it a common input direction gives every latent a
    constant offset, and the latents it favours win every token."""
    x, y, _ = known_map(1024, seed=5)
    sae = SAE(SAEConfig(k=3, num_latents=64).resolve(D_IN, D_OUT))
    sae.init_from_data_(torch.cat([x + 3.0, y], 1))  # a large common offset
    x_n, y_n = sae.prepare(torch.cat([x + 3.0, y], 1))
    with torch.no_grad():
        z = sae.pre_acts(x_n)
    torch.testing.assert_close(z.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.b_dec, y_n.mean(0))


def test_a_skip_transcoder_learns_the_linear_part_that_latents_cannot(tmp_path):
    """A target with a dense linear part, y = codes D_y + x A: k = 3 latents cannot carry x A,
    a skip path can (sparsify's and SAELens's skip transcoders); it starts at zero, saves
    and loads back, and the weight decay reaches it as the other weight matrices."""
    x, y, _ = known_map(8192, seed=1)
    A = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(5)) / D_IN**0.5
    y = y + x @ A
    x_test, y_test, _ = known_map(2048, seed=2)
    y_test = y_test + x_test @ A

    def fvu(skip: bool) -> tuple[float, SAE]:
        cfg = TrainConfig(
            sae=SAEConfig(k=3, num_latents=64, skip=skip), transcoder=True, steps=600,
            batch_size=256, out=str(tmp_path / str(skip)), progress=False,
        )  # fmt: skip
        sae = train(cfg, (x, y))
        err = (sae.reconstruct(x_test) - y_test).pow(2).sum()
        return float(err / (y_test - y_test.mean(0)).pow(2).sum()), sae

    (plain, _), (skipped, sae) = fvu(False), fvu(True)
    assert skipped < 0.5 * plain, (skipped, plain)
    assert SAE(sae.cfg).W_skip.abs().sum() == 0 and sae.W_skip.abs().sum() > 0
    loaded = SAE.from_pretrained(tmp_path / "True" / "sae")
    torch.testing.assert_close(loaded.reconstruct(x_test), sae.reconstruct(x_test))
    with pytest.raises(ConfigError, match="pass x to decode"):
        sae.decode(torch.zeros(1, 64))


def test_skip_is_refused_for_an_autoencoder():
    with pytest.raises(ConfigError, match="skip adds a linear path.*--transcoder"):
        SAEConfig(skip=True).resolve(D_IN)
