"""How the budget of token-feature matches is spread over features (paper sections 3.2, 4.2-4.4,
appendix G): feature densities and their ranks, the Zipf fit, dead and dying features, and the
capacities of Zipf Feature Choice (Algorithm 1).

Ranks are 1-based as in Definition 3.1 and Algorithm 1: rank 1 is the most prevalent feature.
Ties in density are broken by feature index, so ranks are deterministic.
"""

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

DYING_QUANTILE = 0.75  # Definition 3.1, condition 1: the bottom quartile by prevalence
DYING_RATIO = 0.6  # Definition 3.1, condition 2: under 60% of the Zipf expectation
BUDGET_SLACK = 0.25  # capacities further than this share from k·B no longer keep L0 near k


class Densities(NamedTuple):
    """Feature firing counts over a window of tokens, kept during training."""

    counts: Tensor  # [F] firings in the current (incomplete) window
    tokens: int  # tokens seen in the current window
    density: Tensor  # [F] firing rate over the last complete window; NaN before the first

    @classmethod
    def empty(cls, num_latents: int, device: str | torch.device = "cpu") -> "Densities":
        counts = torch.zeros(num_latents, dtype=torch.long, device=device)
        return cls(counts, 0, torch.full((num_latents,), math.nan, device=device))

    @property
    def ready(self) -> bool:
        return not bool(self.density.isnan().any())


def update_densities(state: Densities, fired_counts: Tensor, tokens: int, window: int) -> Densities:
    """Add one batch (fired_counts [F]: tokens each feature fired on); close the window when it
    holds `window` tokens, making its rates the current densities."""
    counts, seen = state.counts + fired_counts, state.tokens + tokens
    if seen < window:
        return Densities(counts, seen, state.density)
    return Densities(torch.zeros_like(counts), 0, counts.double().div(seen).to(state.density))


def rank_order(density: Tensor) -> Tensor:
    """[F] feature ids from most to least prevalent (ties: lower index first)."""
    return torch.sort(-density, stable=True).indices


def feature_ranks(density: Tensor) -> Tensor:
    """[F] the 1-based prevalence rank of every feature (inverse of `rank_order`)."""
    order = rank_order(density)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1, device=order.device)
    return ranks


class ZipfFit(NamedTuple):
    """density(rank) = exp(log_c) / (rank + beta)^alpha; r2 measured on log density."""

    alpha: float
    beta: float
    log_c: float
    r2: float

    def expected(self, rank: Tensor) -> Tensor:
        return torch.exp(self.log_c - self.alpha * torch.log(rank.double() + self.beta))


def fit_zipf(
    sorted_density: Tensor, alpha: float | None = None, segment: tuple[int, int] | None = None
) -> ZipfFit:
    """Least-squares fit of log density = log C − α·log(rank + β) to densities sorted from most
    to least prevalent, over ranks `segment` = (first, last) (default all). Features that never
    fired (density 0) have no logarithm and are left out. `alpha` fixes the exponent (the paper
    fixes α = 1); otherwise it is fitted too. β ≥ 0 is found by a log-spaced grid search refined
    by golden-section search; for each β the rest is linear regression (closed form)."""
    rank = torch.arange(1, len(sorted_density) + 1, dtype=torch.float64)
    y = sorted_density.double().cpu()
    first, last = segment or (1, len(y))
    keep = (rank >= first) & (rank <= last) & (y > 0)
    if keep.sum() < 3:
        return ZipfFit(math.nan, math.nan, math.nan, math.nan)
    r, y = rank[keep], y[keep].log()

    def solve(beta: float) -> tuple[float, float, float]:  # (sse, alpha, log_c)
        u = torch.log(r + beta)
        a = (
            alpha
            if alpha is not None
            else float(-((u - u.mean()) * (y - y.mean())).sum() / (u - u.mean()).pow(2).sum())
        )
        log_c = float((y + a * u).mean())
        return float((y - log_c + a * u).pow(2).sum()), a, log_c

    grid = [0.0, *torch.logspace(-3, math.log10(10 * len(rank)), 96).tolist()]
    sse = [solve(b)[0] for b in grid]
    best = min(range(len(grid)), key=sse.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    for _ in range(60):  # golden-section search inside the best grid bracket
        m1, m2 = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, m2) if solve(m1)[0] < solve(m2)[0] else (m1, hi)
    beta = min((lo + hi) / 2, grid[best], key=lambda b: solve(b)[0])
    err, a, log_c = solve(beta)
    total = float((y - y.mean()).pow(2).sum())
    return ZipfFit(a, beta, log_c, 1 - err / total if total > 0 else math.nan)


def middle_segment(num_latents: int) -> tuple[int, int]:
    """Ranks used for the 'middle' fit, as figure 3 fits features 100-20,000 of 32k: from the
    top 1% to 60% of the ranks, leaving out the head and the under-used tail."""
    return max(1, num_latents // 100), max(3, int(0.6 * num_latents))


class BudgetExpectation(NamedTuple):
    """Appendix G's expected density by rank: Algorithm 1's capacity m_i at (α, β) for the
    budget k·B (floored as written), over B. The fit gives the shape, the budget the level."""

    alpha: float
    beta: float
    k: int
    batch_size: int

    def expected(self, rank: Tensor) -> Tensor:  # rank [F], a permutation of 1..F
        B = self.batch_size
        m = zipf_capacities(self.k, len(rank), B, self.alpha, self.beta, B)  # [F] by rank
        return m.double().to(rank.device)[rank - 1] / B


def dying_features(density: Tensor, fit: ZipfFit | BudgetExpectation) -> Tensor:
    """[F] bool: Definition 3.1. Feature of rank i is dying iff (1) i > 3F/4, (2) its density is
    below 0.6 × the expectation at rank i (`fit.expected`: a fitted Zipf, or appendix G's),
    and (3) every feature ranked below it is dying too — so the dying features are the longest
    run of ranks ending at F where (1) and (2) hold. Dead features (density 0) qualify like any
    other."""
    F = len(density)
    order = rank_order(density)
    rank = torch.arange(1, F + 1, device=density.device)
    expected = fit.expected(rank).to(density.device)
    candidate = (rank > DYING_QUANTILE * F) & (density[order].double() < DYING_RATIO * expected)
    suffix = candidate.flip(0).cumprod(0).flip(0).bool()  # condition 3
    dying = torch.zeros(F, dtype=torch.bool, device=density.device)
    dying[order] = suffix
    return dying


def zipf_capacities(
    k: int, num_latents: int, batch_size: int, alpha: float, beta: float, m_max: int
) -> Tensor:
    """Algorithm 1: [F] capacities m by rank (entry i-1 for rank i), in float64 as written:
    N = B·k / Σ_i (i + β)^-α;  m_i = min(⌊N / (i + β)^α⌋, m_max)."""
    i = torch.arange(1, num_latents + 1, dtype=torch.float64)
    zipf = (i + beta).pow(-alpha)
    n_approx = batch_size * k / zipf.sum()
    return torch.clamp(torch.floor(n_approx * zipf), max=m_max).long()


def density_capacities(density: Tensor, k: int, batch_size: int, m_min: int, m_max: int) -> Tensor:
    """[F] capacities in proportion to each feature's measured density (the last closed
    window: at a switch to Feature Choice, the phase before's), so the budget k·B is shared as
    the features were used rather than by a fitted law; floored as Algorithm 1 floors, raised to
    m_min (at most F matches past the budget) and capped at m_max (0 means the batch size)."""
    share = density.double() / density.sum().clamp_min(1e-12)
    m = torch.floor(share * k * batch_size).clamp(min=m_min, max=m_max or batch_size)
    return m.long()


def feature_capacities(
    ranks: Tensor, k: int, batch_size: int, alpha: float, beta: float, m_min: int, m_max: int
) -> Tensor:
    """[F] the Zipf Feature Choice capacity of every feature: Algorithm 1 at its rank, raised
    to at least m_min. Algorithm 1's floor gives 0 to the lowest ranks whenever B·k/Σ < (F+β)^α;
    a feature with capacity 0 can never fire, so never climbs in rank, and would be dead by
    construction, so we keep m_min = 1 by default (0 gives Algorithm 1 unchanged); this adds
    at most one match per such feature to the budget. m_max = 0 means the batch size."""
    by_rank = zipf_capacities(k, len(ranks), batch_size, alpha, beta, m_max or batch_size)
    return by_rank.clamp(min=m_min).to(ranks.device)[ranks - 1]


def warn_if_degenerate(m: Tensor, k: int, batch_size: int) -> None:
    """Feature Choice over a batch too small for its budget (k·B < F: every share rounds down
    to 0 and is raised to m_min, so each feature takes its best token) or with capacities m [F]
    that sum far from k·B: the batch's codes then say little about L0 = k. Warned once per
    setting (Python's warning registry keys on the message)."""
    F, budget, total = len(m), k * batch_size, int(m.sum())
    if budget >= F and abs(total - budget) <= BUDGET_SLACK * budget:
        return
    warnings.warn(
        f"Feature Choice over a batch of {batch_size} tokens: k*B = {budget} for {F} features, "
        f"capacities summing to {total}, so the codes hold about {total / batch_size:.3g} "
        f"features per token, not k = {k}; encode tokens on their own (batch=False, the "
        "default) or select within batches of the training size",
        stacklevel=4,
    )
