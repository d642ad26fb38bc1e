"""The learning-rate sweep of the comparisons with other libraries (bench/lr_sweep.py)."""

import itertools

import pytest

from choicesae.bench.lr_sweep import LR_FACTORS, default_and_best, lr_cell, lr_factors
from choicesae.errors import ConfigError


def test_the_grid_is_factors_of_two_around_the_default():
    assert len(LR_FACTORS) >= 4 and 1.0 in LR_FACTORS
    assert all(b == 2 * a for a, b in itertools.pairwise(LR_FACTORS))
    assert LR_FACTORS[0] < 1.0 < LR_FACTORS[-1]  # the default is not at the grid's edge
    assert lr_factors(sweep=True) == LR_FACTORS and lr_factors(sweep=False) == (1.0,)


def test_a_grid_is_read_sorted_and_must_hold_the_default():
    assert lr_factors(True, "8, 1,0.25,1") == (0.25, 1.0, 8.0)
    assert lr_factors(False, "8,1") == (1.0,)
    for bad in ("2,4", "0,1", "1,x"):
        with pytest.raises(ConfigError, match="lr grid"):
            lr_factors(True, bad)


def test_a_method_is_shown_at_its_default_and_at_the_argmin_of_its_loss():
    assert default_and_best({1.0: 0.3}) == [("default", 1.0)]
    assert default_and_best({0.5: 0.4, 1.0: 0.3, 2.0: 0.2, 4.0: 0.25}) == [
        ("default", 1.0),
        ("best", 2.0),
    ]
    assert default_and_best({0.5: 0.4, 1.0: 0.1, 2.0: 0.2}) == [("default", 1.0), ("best", 1.0)]


def test_the_lr_cell_names_the_rate_and_its_factor():
    assert lr_cell(2.8e-3 * 4, 4.0) == "1.1e-02 (×4)"
