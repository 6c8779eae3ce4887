"""One answer to "is this a usable number?" for everything read from JSON or given by a caller."""
import math
import numbers


def is_finite_number(value: object) -> bool:
    """A real number that is finite as a float: not a bool, NaN, an infinity, or an int too big for a float.

    Python's json reads NaN, Infinity and integers of any length, none of which a float
    computation (a calibrator, a normalization, a ``:.2f``) can use; and bool is an int to Python.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of 400 digits
        return False
