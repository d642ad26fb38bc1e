"""The learning-rate sweep of the comparisons with other libraries (benchmarks/peers.py,
`choicesae bench synthsaebench --lr-sweep`): every method, peers included, trains at the same
factors of its own library's default learning rate, and its table gives two rows, one at the
default and one at its best factor."""

from collections.abc import Mapping

from choicesae.errors import ConfigError

LR_FACTORS = (0.5, 1.0, 2.0, 4.0)  # x each library's default; 1.0 is the default itself


def lr_factors(sweep: bool, grid: str = "") -> tuple[float, ...]:
    """The factors of each library's default learning rate a comparison trains at: the sweep's
    grid (`grid`, comma-separated factors; empty: LR_FACTORS), or the default alone."""
    if not sweep:
        return (1.0,)
    if not grid:
        return LR_FACTORS
    try:
        factors = tuple(sorted({float(f) for f in grid.split(",") if f.strip()}))
    except ValueError:
        raise ConfigError(f"the lr grid takes comma-separated numbers, got {grid!r}") from None
    if 1.0 not in factors or factors[0] <= 0:
        raise ConfigError(f"the lr grid's factors must be positive and hold 1, got {grid!r}")
    return factors


def default_and_best(loss: Mapping[float, float]) -> list[tuple[str, float]]:
    """A method's rows in a table, as (label, factor): the default, and with a sweep the factor
    of the lowest `loss` (factor -> a score where lower is better: FVU, or -MCC), even when it
    is the default (a reader then sees the default was best)."""
    if len(loss) == 1:
        return [("default", 1.0)]
    return [("default", 1.0), ("best", min(loss, key=loss.__getitem__))]


def lr_cell(lr: float, factor: float) -> str:
    """The learning rate a row trained at, and its factor of the library's default."""
    return f"{lr:.1e} (×{factor:g})"
