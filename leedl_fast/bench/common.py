"""The records a benchmark case module produces."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    """One timed problem: ``ours`` against each callable in ``peers``, same inputs.

    ``ours`` and each peer run one full iteration (forward, or forward and
    backward for ``mode="fwd+bwd"``) on inputs the case module built once.
    ``flops`` (for compute-bound ops) or ``bytes`` (memory-bound: bytes read plus
    written) count one call of ``ours``, so the runner can report TFLOP/s or GB/s
    and the fraction of the ceilings it measured.
    """

    op: str                                   # "softmax", "attention", "banded", "q_sample", ...
    mode: str                                 # "fwd" | "fwd+bwd"
    dtype: torch.dtype
    shape: dict                               # e.g. {"B": 8, "H": 16, "N": 2048, "D": 128}
    ours: Callable[[], Any]
    peers: dict[str, Callable[[], Any]]       # peer name -> callable ("sdpa", "sdpa_flash", "flex", "unfused", ...)
    flops: float | None = None
    bytes: float | None = None
    causal: bool = False
    window: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)  # anything else worth recording (e.g. peak memory of a peer)


@dataclass
class CheckResult:
    """A GPU correctness check of the Triton path against the reference."""

    op: str
    dtype: str                                # "fp16" | "bf16" | "fp32"
    case: str                                 # short description of the shape/options
    max_abs_err: float
    tol: float
    ok: bool
    error: str = ""                           # exception text when the check could not run


@dataclass
class PairedTiming:
    """``ours`` and ``peer`` timed call by call in alternation (see :func:`alternating_ratio`)."""

    ratio: float                              # median of the per-pair ratios ours / peer
    ratios: list[float]
    ours_s: list[float]
    peer_s: list[float]

    def __str__(self) -> str:
        import statistics

        return (f"ours / peer = {self.ratio:.2f} (median of {len(self.ratios)} alternating pairs; ours "
                f"{statistics.median(self.ours_s) * 1e3:.3g} ms, peer {statistics.median(self.peer_s) * 1e3:.3g} ms)")


def alternating_ratio(ours: Callable[[], Any], peer: Callable[[], Any], *, pairs: int = 12,
                      warmup: int = 2) -> PairedTiming:
    """Time ``ours`` and ``peer`` (each one full step, synchronous: CPU) in ``pairs`` adjacent pairs,
    alternating which goes first, after ``warmup`` untimed pairs; the ratio is the median of the per-pair
    ratios.  On a shared machine whose load drifts by tens of percent over seconds, adjacent calls share
    the load, so this compares two implementations far more reliably than two sequential timing runs."""
    import statistics
    import time

    for _ in range(warmup):
        ours(), peer()
    ratios, t_ours, t_peer = [], [], []
    for r in range(pairs):
        times = {}
        for name, fn in (("ours", ours), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("ours", ours)):
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
        ratios.append(times["ours"] / times["peer"])
        t_ours.append(times["ours"])
        t_peer.append(times["peer"])
    return PairedTiming(statistics.median(ratios), ratios, t_ours, t_peer)
