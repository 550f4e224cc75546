"""Checks of scalar arguments, shared by every module.

Each raises a ValueError that names the argument, says what it must be and shows what it got,
before any work is done.  Python and NumPy integers count as ints (bools do not); Python and
NumPy floats and ints count as numbers, and numbers must be finite.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["MAX_SEED", "check_int", "check_number", "check_seed"]

MAX_SEED = 2**63 - 1


def _show(v) -> str:
    return "2**63 - 1" if v == MAX_SEED else str(v)


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {_show(lo)}"
    if lo is None:
        return f" {'<' if hi_open else '<='} {_show(hi)}"
    return f" in {'(' if lo_open else '['}{_show(lo)}, {_show(hi)}{')' if hi_open else ']'}"


def _inside(v, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))


def check_int(name: str, value, lo=None, hi=None, *, hi_open: bool = False, optional: bool = False):
    """``value`` as an int in [lo, hi] (``hi_open``: [lo, hi)); a bound of None is no bound.
    With ``optional`` None is allowed and returned."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not _inside(value, lo, hi, False, hi_open):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an int{_bounds(lo, hi, False, hi_open)}, "
                         f"got {value!r}")
    return int(value)


def check_number(name: str, value, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
                 optional: bool = False):
    """``value`` as a finite float within the bounds (each closed unless ``lo_open`` / ``hi_open``).
    With ``optional`` None is allowed and returned."""
    if optional and value is None:
        return None
    try:
        f = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:                                   # an int beyond float's range
        f = math.nan
    if not math.isfinite(f) or not _inside(f, lo, hi, lo_open, hi_open):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a finite number"
                         f"{_bounds(lo, hi, lo_open, hi_open)}, got {value!r}")
    return f


def check_seed(value, name: str = "seed", *, optional: bool = False):
    """A Philox seed: an int in [0, 2**63 - 1] (None too with ``optional``)."""
    return check_int(name, value, 0, MAX_SEED, optional=optional)
