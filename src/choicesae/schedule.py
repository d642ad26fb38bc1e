"""Pure functions of the step: the learning rate."""

import math


def auto_lr(num_latents: int) -> float:
    """Gao et al.'s width scaling of the learning rate: 2e-4 / sqrt(F / 2^14)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


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
