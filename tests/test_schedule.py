import math

import pytest

from choicesae.core.schedule import RECIPES, Recipe, lr_at, recipe_lr


def test_warmup_constant_decay():
    lr = [lr_at(s, 100, 1.0, warmup_steps=10, decay_fraction=0.2) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10:80] == [1.0] * 70
    assert lr[90] == pytest.approx(0.5) and lr[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lr[80:], lr[81:], strict=False))


def test_no_warmup_no_decay():
    assert lr_at(0, 10, 3e-4, warmup_steps=0, decay_fraction=0.0) == 3e-4


def test_recipe_lr_scales_with_inverse_sqrt_width():
    paper = RECIPES["paper"]
    assert recipe_lr(paper, 2**14) == pytest.approx(2e-4)
    assert recipe_lr(paper, 4 * 2**14) == pytest.approx(1e-4)
    assert math.isclose(recipe_lr(paper, 6144), 2e-4 / math.sqrt(6144 / 16384))


def test_recipes_are_pinned():
    """The defaults users get: changing one is a decision to measure (benchmarks/recipe.py,
    docs/training.md), not a drift."""
    assert RECIPES["fast"] == Recipe("schedule_free", 2e-3, 50, 0.0)
    assert RECIPES["paper"] == Recipe("adamw", 2e-4, 100, 0.2)  # the paper's section 5
