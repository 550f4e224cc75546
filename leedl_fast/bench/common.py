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
