"""Pure functions of the step: the training recipe, the learning rate and the phase."""

import math
from typing import NamedTuple


class Recipe(NamedTuple):
    """How an SAE is optimised, where TrainConfig leaves a setting to the recipe."""

    optimizer: str  # "schedule_free" (AdamW, Defazio et al. 2024) or "adamw"
    lr_2_14: float  # peak learning rate at F = 2^14 latents, scaled by 1/sqrt(F / 2^14)
    warmup_steps: int
    decay_fraction: float  # linear decay to 0 over this last fraction of the steps


RECIPES = {
    # the default, chosen by benchmarks/recipe.py (docs/training.md): no decay, so the lr does
    # not depend on the run's length and a finished run can be extended exactly
    "fast": Recipe("schedule_free", 2e-3, 50, 0.0),
    # the paper's section 5: AdamW at Gao et al.'s lr, warm-up, linear decay over the last 20%
    "paper": Recipe("adamw", 2e-4, 100, 0.2),
}


def recipe_lr(recipe: Recipe, num_latents: int) -> float:
    """Gao et al.'s width scaling of the learning rate: lr_2_14 / sqrt(F / 2^14)."""
    return recipe.lr_2_14 / math.sqrt(num_latents / 2**14)


def lr_at(step: int, steps: int, peak: float, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last
    `decay_fraction` of the run. `step` counts from 0."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    decay_steps = decay_fraction * steps
    decay = min(1.0, (steps - step) / decay_steps) if decay_steps else 1.0
    return peak * warm * decay


def phase_at(step: int, phases: list[tuple[str, int]]) -> tuple[int, str, int]:
    """(index, sparsifier, first step) of the phase that `step` falls in (section 4.4's phased
    training: e.g. Mutual Choice, then Feature Choice). Steps past the end stay in the last."""
    start = 0
    for index, (name, steps) in enumerate(phases):
        if step < start + steps or index == len(phases) - 1:
            return index, name, start
        start += steps
    raise ValueError("no phases")
