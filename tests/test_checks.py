"""The shared scalar-argument checks (leedl_fast/_checks.py) and the modules that use them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leedl_fast._checks import MAX_SEED, check_int, check_number, check_seed


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)], ids=repr)
def test_int_accepts_python_and_numpy_integers(value):
    got = check_int("n", value, 1, 5)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value", [True, 3.0, "3", None, np.float64(3.0), torch.tensor(3)], ids=repr)
def test_int_refuses_everything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^n_blocks must be an int >= 0, got "):
        check_int("n_blocks", value, 0)


@pytest.mark.parametrize("lo, hi, hi_open, bad, text", [
    (1, None, False, 0, "an int >= 1"),
    (None, 4, False, 5, "an int <= 4"),
    (0, 4, True, 4, "an int in [0, 4)"),
    (-1, 7, False, -2, "an int in [-1, 7]"),
])
def test_int_bounds_are_enforced_and_stated(lo, hi, hi_open, bad, text):
    for ok in range(-3, 9):
        inside = (lo is None or ok >= lo) and (hi is None or (ok < hi if hi_open else ok <= hi))
        if inside:
            assert check_int("k", ok, lo, hi, hi_open=hi_open) == ok
    with pytest.raises(ValueError, match=f"k must be {text.replace('[', '.').replace(')', '.')}, got {bad}"):
        check_int("k", bad, lo, hi, hi_open=hi_open)


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.float64(0.5), 1, np.int64(1)], ids=repr)
def test_number_accepts_python_and_numpy_reals(value):
    got = check_number("eta", value, 0, 1)
    assert got == float(value) and type(got) is float


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), True, "0.5", None,
                                   torch.tensor(0.5), 10**400, -0.5, 0],
                         ids=["nan", "inf", "-inf", "np_nan", "True", "str", "None", "tensor", "10**400", "neg", "zero"])
def test_number_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got "):
        check_number("lr", value, 0, lo_open=True)


def test_number_open_and_closed_bounds():
    assert check_number("p", 0, 0, 1, hi_open=True) == 0.0
    with pytest.raises(ValueError, match=r"p must be a finite number in \[0, 1\), got 1"):
        check_number("p", 1, 0, 1, hi_open=True)
    with pytest.raises(ValueError, match=r"c must be a finite number in \(0, 1\], got 0"):
        check_number("c", 0, 0, 1, lo_open=True)
    assert check_number("c", 1, 0, 1, lo_open=True) == 1.0


def test_optional_and_seed():
    assert check_int("k", None, optional=True) is None and check_number("s", None, optional=True) is None
    with pytest.raises(ValueError, match=r"k must be None or an int >= 2"):
        check_int("k", 1, 2, optional=True)
    assert check_seed(MAX_SEED) == MAX_SEED and check_seed(np.uint64(7)) == 7 and check_seed(None, optional=True) is None
    for bad in (-1, MAX_SEED + 1, None, 1.0):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\]"):
            check_seed(bad)


def test_modules_take_numpy_scalars_as_python_ones():
    """A seed or probability read from a NumPy array (a config, a sweep) works where a Python one does."""
    from leedl_fast import ops
    from leedl_fast.diffusion import NoiseSchedule
    from leedl_fast.gan import ImagePool

    q, k, v = (torch.randn(2, 2, 9, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = ops.attention(q, k, v, dropout_p=0.25, seed=11, window=(3, 2))
    got = ops.attention(q, k, v, dropout_p=np.float32(0.25), seed=np.int64(11), window=(np.int64(3), np.int32(2)))
    assert torch.equal(got, want)
    assert torch.equal(NoiseSchedule(np.int64(50)).alphas_cumprod, NoiseSchedule(50).alphas_cumprod)
    assert ImagePool(np.int64(4), seed=np.int64(1)).pool_size == 4
