"""Which path an op runs: its Triton kernel or its pure-PyTorch fallback.

This module is the one place that decides.  The rules, in order:

1. ``LEEDL_FAST_BACKEND=torch`` forces the PyTorch path everywhere.
2. ``LEEDL_FAST_BACKEND=triton`` forces the Triton path.  Triton must import,
   and tensors on a non-CUDA device additionally need ``TRITON_INTERPRET=1``
   (set before Triton is first imported): Triton's interpreter then runs the
   kernel on the CPU through numpy.  Anything else is a ``RuntimeError`` that
   says what to set.
3. Otherwise (unset or ``auto``): the Triton path for CUDA tensors when Triton
   imports, and for CPU tensors when ``TRITON_INTERPRET=1``; the PyTorch path
   for everything else.

The variable is read at each call, so a test may switch paths between two
calls.  Nothing here runs at import time: Triton is imported, and devices are
looked at, only when an op asks.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["ENV_VAR", "Decision", "check_env", "decide", "select", "triton_available", "interpreting"]

ENV_VAR = "LEEDL_FAST_BACKEND"
_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Decision:
    path: str  # "triton" or "torch"
    reason: str


@functools.lru_cache(maxsize=None)
def _triton_import() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton does not import ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def triton_available() -> bool:
    """True when ``import triton`` succeeds (cached after the first call)."""
    return _triton_import()[0]


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return _interpreting(os.environ.get("TRITON_INTERPRET"))


def _interpreting(raw: str | None) -> bool:
    return (raw or "0").strip().lower() in ("1", "true", "yes", "on")


def _requested(raw: str | None) -> str:
    value = (raw or "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise RuntimeError(f"{ENV_VAR} must be one of {', '.join(_CHOICES)}; got {value!r}")
    return value


def check_env() -> str:
    """The requested backend, ``auto``, ``triton`` or ``torch``; RuntimeError naming the variable when it holds
    anything else (what every op would raise at its first call)."""
    return _requested(os.environ.get(ENV_VAR))


def decide(device: torch.device | str) -> Decision:
    """The path an op would take for tensors on ``device``, and why.

    Never raises for a forced but impossible Triton path: the reason says what
    is missing (``select`` raises).  Used by ``leedl-fast info``.
    """
    return _decide(*_key(torch.device(device).type))


def _key(device_type: str) -> tuple:
    """What a decision depends on; Triton is imported only when the variable does not force the torch path."""
    requested_raw = os.environ.get(ENV_VAR)
    forced_torch = requested_raw is not None and requested_raw.strip().lower() == "torch"
    return (device_type, requested_raw, os.environ.get("TRITON_INTERPRET"),
            None if forced_torch else _triton_import())


@functools.lru_cache(maxsize=64)
def _decide(device_type: str, requested_raw: str | None, interpret_raw: str | None,
            triton: tuple[bool, str] | None) -> Decision:
    """``decide`` as a function of everything it depends on (the device type, the two variables' raw values,
    Triton's import), cached: an op's call costs two environment reads and a look-up, not the reasoning."""
    requested = _requested(requested_raw)
    if requested == "torch":
        return Decision("torch", f"{ENV_VAR}=torch")
    ok, why = triton
    if device_type == "cuda":
        if ok:
            return Decision("triton", f"CUDA tensor and {why}" + (f" ({ENV_VAR}=triton)" if requested == "triton" else ""))
        return Decision("torch" if requested == "auto" else "unavailable", why)
    if _interpreting(interpret_raw) and ok:
        return Decision("triton", f"{device_type} tensor and TRITON_INTERPRET=1: Triton's interpreter (slow; for tests)")
    if requested == "triton":
        missing = why if not ok else f"{device_type} tensors need TRITON_INTERPRET=1 set before triton is imported"
        return Decision("unavailable", f"{ENV_VAR}=triton but {missing}")
    return Decision("torch", f"{device_type} tensor: Triton kernels run on CUDA only (set TRITON_INTERPRET=1 to interpret them)")


def select(op: str, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op called on ``tensors``.

    The device is the first tensor's; ops check beforehand that all their
    tensors share it.  Raises ``RuntimeError`` when Triton is forced but
    cannot run, naming the op and the missing piece.
    """
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    decision = _decide(*_key(device.type if device is not None else "cpu"))
    if decision.path == "unavailable":
        raise RuntimeError(f"leedl_fast.ops.{op}: {decision.reason}")
    return decision.path
