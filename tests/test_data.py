"""leedl_fast.data.frames against explicit slicing."""
import numpy as np
import pytest
import torch

from leedl_fast.data import frames


@pytest.mark.parametrize("sample_rate,t", [(16000, 400), (16000, 16000), (16000, 1237), (8000, 201), (22050, 2000)])
@pytest.mark.parametrize("batched", [False, True])
def test_frames_match_slicing(sample_rate, t, batched):
    win, hop = round(sample_rate * 0.025), round(sample_rate * 0.010)
    signal = torch.randn((3, t) if batched else (t,))
    out = frames(signal, sample_rate)
    n = 1 + (t - win) // hop
    assert out.shape == ((3, n, win) if batched else (n, win))
    for i in range(n):
        assert torch.equal(out[..., i, :], signal[..., i * hop: i * hop + win])


def test_custom_window_and_hop():
    signal = torch.arange(100.0)
    out = frames(signal, 1000, window_ms=7, hop_ms=3)  # 7 samples every 3
    assert out.shape == (1 + (100 - 7) // 3, 7)
    assert torch.equal(out[-1], signal[93:100])


def test_errors():
    with pytest.raises(ValueError, match="shorter than one"):
        frames(torch.randn(399), 16000)
    with pytest.raises(ValueError, match="signal"):
        frames(torch.randn(2, 3, 500), 16000)
    with pytest.raises(ValueError, match="signal"):
        frames([0.0] * 500, 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        frames(torch.randn(500), 0)
    with pytest.raises(ValueError, match="hop_ms"):
        frames(torch.randn(500), 16000, hop_ms=-1)
    with pytest.raises(ValueError, match="hop_ms"):
        frames(torch.randn(500), 100, hop_ms=1)  # 0.1 samples


@pytest.mark.parametrize("name", ["sample_rate", "window_ms", "hop_ms"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), True, "25"])
def test_rates_and_durations_must_be_finite_numbers(name, value):
    kw = {"sample_rate": 16000, "window_ms": 25, "hop_ms": 10, name: value}
    with pytest.raises(ValueError, match=name):
        frames(torch.randn(500), kw.pop("sample_rate"), **kw)


@pytest.mark.parametrize("sample_rate", [np.int64(16000), np.int32(16000), np.float32(16000.0), np.float64(16000.0)])
def test_numpy_numbers_are_numbers(sample_rate):
    """A sample rate read from NumPy metadata frames like the Python number (leedl_fast._checks' rule)."""
    signal = torch.randn(2000)
    assert torch.equal(frames(signal, sample_rate, window_ms=np.int64(25), hop_ms=np.float32(10.0)),
                       frames(signal, 16000, window_ms=25, hop_ms=10))


def test_lengths_beyond_a_float_are_errors_or_one_frame():
    signal = torch.arange(100.0)
    with pytest.raises(ValueError, match="shorter than one"):
        frames(signal, 1e200, window_ms=1e200)  # a window of more samples than a float holds
    with pytest.raises(ValueError, match="sample_rate"):
        frames(signal, 10**400)
    out = frames(signal, 1000, window_ms=7, hop_ms=1e300)  # a hop past the end: the first frame only
    assert out.shape == (1, 7) and torch.equal(out[0], signal[:7])
