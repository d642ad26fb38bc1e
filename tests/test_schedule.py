import math

import pytest

from choicesae.schedule import auto_lr, lr_at


def test_warmup_constant_decay():
    lr = [lr_at(s, 100, 1.0, warmup_steps=10, decay_fraction=0.2) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10:80] == [1.0] * 70
    assert lr[90] == pytest.approx(0.5) and lr[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lr[80:], lr[81:], strict=False))


def test_no_warmup_no_decay():
    assert lr_at(0, 10, 3e-4, warmup_steps=0, decay_fraction=0.0) == 3e-4


def test_auto_lr_scales_with_inverse_sqrt_width():
    assert auto_lr(2**14) == pytest.approx(2e-4)
    assert auto_lr(4 * 2**14) == pytest.approx(1e-4)
    assert math.isclose(auto_lr(6144), 2e-4 / math.sqrt(6144 / 16384))
