import math

import pytest
import torch

from choicesae.core.allocation import (
    BudgetExpectation,
    Densities,
    ZipfFit,
    density_capacities,
    dying_features,
    feature_capacities,
    feature_ranks,
    fit_zipf,
    middle_segment,
    rank_order,
    update_densities,
    zipf_capacities,
)
from choicesae.core.losses import nfm, nfm_inf


def zipf_density(F, alpha, beta, c=0.5):
    rank = torch.arange(1, F + 1, dtype=torch.float64)
    return c / (rank + beta) ** alpha


def test_density_window_closes_after_enough_tokens():
    state = Densities.empty(3)
    assert not state.ready
    state = update_densities(state, torch.tensor([1, 0, 4]), 4, window=8)
    assert state.tokens == 4 and not state.ready
    state = update_densities(state, torch.tensor([3, 0, 4]), 4, window=8)
    assert state.tokens == 0 and state.counts.sum() == 0
    assert state.density.tolist() == [0.5, 0.0, 1.0]


def test_ranks_are_by_prevalence_with_ties_by_index():
    density = torch.tensor([0.1, 0.3, 0.1, 0.0, 0.3])
    assert rank_order(density).tolist() == [1, 4, 0, 2, 3]
    assert feature_ranks(density).tolist() == [3, 1, 4, 5, 2]


@pytest.mark.parametrize("alpha,beta", [(1.0, 6.8), (1.3, 4.0), (0.7, 0.0), (2.0, 50.0)])
def test_fit_recovers_exact_zipf(alpha, beta):
    fit = fit_zipf(zipf_density(5000, alpha, beta), None)
    assert fit.alpha == pytest.approx(alpha, rel=1e-3)
    assert fit.beta == pytest.approx(beta, rel=1e-2, abs=1e-2)
    assert fit.log_c == pytest.approx(math.log(0.5), abs=1e-2)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


def test_fit_with_fixed_alpha_recovers_beta():
    fit = fit_zipf(zipf_density(3000, 1.0, 6.8), alpha=1.0)
    assert fit.alpha == 1.0 and fit.beta == pytest.approx(6.8, rel=1e-3)


def test_fit_on_noisy_zipf():
    g = torch.Generator().manual_seed(0)
    noisy = zipf_density(5000, 1.1, 8.0) * torch.exp(0.05 * torch.randn(5000, generator=g))
    fit = fit_zipf(noisy, None)
    assert fit.alpha == pytest.approx(1.1, rel=0.03)
    assert fit.beta == pytest.approx(8.0, rel=0.2)
    assert 0.98 < fit.r2 < 1.0


def test_fit_segment_ignores_a_broken_tail_and_zeros():
    density = zipf_density(4000, 1.0, 6.8)
    density[3000:] *= 0.01  # an under-used tail
    density[3900:] = 0.0  # dead features: no logarithm, left out
    full, middle = fit_zipf(density, 1.0), fit_zipf(density, 1.0, middle_segment(4000))
    assert middle.beta == pytest.approx(6.8, rel=1e-3) and middle.r2 == pytest.approx(1.0)
    assert full.r2 < 0.9


def exact_fit(F, beta=2.0):
    return ZipfFit(1.0, beta, math.log(1.0), 1.0)  # expected(rank) = 1 / (rank + 2)


def test_dying_definition_3_1_hand_cases():
    F = 8  # bottom quartile: ranks 7 and 8 (rank > 6)
    expected = [1 / (r + 2) for r in range(1, F + 1)]
    fit = exact_fit(F)
    # feature index = rank - 1 here (densities already decreasing)
    healthy = torch.tensor(expected)
    assert not dying_features(healthy, fit).any()

    tail = torch.tensor(expected[:6] + [0.5 * expected[6], 0.5 * expected[7]])
    assert dying_features(tail, fit).tolist() == [False] * 6 + [True, True]

    # rank 7 is at 0.55 of Zipf but rank 8 at 0.61 (still ranked below it): condition 3
    # (every lower-ranked feature dying too) fails for rank 7
    d = torch.tensor(expected[:6] + [0.55 * expected[6], 0.61 * expected[7]])
    assert d[6] > d[7]
    assert not dying_features(d, fit).any()

    # ranks 5 and 6 are far below Zipf but not in the bottom quartile: condition 1 fails
    d = torch.tensor(expected[:4] + [0.3 * expected[4], 0.3 * expected[5]] + [0.01, 0.0])
    assert dying_features(d, fit).tolist() == [False] * 6 + [True, True]

    # ratio exactly 0.6 is not below 0.6
    d = torch.tensor(expected[:7] + [0.6 * expected[7]], dtype=torch.float64)
    assert not dying_features(d, fit).any()


def test_dying_against_appendix_g_budget_expectation_hand_case():
    """F 8, k 2, B 20, alpha 1, beta 0: N = 40 / H_8 = 14.72, Algorithm 1 gives m = floor(N/i) =
    [14, 7, 4, 3, 2, 2, 2, 1], so the expected densities are m / 20 = [.7, .35, .2, .15, .1, .1,
    .1, .05]: ranks 7 and 8 are dying below 0.06 and 0.03."""
    budget = BudgetExpectation(alpha=1.0, beta=0.0, k=2, batch_size=20)
    expected = budget.expected(torch.arange(1, 9))
    assert expected.tolist() == [m / 20 for m in (14, 7, 4, 3, 2, 2, 2, 1)]
    head = [0.7, 0.35, 0.2, 0.15, 0.1, 0.1]
    assert dying_features(torch.tensor(head + [0.05, 0.02]), budget).tolist() == [0] * 6 + [1, 1]
    assert dying_features(torch.tensor(head + [0.07, 0.02]), budget).tolist() == [0] * 7 + [1]
    # the same shape fitted at a lower level (0.2 / rank, as a window whose tail is sparse
    # pulls the fit down): nothing is dying; the level is what the budget fixes
    lower = ZipfFit(alpha=1.0, beta=0.0, log_c=math.log(0.2), r2=1.0)
    assert not dying_features(torch.tensor(head + [0.07, 0.02]), lower).any()


def test_dying_maps_back_to_feature_ids():
    expected = torch.tensor([1 / (r + 2) for r in range(1, 9)])
    density = expected.clone()
    density[7] *= 0.1  # rank 8
    shuffled = torch.tensor([5, 7, 0, 3, 1, 6, 2, 4])  # feature j has density[shuffled[j]]
    dying = dying_features(density[shuffled], exact_fit(8))
    assert dying.nonzero().flatten().tolist() == [1]  # feature 1 holds rank 8


def test_algorithm_1_small_case():
    # k=2, F=4, B=10, alpha=1, beta=1: N = 20 / (1/2+1/3+1/4+1/5) = 1200/77
    m = zipf_capacities(k=2, num_latents=4, batch_size=10, alpha=1.0, beta=1.0, m_max=6)
    n = 1200 / 77
    assert m.tolist() == [min(math.floor(n / (i + 1)), 6) for i in range(1, 5)] == [6, 5, 3, 3]
    assert m.sum() <= 2 * 10


def test_feature_capacities_follow_ranks_and_floor():
    ranks = torch.tensor([3, 1, 4, 2])  # feature 1 is the most prevalent
    m = feature_capacities(ranks, k=2, batch_size=10, alpha=1.0, beta=1.0, m_min=0, m_max=0)
    assert m.tolist() == [3, 7, 3, 5]
    tiny = feature_capacities(torch.arange(1, 101), 1, 20, 1.0, 6.8, m_min=0, m_max=0)
    assert tiny.min() == 0  # Algorithm 1 starves the tail when B·k is small
    assert feature_capacities(torch.arange(1, 101), 1, 20, 1.0, 6.8, 1, 0).min() == 1


def test_nfm_losses_equal_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 8, generator=g) * 3
    W_hat = W / W.norm(dim=-1, keepdim=True)
    gram = W_hat @ W_hat.T  # the F×F matrix, small here
    assert nfm(W) == pytest.approx(float(gram.norm()), rel=1e-5)
    off = gram - 2 * torch.eye(50)  # the diagonal can never be the maximum
    assert nfm_inf(W) == pytest.approx(float(off.max(-1).values.mean()), rel=1e-5)
    assert nfm_inf(W, chunk=7) == pytest.approx(float(off.max(-1).values.mean()), rel=1e-5)
    rows = torch.tensor([3, 10, 49])
    assert nfm_inf(W, rows) == pytest.approx(float(off[rows].max(-1).values.mean()), rel=1e-5)


def test_density_capacities_share_the_budget_as_the_features_were_used():
    density = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])  # sums to 1 (an L0 of 1)
    m = density_capacities(density, k=1, batch_size=40, m_min=1, m_max=0)
    assert m.tolist() == [20, 10, 5, 5, 1]  # floor(share * 40), the unused one raised to 1
    assert density_capacities(density, 1, 40, m_min=0, m_max=8).tolist() == [8, 8, 5, 5, 0]
    assert density_capacities(density * 7, 1, 40, 1, 0).tolist() == m.tolist()  # a share
