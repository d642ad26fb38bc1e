"""Matryoshka SAEs (Bussmann et al. 2025): the code is selected once over all latents, then each
prefix of the latents reconstructs the input on its own (step/objective.py, ops.decode below=)."""

import dataclasses
import json

import pytest
import torch

from choicesae.core.config import SAEConfig, TrainConfig
from choicesae.core.losses import l1
from choicesae.core.preprocess import normalize
from choicesae.core.sae import SAE
from choicesae.core.sparsifiers import SPARSIFIERS
from choicesae.errors import ConfigError
from choicesae.step.objective import Masks, objective
from choicesae.step.ops import Dense, Sparse
from choicesae.training.loop import train

D, K, B = 16, 4, 64
PREFIXES, WEIGHTS = (16, 64, 200), (0.5, 1.0, 2.0)


def setup(sparsifier: str) -> tuple[SAE, TrainConfig]:
    sae_cfg = SAEConfig(sparsifier=sparsifier, k=K, capacities="uniform").resolve(D)  # F 256
    cfg = TrainConfig(
        sae=sae_cfg,
        matryoshka=",".join(map(str, PREFIXES)),
        matryoshka_weights=",".join(map(str, WEIGHTS)),
    )
    torch.manual_seed(0)
    sae = SAE(sae_cfg)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
        sae.b_dec.normal_(std=0.1)
    return sae, cfg


def reference_loss(sae: SAE, x: torch.Tensor, cfg: TrainConfig, sparsifier: str) -> torch.Tensor:
    """The Matryoshka loss written out: one selection by the sparsifier's reference function,
    then a loop over the prefixes (the whole dictionary last, weight 1), each decoding its own
    latents alone; relu's L1 penalty on top."""
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    rule = SPARSIFIERS[sparsifier]
    m = sae.capacities(B, K) if rule.capacities else None
    acts = rule.reference(z, K, m).acts  # [B, F]
    F = acts.shape[1]
    loss = 0.0
    for size, weight in [*zip(PREFIXES, WEIGHTS, strict=True), (F, 1.0)]:
        x_hat = acts[:, :size] @ sae.W_dec[:size] + sae.b_dec
        loss = loss + weight * ((x - x_hat) ** 2).sum(-1).mean()
    if rule.l1:
        loss = loss + cfg.l1_coeff * l1(acts, sae.W_dec)
    return loss


def grads(sae: SAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*sae.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


@pytest.mark.parametrize("ops", [Dense(), Sparse()], ids=["dense", "sparse"])
@pytest.mark.parametrize("sparsifier", ["topk", "mutual_choice", "feature_choice", "relu"])
def test_the_loss_and_its_gradients_equal_a_loop_over_prefixes(sparsifier, ops):
    sae, cfg = setup(sparsifier)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    if sparsifier == "relu":  # few positive affinities, so that the sparse path is taken
        with torch.no_grad():
            sae.b_enc.sub_(2.0)
    none = torch.zeros(cfg.sae.num_latents, dtype=torch.bool)  # no aux loss: the loss is MSEs
    out = objective(sae, x, cfg, sparsifier, Masks(none, none), ops=ops)
    assert {f"mse_{m}" for m in PREFIXES} <= out.terms.keys()
    ref = reference_loss(sae, x, cfg, sparsifier)
    torch.testing.assert_close(out.loss, ref)
    ours = grads(sae, out.loss)
    for name, grad in grads(sae, ref).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6)


def test_the_aux_losses_and_phases_keep_working(synthetic, tmp_path):
    """Phased Mutual Choice → Feature Choice with both aux losses, Matryoshka prefixes on:
    every prefix term is logged, and the run ends with no dead latent (section 4.4)."""
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        sae=SAEConfig(sparsifier="feature_choice", k=4, expansion=4),
        batch_size=512,
        steps=60,
        mutual_choice_share=0.5,
        matryoshka="16,64",
        dead_tokens=1024,
        log_every=10,
        progress=False,
    )
    train(cfg, synthetic[0])

    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(r["mse_16"] > r["mse_64"] > r["mse"] for r in log)
    assert {r["phase"] for r in log} == {"mutual_choice", "feature_choice"}
    assert log[-1]["dead"] == 0


def prefix_fvu(sae: SAE, x: torch.Tensor, size: int) -> float:
    x_n, _ = normalize(x, sae.cfg.normalize, sae.scale)
    with torch.no_grad():
        acts = sae.encode(x_n).acts
        x_hat = acts[:, :size] @ sae.W_dec[:size] + sae.b_dec
    return float(((x_n - x_hat) ** 2).sum() / ((x_n - x_n.mean(0)) ** 2).sum())


def test_a_matryoshka_sae_reconstructs_with_its_first_latents_alone(synthetic, tmp_path):
    """What Matryoshka training is for: the first 16 of 256 latents reconstruct the input far
    better than the first 16 of a plain SAE trained the same way, for a small cost in the whole
    dictionary's reconstruction."""
    x = synthetic[0]
    plain = TrainConfig(
        out=str(tmp_path / "plain"),
        sae=SAEConfig(sparsifier="topk", k=4, expansion=8),
        batch_size=512,
        steps=200,
        progress=False,
    )
    nested = dataclasses.replace(plain, out=str(tmp_path / "nested"), matryoshka="16")
    a, b = train(plain, x), train(nested, x)
    held_out = x[-4096:]
    assert prefix_fvu(b, held_out, 16) < 0.8 * prefix_fvu(a, held_out, 16)
    assert prefix_fvu(b, held_out, 256) < 1.1 * prefix_fvu(a, held_out, 256)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"matryoshka": "64,16"}, "must increase"),
        ({"matryoshka": "0,16"}, "must increase"),
        ({"matryoshka": "16,256"}, "below num_latents"),
        ({"matryoshka": "16,x"}, "comma-separated numbers"),
        ({"matryoshka": "16,64", "matryoshka_weights": "1"}, "one weight per prefix"),
        ({"matryoshka": "16", "matryoshka_weights": "-1"}, "must not be negative"),
        ({"matryoshka": "16", "parallel": "features"}, "does not support --matryoshka"),
    ],
)
def test_impossible_prefixes_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(sae=SAEConfig(k=4, num_latents=256), **kw)
