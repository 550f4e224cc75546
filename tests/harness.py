"""Test helpers: the per-dtype tolerance table, a comparison that explains itself, NaN poisoning, the fuzz
files' example counts."""
from __future__ import annotations

import contextlib
import os

import torch

# (atol, rtol) for a result in this dtype compared with a float64 reference.
# fp32 carries the GPU's TF32 products where a kernel uses tl.dot (10-bit mantissa).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
TF32_TOLERANCE = (2e-3, 2e-3)


def tolerance(dtype: torch.dtype, *, tf32: bool = False, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``; ``scale`` widens both for results that sum many rounded terms
    (say why at the call site)."""
    atol, rtol = TF32_TOLERANCE if (tf32 and dtype == torch.float32) else TOLERANCES[dtype]
    return atol * scale, rtol * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 atol: float | None = None, rtol: float | None = None, name: str = "result", tf32: bool = False,
                 scale: float = 1.0) -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, NaN where and only where expected is NaN.

    The failure message gives the max abs error (and where), the relative RMS
    error and the NaN positions that differ.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    dtype = dtype or actual.dtype
    d_atol, d_rtol = tolerance(dtype, tf32=tf32, scale=scale)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    problems = []
    if not torch.equal(nan_a, nan_e):
        diff = (nan_a != nan_e).nonzero()
        problems.append(f"NaN positions differ at {diff.shape[0]} elements, first {diff[:5].tolist()} "
                        f"(actual NaN: {int(nan_a.sum())}, expected NaN: {int(nan_e.sum())})")
    both = ~(nan_a | nan_e)
    err = torch.where(both, (a - e).abs(), torch.zeros_like(a))
    inf_mismatch = both & (torch.isinf(a) | torch.isinf(e)) & (a != e)
    bound = atol + rtol * e.abs()
    bad = both & ((err > bound) | inf_mismatch)
    if bad.any():
        idx = torch.nonzero(bad)[0].tolist()
        flat = int(torch.argmax(torch.where(bad, err, torch.zeros_like(err))))
        rms = float(torch.sqrt((err[both] ** 2).mean() / ((e[both] ** 2).mean() + 1e-300))) if both.any() else float("nan")
        problems.append(
            f"{int(bad.sum())}/{a.numel()} elements outside atol={atol:g}, rtol={rtol:g}; "
            f"max abs err {float(err.max()):.3e} at flat index {flat} (actual {a.flatten()[flat].item():.6g}, "
            f"expected {e.flatten()[flat].item():.6g}); relative RMS err {rms:.3e}; first bad index {idx}")
    if problems:
        raise AssertionError(f"{name} ({dtype}): " + "; ".join(problems))


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-(2 ** 30) if t.dtype != torch.uint8 else 255)
        return t
    return wrapper


@contextlib.contextmanager
def poison_empty():
    """Within the block, ``torch.empty*`` return NaN-filled tensors (integers: a sentinel),
    so an output element that a kernel fails to write shows up as NaN."""
    saved = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    try:
        for name, fn in saved.items():
            setattr(torch, name, _poisoned(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


# ----------------------------------------------------------------------------- fuzzing (tests/*/test_*_fuzz.py)

# Any LEEDL_FUZZ_EXAMPLES* variable set: hunting for bugs (random examples, many), not CI (a fixed small set).
FUZZ_HUNTING = any(k.startswith("LEEDL_FUZZ_EXAMPLES") and v for k, v in os.environ.items())


def fuzz_count(suffix: str, ci: int, fraction: float = 1) -> int:
    """Examples for one fuzz test: ``LEEDL_FUZZ_EXAMPLES_<suffix>`` when set, else ``LEEDL_FUZZ_EXAMPLES /
    fraction`` when that is set, else ``ci``."""
    own = os.environ.get(f"LEEDL_FUZZ_EXAMPLES_{suffix}")
    if own:
        return max(1, int(own))
    base = os.environ.get("LEEDL_FUZZ_EXAMPLES")
    return max(1, int(int(base) / fraction)) if base else ci


def fuzz_settings(*suppress) -> dict:
    """hypothesis settings shared by the fuzz tests: derandomized unless hunting, no deadline, no example
    database; the health checks ``suppress`` names suppressed besides the function-scoped-fixture and
    too-slow ones."""
    from hypothesis import HealthCheck

    return dict(deadline=None, derandomize=not FUZZ_HUNTING, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       *(getattr(HealthCheck, name) for name in suppress)])
