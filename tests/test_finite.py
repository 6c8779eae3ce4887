import fractions

import numpy as np
import pytest

from captioner.finite import is_finite_number


@pytest.mark.parametrize("value", [0, -3, 2.5, 1e308, np.float32(0.25), np.int64(7), fractions.Fraction(1, 3)])
def test_real_finite_numbers_are_numbers(value):
    assert is_finite_number(value)


@pytest.mark.parametrize("value", [True, False, float("nan"), float("inf"), -float("inf"), np.float64("nan"),
                                   int("9" * 400), "1", None, [1.0], 1j])
def test_what_a_float_computation_cannot_use_is_not(value):
    assert not is_finite_number(value)
