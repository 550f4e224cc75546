"""Positional encodings against the formula of Vaswani et al. (2017), section 3.5."""
import math

import pytest
import torch

from leedl_fast.nn.positional import LearnedPositionalEncoding, SinusoidalPositionalEncoding, sinusoidal_table
from tests.harness import assert_close, poison_empty


def _formula(max_len, d):
    pe = torch.empty(max_len, d, dtype=torch.float64)
    for pos in range(max_len):
        for c in range(d):
            i2 = c - (c % 2)  # the "2i" of both columns 2i and 2i + 1
            angle = pos / 10000 ** (i2 / d)
            pe[pos, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("max_len,d", [(1, 1), (17, 6), (63, 7), (77, 32)])
def test_table_matches_formula(max_len, d):
    assert_close(sinusoidal_table(max_len, d, dtype=torch.float64), _formula(max_len, d), dtype=torch.float64)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("offset", [0, 5])
def test_sinusoidal_adds_table(batch_first, offset):
    d, n, b = 10, 9, 3
    enc = SinusoidalPositionalEncoding(d, max_len=20, batch_first=batch_first)
    x = torch.randn((b, n, d) if batch_first else (n, b, d))
    pe = _formula(20, d)[offset: offset + n]
    expected = x.double() + (pe[None] if batch_first else pe[:, None])
    assert_close(enc(x, offset=offset), expected, dtype=torch.float32)
    # unbatched (seq, d_model) input
    assert_close(enc(x[0] if batch_first else x[:, 0], offset=offset), expected[0] if batch_first else expected[:, 0],
                 dtype=torch.float32)
    assert enc(x.half()).dtype == torch.float16
    assert len(enc.state_dict()) == 0  # the table is rebuilt from the formula, never stored


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.half(),
                                     lambda m: m.double().float()], ids=["double", "to", "half", "double-float"])
def test_dtype_change_rebuilds_the_table(convert):
    """The converted module's table is the one built in the new dtype (the float64 formula rounded once), not
    the float32 table cast; it stays out of the state_dict."""
    enc = convert(SinusoidalPositionalEncoding(8, max_len=300))
    dtype = enc.pe.dtype
    assert torch.equal(enc.pe, SinusoidalPositionalEncoding(8, max_len=300, dtype=dtype).pe)
    assert_close(enc(torch.zeros(300, 1, 8, dtype=dtype))[:, 0], _formula(300, 8), dtype=dtype)
    assert len(enc.state_dict()) == 0
    enc.load_state_dict({}, strict=True)


def test_to_empty_fills_the_table():
    enc = SinusoidalPositionalEncoding(8, max_len=30, device="meta").to_empty(device="cpu")
    assert torch.equal(enc.pe, sinusoidal_table(30, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_empty_on_the_same_device_fills_the_table(dtype):
    """to_empty() onto the device the table is already on replaces it by uninitialised memory too; the table is
    rebuilt from the formula then as well."""
    enc = SinusoidalPositionalEncoding(8, max_len=3000, dtype=dtype)
    with poison_empty():                                # uninitialised memory shows as NaN
        enc.to_empty(device="cpu")
    assert_close(enc.pe, _formula(3000, 8), dtype=dtype)
    assert_close(enc(torch.zeros(3000, 1, 8, dtype=dtype))[:, 0], _formula(3000, 8), dtype=dtype)


def test_dropout():
    enc = SinusoidalPositionalEncoding(8, dropout=0.5)
    x = torch.randn(50, 4, 8)
    y = enc(x)
    ref = x + sinusoidal_table(50, 8)[:, None]
    kept = y != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert_close(y[kept], 2 * ref[kept], dtype=torch.float32)
    enc.eval()
    assert_close(enc(x), ref, dtype=torch.float32)


def test_learned():
    enc = LearnedPositionalEncoding(6, max_len=12, batch_first=True)
    assert list(enc.state_dict()) == ["weight"] and enc.weight.shape == (12, 6)
    x = torch.randn(2, 5, 6, requires_grad=True)
    y = enc(x, offset=3)
    assert_close(y, x + enc.weight[3:8], dtype=torch.float32)
    y.sum().backward()
    g = torch.zeros(12, 6)
    g[3:8] = 2.0  # two sequences
    assert torch.equal(enc.weight.grad, g)


def test_errors():
    with pytest.raises(ValueError, match="d_model"):
        SinusoidalPositionalEncoding(0)
    with pytest.raises(ValueError, match="max_len"):
        LearnedPositionalEncoding(4, max_len=0)
    with pytest.raises(ValueError, match="dropout"):
        SinusoidalPositionalEncoding(4, dropout=2.0)
    enc = SinusoidalPositionalEncoding(4, max_len=10)
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.zeros(8, 1, 4), offset=3)
    with pytest.raises(ValueError, match="offset"):
        enc(torch.zeros(8, 1, 4), offset=-1)
    with pytest.raises(ValueError, match="x must be"):
        enc(torch.zeros(8, 1, 5))
    with pytest.raises(ValueError, match="floating"):
        enc(torch.zeros(8, 1, 4, dtype=torch.long))
    for bad in (-1, 4.5, True):
        with pytest.raises(ValueError, match="max_len"):
            sinusoidal_table(bad, 4)
        with pytest.raises(ValueError, match="d_model"):
            sinusoidal_table(4, bad)
