"""Fused attention (issue 3) and banded attention (issue 4) against their peers.

GPU (``bench/gpu_suite.py``), bf16:

* dense / causal: B*N = 16k tokens, H*D = 2048, D in {64, 128}, N in {1k .. 16k}; peers
  ``sdpa`` (default backend), ``sdpa_flash`` (flash backend forced with
  ``torch.nn.attention.sdpa_kernel``) and ``flash_attn`` when it imports.  FLOPs
  4*B*H*N^2*D, halved for causal; forward+backward counted as 3.5x the forward
  (the backward is 2.5x).
* banded: D in {64, 128}, N in {4k, 16k, 64k}, windows (256, 256) and causal (512, 0),
  H*D = 2048, B*N = 64k tokens; peers ``flex`` (FlexAttention compiled, with the
  equivalent sliding-window block mask), ``sdpa_dense`` (dense SDPA, causal where the
  window is causal) and ``flash_attn`` with ``window_size`` when it imports.  FLOPs
  counted over the band only: 4*B*H*D per visible (query, key) pair.
* attention_dropout: dropout 0.1, N = 4k, B*N = 16k, H*D = 2048, D in {64, 128}, forward and
  forward+backward; peers ``sdpa``, ``sdpa_flash`` and ``flash_attn`` with the same dropout (their
  own RNG: FlashAttention-2 makes sixteen 8-bit decisions per Philox call, ours eight 16-bit ones).

The runner records each callable's CUDA peak memory (``ours_peak_mb`` /
``peer_peak_mb``); ``extra`` adds the visible pairs and the bytes an N x N boolean
mask would take.  On the CPU, ``cases("cpu", quick)`` times the torch path against
SDPA on small problems (seconds).

CPU peak memory (``python -m leedl_fast.bench.cases.attention mem ...``, used by
``bench/test_bench_attention.py``): a fresh subprocess per measurement, one warm-up
call, then the kernel's resident-set high-water mark is reset (``5 > /proc/self/clear_refs``)
and ``VmHWM - VmRSS(before)`` after one more call is the peak: everything the call
allocated (through torch or not), above the inputs.  tracemalloc does not see
torch's allocations, and ``torch.cuda`` statistics exist only on CUDA.

``check(device)`` compares the op (the Triton path on CUDA) with the float64
reference in fp16, bf16 and fp32: outputs and dq, dk, dv.
"""
from __future__ import annotations

import gc
import inspect
import json
import sys
import time

import torch
import torch.nn.functional as F

from leedl_fast.bench.common import Case, CheckResult
from leedl_fast.ops import attention, attention_reference
from leedl_fast.ops.attention import _visible_mask

OPS = ("attention", "attention_dropout", "banded")

_DENSE_N = [1024, 2048, 4096, 8192, 16384]
_BAND_N = [4096, 16384, 65536]
_BAND_WINDOWS = [(256, 256), (512, 0)]
# Share of the suite's time budget against a module of weight 1 (leedl_fast.bench.runner): 68 of the
# suite's ~100 GPU cases are here.
BUDGET_WEIGHT = 4.0


def band_pairs(nq: int, nk: int, left: int, right: int) -> int:
    """Visible (query, key) pairs of a band (-1 = unbounded), the unit of banded FLOPs."""
    off = nk - nq
    total = 0
    for i in range(nq):
        lo = 0 if left < 0 else max(0, i + off - left)
        hi = nk - 1 if right < 0 else min(nk - 1, i + off + right)
        total += max(0, hi - lo + 1)
    return total


def band_mask(n: int, left: int, right: int, device) -> torch.Tensor:
    """The (N, N) boolean mask (True = attend) equivalent to a window, for dense SDPA peers:
    the reference's own definition of the band."""
    return _visible_mask(n, n, left, right, None, device)[0, 0]


def _fwd_bwd(fn, q, k, v, do):
    def run():
        fn(q, k, v).backward(do)
        q.grad = k.grad = v.grad = None
    return run


def _fwd(fn, q, k, v):
    def run():
        with torch.no_grad():
            return fn(q, k, v)
    return run


def _flash_attn():
    try:
        from flash_attn import flash_attn_func  # noqa: F401
        return flash_attn_func
    except Exception:
        return None


def _sdpa_flash(q, k, v, causal, dropout_p=0.0):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)


_FLEX_COMPILED = None


def _flex(n: int, window, device):
    """FlexAttention compiled, with the sliding-window block mask equivalent to ``window``; None (the case
    runs without this peer) when it cannot be built."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    left, right = window

    def mask_mod(b, h, q_idx, kv_idx):
        ok = (q_idx - kv_idx <= left) if left >= 0 else (q_idx >= 0)
        if right >= 0:
            ok = ok & (kv_idx - q_idx <= right)
        return ok

    global _FLEX_COMPILED
    try:
        # _compile=True: the block mask is computed block by block instead of from the materialised N x N
        # mask (about 10 bytes per score: 45 GB at N = 64k).
        kw = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=device, **kw)
    except Exception as exc:  # the case still runs, without this peer
        print(f"flex peer for N={n} window={window} left out: {type(exc).__name__}: {exc}"[:300], flush=True)
        return None
    if _FLEX_COMPILED is None:
        # One compiled wrapper for every case, so torch.compile's cache spares a full compile per shape
        # (runner.run raises the recompile limit so that the cases' shapes all stay compiled).
        _FLEX_COMPILED = torch.compile(flex_attention)
    compiled = _FLEX_COMPILED
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _gpu_cases(device: str, quick: bool):
    # Per head dim: the dense sweep (issue #3's targets), then the banded one (#4's), so that a time budget
    # spent early still leaves both at D = 64; dropout last.
    fa = _flash_attn()
    for d in (64, 128):
        yield from _gpu_dense_cases(device, quick, d, fa)
        yield from _gpu_banded_cases(device, quick, d, fa)
    yield from _gpu_dropout_cases(device, fa)


def _gpu_dense_cases(device: str, quick: bool, d: int, fa):
    dtype = torch.bfloat16
    h = 2048 // d
    for n in (_DENSE_N[1:3] if quick else _DENSE_N):
        b = max(1, 16384 // n)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for causal in (False, True):
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            ours = lambda q, k, v, c=causal: attention(q, k, v, causal=c)
            peers = {"sdpa": lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                     "sdpa_flash": lambda q, k, v, c=causal: _sdpa_flash(q, k, v, c)}
            if fa is not None:
                peers["flash_attn"] = lambda q, k, v, c=causal: fa(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2), causal=c).transpose(1, 2)
            shape = {"B": b, "H": h, "N": n, "D": d}
            yield Case("attention", "fwd", dtype, shape, _fwd(ours, q, k, v),
                       {p: _fwd(f, q, k, v) for p, f in peers.items()}, flops=flops, causal=causal)
            yield Case("attention", "fwd+bwd", dtype, shape, _fwd_bwd(ours, q, k, v, do),
                       {p: _fwd_bwd(f, q, k, v, do) for p, f in peers.items()}, flops=3.5 * flops, causal=causal)


def _gpu_banded_cases(device: str, quick: bool, d: int, fa):
    dtype = torch.bfloat16
    h = 2048 // d
    for n in (_BAND_N[:2] if quick else _BAND_N):
        b = max(1, 65536 // n)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for window in _BAND_WINDOWS:
            left, right = window
            causal = right == 0
            pairs = band_pairs(n, n, left, right)
            flops = 4 * b * h * d * pairs
            ours = lambda q, k, v, w=window: attention(q, k, v, window=w)
            peers = {"flex": _flex(n, window, device),
                     "sdpa_dense": lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)}
            if fa is not None:
                peers["flash_attn"] = lambda q, k, v, w=window: fa(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2), window_size=w).transpose(1, 2)
            peers = {p: f for p, f in peers.items() if f is not None}
            shape = {"B": b, "H": h, "N": n, "D": d}
            extra = {"band_pairs": pairs, "nxn_bool_mask_mb": n * n / 2**20}
            yield Case("banded", "fwd", dtype, shape, _fwd(ours, q, k, v),
                       {p: _fwd(f, q, k, v) for p, f in peers.items()}, flops=flops, causal=causal,
                       window=window, extra=extra)
            yield Case("banded", "fwd+bwd", dtype, shape, _fwd_bwd(ours, q, k, v, do),
                       {p: _fwd_bwd(f, q, k, v, do) for p, f in peers.items()}, flops=3.5 * flops, causal=causal,
                       window=window, extra=extra)


def _gpu_dropout_cases(device: str, fa):
    # Dropout 0.1 inside the kernel (eight 16-bit decisions per Philox call, kernels/dropout.py) against
    # SDPA and flash_attn with their own dropout (FlashAttention-2: sixteen 8-bit ones).  Last, so that a
    # spent time budget skips these rather than the cases of the issues' targets.
    dtype = torch.bfloat16
    for d in (64, 128):
        h, n = 2048 // d, 4096
        b = 16384 // n
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * b * h * n * n * d
        ours = lambda q, k, v: attention(q, k, v, dropout_p=0.1, seed=1)  # noqa: E731
        peers = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
                 "sdpa_flash": lambda q, k, v: _sdpa_flash(q, k, v, False, dropout_p=0.1)}
        if fa is not None:
            peers["flash_attn"] = lambda q, k, v: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     dropout_p=0.1).transpose(1, 2)
        shape = {"B": b, "H": h, "N": n, "D": d}
        yield Case("attention_dropout", "fwd", dtype, shape, _fwd(ours, q, k, v),
                   {p: _fwd(f, q, k, v) for p, f in peers.items()}, flops=flops, extra={"dropout_p": 0.1})
        yield Case("attention_dropout", "fwd+bwd", dtype, shape, _fwd_bwd(ours, q, k, v, do),
                   {p: _fwd_bwd(f, q, k, v, do) for p, f in peers.items()}, flops=3.5 * flops,
                   extra={"dropout_p": 0.1})


def _cpu_cases(quick: bool):
    dtype = torch.float32
    b, h, n, d = 2, 4, 512, 64
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    for causal in (False, True):
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        ours = lambda q, k, v, c=causal: attention(q, k, v, causal=c)
        peer = lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)
        shape = {"B": b, "H": h, "N": n, "D": d}
        yield Case("attention", "fwd", dtype, shape, _fwd(ours, q, k, v), {"sdpa": _fwd(peer, q, k, v)},
                   flops=flops, causal=causal)
        yield Case("attention", "fwd+bwd", dtype, shape, _fwd_bwd(ours, q, k, v, do),
                   {"sdpa": _fwd_bwd(peer, q, k, v, do)}, flops=3.5 * flops, causal=causal)
    # Banded against dense (SDPA with the equivalent boolean mask) over a sweep of N, so the
    # report's plot shows the band's linear time against the dense quadratic one.
    window = (128, 128)
    for n in ((1024, 2048) if quick else (1024, 2048, 4096)):
        q, k, v = (torch.randn(1, 4, n, 64, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        pairs = band_pairs(n, n, *window)
        mask = band_mask(n, *window, "cpu")
        yield Case("banded", "fwd+bwd", dtype, {"B": 1, "H": 4, "N": n, "D": 64},
                   _fwd_bwd(lambda q, k, v: attention(q, k, v, window=window), q, k, v, do),
                   {"sdpa_masked": _fwd_bwd(lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                            q, k, v, do)},
                   flops=3.5 * 4 * 4 * 64 * pairs, window=window, extra={"band_pairs": pairs})


def cases(device: str, quick: bool):
    if device.startswith("cuda"):
        yield from _gpu_cases(device, quick)
    else:
        yield from _cpu_cases(quick)


def check(device: str) -> list[CheckResult]:
    """The op (Triton on CUDA) against the float64 reference: o, dq, dk, dv, per dtype and case.

    Error bound: |x - ref| <= tol * (1 + |ref|), tol from the library's per-dtype table
    (fp32 on GPU runs TF32 products: 2e-3), doubled for the gradients (sums of N products)."""
    cases_ = [
        ("dense B2 H4 N257 D64", dict(b=2, hq=4, hkv=4, nq=257, nk=257, d=64), {}),
        ("causal GQA Nq!=Nk D128", dict(b=2, hq=8, hkv=2, nq=200, nk=333, d=128), {"causal": True}),
        ("padding D40", dict(b=3, hq=4, hkv=4, nq=130, nk=130, d=40), {"pad": True}),
        ("window (16,16) pad", dict(b=2, hq=4, hkv=2, nq=513, nk=513, d=64), {"window": (16, 16), "pad": True}),
        ("window (64,0) D96", dict(b=1, hq=4, hkv=4, nq=700, nk=700, d=96), {"window": (64, 0)}),
        # head dims below the tile width (the padded-head-dim tiles; D160 takes sm_90's HMMA dK/dV tile),
        # and one that is not a multiple of 8 (run as 24 on a zero-padded copy)
        ("dropout 0.1 pad window (40,3) GQA D160", dict(b=1, hq=4, hkv=2, nq=190, nk=190, d=160),
         {"window": (40, 3), "dropout_p": 0.1, "seed": 7, "pad": True}),
        ("window (5,5) Nq!=Nk D20", dict(b=2, hq=2, hkv=1, nq=100, nk=77, d=20), {"window": (5, 5)}),
        ("dropout 0.2 window (-1,8)", dict(b=2, hq=4, hkv=4, nq=150, nk=150, d=64),
         {"window": (-1, 8), "dropout_p": 0.2, "seed": 42, "pad": True}),
    ]
    tols = {torch.float16: ("fp16", 2e-3), torch.bfloat16: ("bf16", 1.6e-2), torch.float32: ("fp32", 2e-3)}
    out = []
    for dtype, (dname, tol) in tols.items():
        for name, s, kw in cases_:
            kw = dict(kw)
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                # Inputs rounded to the dtype first: the reference sees what the op sees, so the check
                # measures the op's own error, not the rounding of its inputs.
                mk = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype).double().to(device)
                q, k, v = mk(s["b"], s["hq"], s["nq"], s["d"]), mk(s["b"], s["hkv"], s["nk"], s["d"]), \
                    mk(s["b"], s["hkv"], s["nk"], s["d"])
                do = mk(s["b"], s["hq"], s["nq"], s["d"])
                if kw.pop("pad", False):
                    kpm = torch.rand(s["b"], s["nk"], generator=g) < 0.25
                    kpm[-1] = True
                    kw["key_padding_mask"] = kpm.to(device)
                qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
                ref = attention_reference(qr, kr, vr, **kw)
                ref.backward(do)
                qa, ka, va = (t.to(dtype).requires_grad_() for t in (q, k, v))
                o = attention(qa, ka, va, **kw)
                o.backward(do.to(dtype))
                errs, ok = [], True
                for got, want, scale in ((o, ref, 1), (qa.grad, qr.grad, 2), (ka.grad, kr.grad, 2), (va.grad, vr.grad, 2)):
                    diff = (got.double() - want).abs()
                    errs.append(diff.max().item())
                    ok &= bool(torch.isfinite(got).all()) and bool((diff <= scale * tol * (1 + want.abs())).all())
                out.append(CheckResult("attention", dname, name, max(errs), tol, ok))
            except Exception as exc:  # recorded, the suite goes on
                out.append(CheckResult("attention", dname, name, float("nan"), tol, False,
                                       error=f"{type(exc).__name__}: {exc}"[:500]))
        out.append(_check_second_order(device, dtype, dname, tol))
    return out


def _check_second_order(device: str, dtype, dname: str, tol: float) -> CheckResult:
    """A Hessian-vector product through the op (the Triton first backward, differentiated by the dense
    second-order math): d<w, dq>/d(q, k, v) with dq = d<do, o>/dq, against the float64 reference's."""
    name = "second derivative causal window (9,0) GQA"
    kw = {"window": (9, 0), "causal": True}
    try:
        g = torch.Generator(device="cpu").manual_seed(1)
        mk = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype).double().to(device)
        q, k, v, do, w = mk(2, 4, 77, 64), mk(2, 2, 77, 64), mk(2, 2, 77, 64), mk(2, 4, 77, 64), mk(2, 4, 77, 64)

        def hvp(fn, cast):
            xs = [cast(t).requires_grad_() for t in (q, k, v)]
            (dq,) = torch.autograd.grad(fn(*xs, **kw), xs[0], cast(do), create_graph=True)
            return torch.autograd.grad((dq * cast(w)).sum(), xs)

        want = hvp(attention_reference, lambda t: t.clone())
        got = hvp(attention, lambda t: t.to(dtype))
        errs, ok = [], True
        for a, b in zip(got, want):
            diff = (a.double() - b).abs()
            errs.append(diff.max().item())
            ok &= bool(torch.isfinite(a).all()) and bool((diff <= 4 * tol * (1 + b.abs())).all())
        return CheckResult("attention", dname, name, max(errs), tol, ok)
    except Exception as exc:  # recorded, the suite goes on
        return CheckResult("attention", dname, name, float("nan"), tol, False, error=f"{type(exc).__name__}: {exc}"[:500])


# ------------------------------------------------------------------------------ CPU memory probe (subprocess)

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_cpu(impl: str, n: int, left: int, right: int, b: int = 1, h: int = 4, d: int = 64,
                threads: int = 0, repeats: int = 2, dropout_p: float = 0.0) -> dict:
    """Time (s, the best of ``repeats`` calls) and peak resident memory (bytes above the inputs,
    of the first timed call) of one forward+backward.

    ``impl``: "ours" (the torch path with ``window=(left, right)``), "sdpa_mask" (SDPA with
    the equivalent (N, N) boolean mask, built inside the call as a user would) or "sdpa" (SDPA
    without a mask: dense attention only); both sides drop ``dropout_p``.  Run it in a
    fresh process (``python -m leedl_fast.bench.cases.attention mem ...``): the high-water
    mark is process-wide."""
    import os

    os.environ["LEEDL_FAST_BACKEND"] = "torch"
    if threads:
        torch.set_num_threads(threads)
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, n, d)

    def ours():
        attention(q, k, v, window=(left, right), dropout_p=dropout_p, seed=1).backward(do)

    def sdpa_mask():
        mask = band_mask(n, left, right, "cpu")
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p).backward(do)

    def sdpa():
        if (left, right) != (-1, -1):
            raise ValueError(f"impl 'sdpa' runs dense attention only, got window {(left, right)}")
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p).backward(do)

    fn = {"ours": ours, "sdpa_mask": sdpa_mask, "sdpa": sdpa}[impl]
    fn()
    q.grad = k.grad = v.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    peak = _status("VmHWM") - before
    for _ in range(repeats - 1):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        fn()
        elapsed = min(elapsed, time.perf_counter() - t0)
    results = 4 * b * h * n * d * 4           # o, dq, dk, dv in fp32: what any implementation returns
    return {"impl": impl, "n": n, "window": [left, right], "dropout_p": dropout_p, "time_s": elapsed,
            "peak_bytes": peak, "result_bytes": results, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    # python -m leedl_fast.bench.cases.attention mem <ours|sdpa_mask|sdpa> N LEFT RIGHT [THREADS [REPEATS [DROPOUT]]]
    if len(sys.argv) >= 6 and sys.argv[1] == "mem":
        args = sys.argv[2:]
        print(json.dumps(measure_cpu(args[0], int(args[1]), int(args[2]), int(args[3]),
                                     threads=int(args[4]) if len(args) > 4 else 0,
                                     repeats=int(args[5]) if len(args) > 5 else 2,
                                     dropout_p=float(args[6]) if len(args) > 6 else 0.0)))
    else:
        print(__doc__)
        sys.exit(2)
