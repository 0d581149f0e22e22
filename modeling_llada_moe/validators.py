"""The checks every settings surface shares (model config, generation config; the app layer reuses them): what
counts as an integer, a number, a finite number. A bool is never a count, a size or a token id."""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """An integer and not a bool (`True` is an `int` to Python, not a size or a token id)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number (ints included, as JSON writes `1` for 1.0) and not a bool; finiteness is `is_finite`'s."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number that is neither infinite nor NaN."""
    return is_number(value) and math.isfinite(value)
