"""Turning raw signals into the vector sequences a Transformer takes."""
from __future__ import annotations

import math

import torch

from ._checks import check_number

__all__ = ["frames"]


def _samples(rate: float, ms: float) -> float:
    """``rate * ms / 1000`` samples, rounded; a length too large for a float is infinite (longer than any
    signal) instead of an OverflowError."""
    n = rate * ms / 1000.0
    return round(n) if math.isfinite(n) else math.inf


def frames(signal: torch.Tensor, sample_rate: float, window_ms: float = 25, hop_ms: float = 10) -> torch.Tensor:
    """Cut a waveform into overlapping frames: the vector sequence a speech model takes.

    ``signal`` is (T,) or (batch, T).  A frame is ``win = round(sample_rate * window_ms / 1000)``
    samples long and a new one starts every ``hop = round(sample_rate * hop_ms / 1000)`` samples
    (25 ms every 10 ms by default: 400 and 160 samples at 16 kHz).  Returns a view of shape
    ``(..., 1 + (T - win) // hop, win)``; trailing samples that do not fill a frame are dropped.
    Frame ``t`` is ``signal[..., t * hop : t * hop + win]``.

    Raises ValueError for a signal that is not a 1-D or 2-D tensor, non-positive rates or
    durations, a window or hop shorter than one sample, and a signal shorter than one window.
    """
    if not isinstance(signal, torch.Tensor):
        raise ValueError(f"signal must be a torch.Tensor, got {type(signal).__name__}")
    if signal.dim() not in (1, 2):
        raise ValueError(f"signal must be (T,) or (batch, T), got shape {tuple(signal.shape)}")
    sample_rate = check_number("sample_rate", sample_rate, 0, lo_open=True)
    window_ms = check_number("window_ms", window_ms, 0, lo_open=True)
    hop_ms = check_number("hop_ms", hop_ms, 0, lo_open=True)
    win = _samples(sample_rate, window_ms)
    hop = _samples(sample_rate, hop_ms)
    if win < 1:
        raise ValueError(f"window_ms={window_ms} is shorter than one sample at sample_rate={sample_rate:g}")
    if hop < 1:
        raise ValueError(f"hop_ms={hop_ms} is shorter than one sample at sample_rate={sample_rate:g}")
    t = signal.shape[-1]
    if t < win:
        raise ValueError(f"signal has {t} samples, shorter than one {window_ms:g} ms window ({win:g} samples)")
    return signal.unfold(-1, win, min(hop, t))
