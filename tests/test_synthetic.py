import numpy as np
import pytest
import torch

from choicesae.core.config import SAEConfig
from choicesae.core.sae import SAE
from choicesae.data.synthetic import (
    SyntheticConfig,
    feature_probabilities,
    mmcs,
    recovered,
    sparse_dictionary,
    write_synthetic,
)
from choicesae.errors import ConfigError

CFG = SyntheticConfig(tokens=40_000, d_in=64, num_features=40, mean_active=5, noise=0.0, seed=3)


@pytest.fixture(scope="module")
def codes():
    """The true codes, solved back exactly: 41 directions in 64 dimensions are independent."""
    x, dictionary = sparse_dictionary(CFG)
    c = torch.linalg.lstsq(dictionary.T.double(), x.T.double()).solution.T  # [tokens, 41]
    return c.float().where(c.abs() > 1e-4, 0.0), x, dictionary


def test_first_token_rows_are_one_constant_direction(codes):
    c, x, dictionary = codes
    first = c[:, -1] != 0
    assert first.float().mean() == pytest.approx(1 / 64, abs=0.003)
    assert torch.allclose(x[first], dictionary[-1].expand_as(x[first]))
    assert not c[first, :-1].any()


def test_l0_distribution_and_frequency_law(codes):
    c, _, _ = codes
    rest = c[c[:, -1] == 0, :-1]
    p = feature_probabilities(CFG)
    l0 = (rest != 0).sum(-1).float()
    # a sum of independent Bernoulli(p_i): mean Σp, variance Σp(1-p)
    assert l0.mean() == pytest.approx(float(p.sum()), rel=0.02)
    assert l0.var() == pytest.approx(float((p * (1 - p)).sum()), rel=0.05)
    assert l0.min() < 3 and l0.max() > 9  # the number of active features varies
    freq = (rest != 0).float().mean(0)
    assert torch.allclose(freq, p, atol=0.01)  # Zipf by rank
    assert (freq[:-1] >= freq[1:] - 0.01).all()
    magnitudes = rest[rest != 0]
    assert magnitudes.min() >= 0.5 - 1e-3 and magnitudes.max() < 1.5 + 1e-3


def test_recovery_metrics(codes):
    _, _, dictionary = codes
    assert mmcs(dictionary, dictionary) == pytest.approx(1.0)
    assert recovered(dictionary, dictionary[torch.randperm(41)] * 3) == 1.0
    random = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    assert mmcs(dictionary, random) < 0.5 and recovered(dictionary, random) == 0.0
    half = torch.cat([dictionary[:20], random[:20]])
    assert recovered(dictionary, half) == pytest.approx(20 / 41)


def test_same_seed_same_data_and_files(tmp_path):
    small = SyntheticConfig(
        tokens=1000, d_in=8, num_features=16, mean_active=2, out=str(tmp_path / "s.npy")
    )
    x, dictionary = sparse_dictionary(small)
    assert torch.equal(sparse_dictionary(small)[0], x)
    other = SyntheticConfig(**{**small.__dict__, "seed": 1})
    assert not torch.equal(sparse_dictionary(other)[0], x)
    x_path, dict_path = write_synthetic(small)
    assert np.array_equal(np.load(x_path), x.numpy())
    assert np.array_equal(np.load(dict_path), dictionary.numpy())


@pytest.mark.parametrize(
    "kw", [{"mean_active": 0}, {"first_token_share": 1.0}, {"magnitude_min": 2.0}, {"noise": -1}]
)
def test_bad_settings(kw):
    with pytest.raises(ConfigError):
        SyntheticConfig(**kw)


def test_an_sae_seeded_like_the_data_does_not_start_at_the_true_dictionary():
    cfg = SyntheticConfig(tokens=16, d_in=32, num_features=64)
    _, dictionary = sparse_dictionary(cfg)
    torch.manual_seed(cfg.seed)
    sae = SAE(SAEConfig(k=4, num_latents=128).resolve(32))
    assert mmcs(dictionary, sae.W_dec.detach()) < 0.8
