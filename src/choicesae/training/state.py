"""What the training loop carries from step to step besides the model and optimiser: the
tokens since each latent fired (dead latents), the density window, the dying features of
Definition 3.1, and the Zipf fit (section 3.2); at a switch to Feature Choice, the fit of the
phase before (section 4.4)."""

import dataclasses
import math
import warnings

import torch
from torch import Tensor

from choicesae.core.allocation import (
    BudgetExpectation,
    Densities,
    dying_features,
    feature_ranks,
    fit_zipf,
    middle_segment,
    rank_order,
    update_densities,
)
from choicesae.core.config import TrainConfig
from choicesae.core.sae import SAE
from choicesae.errors import ConfigError
from choicesae.step.objective import Masks


@dataclasses.dataclass
class TrainState:
    """What the loop carries from step to step besides the model and optimiser."""

    step: int
    since_fired: Tensor  # [F] tokens since each latent last fired
    densities: Densities  # firing counts of the current window
    dying: Tensor  # [F] bool, Definition 3.1 at the last closed window
    fit: dict  # Zipf fit and counts of the last closed window, for the log
    skipped: int = 0  # non-finite batches skipped

    @classmethod
    def fresh(cls, num_latents: int, device: str) -> "TrainState":
        return cls(
            0,
            torch.zeros(num_latents, dtype=torch.long, device=device),
            Densities.empty(num_latents, device),
            torch.zeros(num_latents, dtype=torch.bool, device=device),
            {},
        )

    def masks(self, dead_tokens: int) -> Masks:
        dead = self.since_fired >= dead_tokens
        return Masks(dead, self.dying & ~dead)


def advance(state: TrainState, fired: Tensor, cfg: TrainConfig, sae: SAE) -> TrainState:
    """Count this batch's firings (fired [F]); at the end of a density window refresh the
    allocation."""
    B = cfg.batch_size
    since_fired = torch.where(fired > 0, 0, state.since_fired + B)
    densities = update_densities(state.densities, fired, B, cfg.density_tokens)
    state = dataclasses.replace(
        state, step=state.step + 1, since_fired=since_fired, densities=densities
    )
    if densities.tokens == 0:  # a window just closed
        state.dying, state.fit = refresh_allocation_(sae, densities.density, cfg)
    return state


@torch.no_grad()
def refresh_allocation_(sae: SAE, density: Tensor, cfg: TrainConfig) -> tuple[Tensor, dict]:
    """Store the window's densities and ranks in the SAE (Zipf Feature Choice reads the ranks),
    fit Zipf over all ranks and over the middle segment (figure 3), and find the dying
    features (Definition 3.1) against the middle fit (fitting the under-used tail we are testing
    would drag the expectation down towards it), or against appendix G's budget expectation
    at the middle fit's (α, β) (--dying-expectation budget)."""
    sae.density.copy_(density)
    sae.feature_rank.copy_(feature_ranks(density))
    sorted_density = density[rank_order(density)]
    alpha = None if cfg.fit_alpha else float(sae.zipf[0])
    full = fit_zipf(sorted_density, alpha)
    middle = fit_zipf(sorted_density, alpha, middle_segment(len(density)))
    expectation = middle
    if cfg.dying_expectation == "budget":  # appendix G
        expectation = BudgetExpectation(middle.alpha, middle.beta, cfg.sae.k, cfg.batch_size)
    dying = dying_features(density, expectation)
    fit = {
        "zipf_alpha": middle.alpha,
        "zipf_beta": middle.beta,
        "zipf_r2": full.r2,
        "zipf_r2_middle": middle.r2,
        "dying": int(dying.sum()),
    }
    return dying, fit


@torch.no_grad()
def adopt_zipf_fit_(sae: SAE, state: TrainState, cfg: TrainConfig) -> None:
    """Section 4.4: Feature Choice fine-tuning uses the Zipf fitted to the previous phase's
    densities (the last closed window, or the current one if none has closed)."""
    density = sae.density
    if density.isnan().any():
        if state.densities.tokens == 0:
            raise ConfigError("the phase before feature_choice saw no tokens to fit Zipf on")
        density = state.densities.counts.double() / state.densities.tokens
        sae.density.copy_(density)  # what density capacities read
        sae.feature_rank.copy_(feature_ranks(density))
    sorted_density = density[rank_order(density)]
    alpha = None if cfg.fit_alpha else float(sae.zipf[0])
    fit = fit_zipf(sorted_density, alpha, middle_segment(len(density)))
    if math.isfinite(fit.beta):
        sae.zipf.copy_(torch.tensor([fit.alpha, fit.beta]))


def warn_if_short(sae: SAE, batch_size: int) -> None:
    """Floored capacities (⌊k·B/F⌋, Algorithm 1's floor, density shares) can sum to less than
    the budget M = k·B, and Feature Choice then selects fewer matches than M: the mean L0 falls
    below k. Say so when a Feature Choice phase starts, with the capacities it starts with."""
    k, kind = sae.cfg.k, sae.cfg.capacities
    total, budget = int(sae.capacities(batch_size, k).sum()), k * batch_size
    if total < budget:
        warnings.warn(
            f"{kind} Feature Choice capacities sum to {total} < k*batch_size = {budget}: the "
            f"mean L0 will be at most {total / batch_size:.3g}, not k = {k}",
            stacklevel=2,
        )
