"""ops.attention (torch path) against torch's scaled_dot_product_attention on the CPU.

pytest-benchmark groups pair each case of ours with SDPA on the same inputs in the same run
(``pytest bench --benchmark-only``).  The issue's CPU requirements are asserted here:

* dense, causal (Nq == Nk, and Nq != Nk bottom-right aligned), key padding, GQA: ours <= 1.2x
  SDPA's forward+backward time.  The groups ``attention fwd+bwd ...`` show both; the assertion is in
  ``test_fwd_bwd_ratio_vs_sdpa``, which alternates ours and SDPA call by call and takes the median
  of the per-pair ratios (a shared 2-core machine swings single timings by 30%; adjacent calls
  share the load);
* dropout 0.1, B1 H4 N512 and B2 H8 N1024: ours <= 1.2x SDPA's forward+backward time
  (``test_dropout_ratio_vs_sdpa``, alternating), ours reproducing the kernel's Philox mask exactly
  (one Philox call per eight scores, its rounds in numpy on the CPU), SDPA drawing its own;
* dense peak memory, with and without dropout, N = 1024 and 4096: ours never above SDPA's
  (``test_dense_peak_memory_vs_sdpa``; the allowances are in its docstring);
* banded, B=1, H=4, D=64, N=8192, window (128, 128), fp32, forward+backward, against SDPA with
  the equivalent (N, N) boolean mask built in the call: >= 10x faster and >= 20x less peak
  working memory (peak minus the 32 MiB of o, dq, dk, dv that both must return; the total
  peak ratio is recorded too; peaks are measured with glibc returning freed memory, see ``_measure``);
* N from 2k to 32k at that window: time and peak memory grow linearly (each doubling of N at
  most doubles them, with slack for timing noise); the plot
  ``.benchmarks/attention_banded_scaling.png`` shows both curves.

Peak memory is measured in a fresh subprocess per point (resident-set high-water mark, see
``leedl_fast.bench.cases.attention.measure_cpu``).  Set LEEDL_BENCH_THREADS to pin the torch
thread count of those subprocesses (default: torch's).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from leedl_fast.bench.cases.attention import band_mask
from leedl_fast.bench.common import alternating_ratio
from leedl_fast.ops import attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLOT = ROOT / ".benchmarks" / "attention_banded_scaling.png"
THREADS = int(os.environ.get("LEEDL_BENCH_THREADS", "0"))


def _inputs(b, h, n, d, hkv=None, grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g).requires_grad_(grad)
    k = torch.randn(b, hkv or h, n, d, generator=g).requires_grad_(grad)
    v = torch.randn(b, hkv or h, n, d, generator=g).requires_grad_(grad)
    return q, k, v, torch.randn(b, h, n, d, generator=g)


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


IMPLS = ["leedl_fast", "sdpa"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_dense_fwd(benchmark, impl, causal):
    benchmark.group = f"attention fwd B2 H8 N1024 D64 causal={causal}"
    q, k, v, _ = _inputs(2, 8, 1024, 64, grad=False)
    fn = (lambda: attention(q, k, v, causal=causal)) if impl == "leedl_fast" else \
        (lambda: _sdpa(q, k, v, is_causal=causal))
    out = benchmark(fn)
    assert torch.allclose(out, _sdpa(q, k, v, is_causal=causal), atol=1e-5)


FWD_BWD_CASES = ["dense", "causal", "causal_cross", "padding", "gqa", "gqa_padding"]


def _fwd_bwd_pair(case):
    """(ours, sdpa, do, leaves) for B=2, Hq=8, D=64, fp32: N=1024, or Nq=512 x Nk=1024 for
    causal_cross (bottom-right causal; SDPA gets it as ``causal_lower_right``); GQA has Hkv=2 (SDPA
    with enable_gqa); key padding masks 20% of the keys (SDPA with the boolean keep mask)."""
    gqa = case.startswith("gqa")
    g = torch.Generator().manual_seed(0)
    nq = 512 if case == "causal_cross" else 1024
    q = torch.randn(2, 8, nq, 64, generator=g).requires_grad_()
    k = torch.randn(2, 2 if gqa else 8, 1024, 64, generator=g).requires_grad_()
    v = torch.randn(2, 2 if gqa else 8, 1024, 64, generator=g).requires_grad_()
    do = torch.randn(2, 8, nq, 64, generator=g)
    kpm = (torch.rand(2, 1024, generator=g) < 0.2) if case.endswith("padding") else None
    causal = case in ("causal", "causal_cross")
    ours = lambda: attention(q, k, v, causal=causal, key_padding_mask=kpm)
    mask = None
    if kpm is not None:
        mask = ~kpm[:, None, None, :]
    elif case == "causal_cross":
        mask = causal_lower_right(nq, 1024)
    sdpa = lambda: _sdpa(q, k, v, is_causal=case == "causal", enable_gqa=gqa, attn_mask=mask)
    return ours, sdpa, do, (q, k, v)


def _step(fn, do, leaves):
    fn().backward(do)
    for t in leaves:
        t.grad = None


@pytest.mark.parametrize("case", FWD_BWD_CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dense_fwd_bwd(benchmark, impl, case):
    ours, sdpa, do, leaves = _fwd_bwd_pair(case)
    benchmark.group = f"attention fwd+bwd B2 H8 N1024 D64 {case}"
    fn = ours if impl == "leedl_fast" else sdpa
    benchmark.pedantic(lambda: _step(fn, do, leaves), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("case", FWD_BWD_CASES)
def test_fwd_bwd_ratio_vs_sdpa(benchmark, case):
    """The issue's CPU requirement: forward + backward of the torch path <= 1.2x SDPA's, same inputs.
    Ours and SDPA alternate (which goes first alternates too); the median of 12 per-pair ratios."""
    ours, sdpa, do, leaves = _fwd_bwd_pair(case)
    timing = alternating_ratio(lambda: _step(ours, do, leaves), lambda: _step(sdpa, do, leaves))
    benchmark.group = "attention fwd+bwd ratio ours / sdpa (median of alternating pairs)"
    benchmark.extra_info.update(case=case, ratio=timing.ratio, ratios=timing.ratios, ours_s=timing.ours_s,
                                sdpa_s=timing.peer_s, threads=torch.get_num_threads())
    benchmark.pedantic(lambda: _step(ours, do, leaves), rounds=1, warmup_rounds=0)
    print(f"\n{case}: {timing}")
    assert timing.ratio <= 1.2, f"{case}: {timing} > 1.2 (pairs: {[round(x, 2) for x in timing.ratios]})"


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_fwd_bwd(benchmark, impl):
    """Dropout 0.1: the kernel's exact Philox mask (the CPU runs its rounds in numpy) against SDPA's own."""
    benchmark.group = "attention fwd+bwd B1 H4 N512 D64 dropout 0.1"
    q, k, v, do = _inputs(1, 4, 512, 64)
    fn = (lambda: attention(q, k, v, dropout_p=0.1, seed=1)) if impl == "leedl_fast" else \
        (lambda: _sdpa(q, k, v, dropout_p=0.1))
    benchmark.pedantic(lambda: _step(fn, do, (q, k, v)), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("shape", [(1, 4, 512), (2, 8, 1024)], ids=lambda s: "B{}H{}N{}".format(*s))
def test_dropout_ratio_vs_sdpa(benchmark, shape):
    """The issue's CPU requirement with dropout 0.1: ours (the kernel's mask, regenerated in the backward)
    <= 1.2x SDPA (torch's RNG, its mask stored), alternating; the median of 20 per-pair ratios."""
    q, k, v, do = _inputs(*shape, 64)
    ours = lambda: attention(q, k, v, dropout_p=0.1, seed=1)  # noqa: E731
    sdpa = lambda: _sdpa(q, k, v, dropout_p=0.1)  # noqa: E731
    timing = alternating_ratio(lambda: _step(ours, do, (q, k, v)), lambda: _step(sdpa, do, (q, k, v)), pairs=20)
    case = "dropout 0.1 B{} H{} N{} D64".format(*shape)
    benchmark.group = "attention fwd+bwd ratio ours / sdpa (median of alternating pairs)"
    benchmark.extra_info.update(case=case, ratio=timing.ratio, ratios=timing.ratios, ours_s=timing.ours_s,
                                sdpa_s=timing.peer_s, threads=torch.get_num_threads())
    benchmark.pedantic(lambda: _step(ours, do, (q, k, v)), rounds=1, warmup_rounds=0)
    print(f"\n{case}: {timing}")
    assert timing.ratio <= 1.2, f"{case}: {timing} > 1.2 (pairs: {[round(x, 2) for x in timing.ratios]})"


SMALL_CASES = [(4, 4, 100, "dense"), (4, 4, 100, "causal"), (4, 4, 100, "dropout 0.1"), (1, 1, 8, "dense")]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "B{}H{}N{}-{}".format(*c).replace(" ", ""))
def test_small_sizes_ratio_vs_sdpa(benchmark, case):
    """Forward + backward at the sizes of a course exercise or a decoding step, against SDPA, alternating
    (60 pairs; 300 at N = 8).  Recorded, not asserted: here per-call overheads (Python, and the Philox rounds
    with dropout) weigh as much as the work, and the issue's 1.2x is not met everywhere (the README's CPU
    table has the figures); the asserted requirement is at the sizes above."""
    b, h, n, kind = case
    q, k, v, do = _inputs(b, h, n, 64)
    kw_ours = {"causal": True} if kind == "causal" else ({"dropout_p": 0.1} if kind.startswith("dropout") else {})
    kw_sdpa = {"is_causal": True} if kind == "causal" else kw_ours
    ours = lambda: attention(q, k, v, **kw_ours)  # noqa: E731
    sdpa = lambda: _sdpa(q, k, v, **kw_sdpa)  # noqa: E731
    timing = alternating_ratio(lambda: _step(ours, do, (q, k, v)), lambda: _step(sdpa, do, (q, k, v)),
                               pairs=300 if n <= 8 else 60, warmup=5)
    label = f"B{b} H{h} N{n} D64 {kind}"
    benchmark.group = "attention fwd+bwd ratio ours / sdpa at small sizes (median of alternating pairs)"
    benchmark.extra_info.update(case=label, ratio=timing.ratio, ours_s=timing.ours_s, sdpa_s=timing.peer_s,
                                threads=torch.get_num_threads())
    benchmark.pedantic(lambda: _step(ours, do, (q, k, v)), rounds=1, warmup_rounds=0)
    print(f"\n{label}: {timing}")


@pytest.mark.parametrize("impl", ["leedl_fast", "sdpa_bool_mask"])
def test_banded_fwd_bwd(benchmark, impl):
    n, window = 8192, (128, 128)
    benchmark.group = f"banded fwd+bwd B1 H4 N{n} D64 window {window}"
    q, k, v, do = _inputs(1, 4, n, 64)
    if impl == "leedl_fast":
        fn = lambda: attention(q, k, v, window=window)
    else:
        fn = lambda: _sdpa(q, k, v, attn_mask=band_mask(n, *window, "cpu"))

    def step():
        fn().backward(do)
        q.grad = k.grad = v.grad = None

    benchmark.pedantic(step, rounds=2 if impl != "leedl_fast" else 5, warmup_rounds=1)


def _run_measure(impl, n, window, env, dropout_p=0.0):
    cmd = [sys.executable, "-m", "leedl_fast.bench.cases.attention", "mem", impl, str(n), str(window[0]),
           str(window[1]), str(THREADS), "2", str(dropout_p)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "LEEDL_FAST_BACKEND": "torch", **env})
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure(impl, n, window, dropout_p=0.0):
    """Time from a plain subprocess; peak memory from a second one in which glibc returns every
    allocation of 64 KiB or more to the system when it is freed (a fixed mmap threshold).  With
    glibc's default, memory freed by the warm-up call stays resident and the timed call reuses
    it without raising the high-water mark, which under-counts the peak (the peak above the
    inputs read lower than the 32 MiB of results); the fixed threshold slows allocation, so the
    times come from the plain run."""
    timed = _run_measure(impl, n, window, {}, dropout_p)
    sized = _run_measure(impl, n, window, {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}, dropout_p)
    return {**timed, "peak_bytes": sized["peak_bytes"]}


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("n", [512, 1024, 4096])
def test_dense_peak_memory_vs_sdpa(benchmark, n, dropout_p):
    """The issue's "never more memory" than SDPA on CPU: dense fwd+bwd, B1 H4 D64, fp32, peak resident
    memory.  Without dropout both run ATen's fused kernels (ours passes their results on uncopied); with
    dropout SDPA runs its math path, N x N probabilities and mask stored, and ours blocks of at most
    2**20 scores (at N = 512 one block, whose probabilities ours keeps for the backward).  Allowances: our log-sum-exp, a contiguous float32 (B, H, N) copy of ATen's
    (B, N, H)-ordered one (B*H*N*4 bytes, 1/D of o's size), and 256 KiB of Python heap: at N = 512
    torch's profiler shows the two sides allocate the same tensor bytes, while their peak RSS
    differs by about 250 KiB."""
    ours = _measure("ours", n, (-1, -1), dropout_p)
    sdpa = _measure("sdpa", n, (-1, -1), dropout_p)
    allowance = 1 * 4 * n * 4 + 256 * 1024
    benchmark.group = "dense attention peak memory ours vs sdpa"
    benchmark.extra_info.update(n=n, dropout_p=dropout_p, ours=ours, sdpa=sdpa)
    q, k, v, do = _inputs(1, 4, n, 64)
    benchmark.pedantic(lambda: attention(q, k, v, dropout_p=dropout_p, seed=1).backward(do), rounds=1,
                       warmup_rounds=0)
    print(f"\nN={n} dropout {dropout_p}: peak {ours['peak_bytes'] / 2**20:.2f} MiB vs SDPA "
          f"{sdpa['peak_bytes'] / 2**20:.2f} MiB")
    assert ours["peak_bytes"] <= sdpa["peak_bytes"] + allowance, (ours, sdpa)


def test_banded_requirements_vs_sdpa_mask(benchmark):
    """N=8192, window (128, 128), fp32, fwd+bwd: >= 10x faster, >= 20x less peak working memory."""
    n, window = 8192, (128, 128)
    ours = _measure("ours", n, window)
    sdpa = _measure("sdpa_mask", n, window)
    speedup = sdpa["time_s"] / ours["time_s"]
    total_ratio = sdpa["peak_bytes"] / ours["peak_bytes"]
    work_ratio = (sdpa["peak_bytes"] - sdpa["result_bytes"]) / max(1, ours["peak_bytes"] - ours["result_bytes"])
    benchmark.group = "banded requirements N8192 window (128, 128)"
    benchmark.extra_info.update(ours=ours, sdpa_mask=sdpa, speedup=speedup, peak_ratio_total=total_ratio,
                                peak_ratio_working=work_ratio)
    q, k, v, do = _inputs(1, 4, n, 64)
    benchmark.pedantic(lambda: attention(q, k, v, window=window).backward(do), rounds=3, warmup_rounds=1)
    print(f"\nbanded N={n} {window}: speedup {speedup:.1f}x, peak memory {sdpa['peak_bytes'] / 2**20:.0f} MiB vs "
          f"{ours['peak_bytes'] / 2**20:.1f} MiB ({total_ratio:.1f}x total, {work_ratio:.1f}x working)")
    assert speedup >= 10, f"speedup {speedup:.1f}x < 10x ({ours} vs {sdpa})"
    assert work_ratio >= 20, f"working-memory ratio {work_ratio:.1f}x < 20x ({ours} vs {sdpa})"


def test_banded_scaling_is_linear(benchmark):
    """N = 2k .. 32k at window (128, 128): time and peak memory per token stay flat; writes the plot."""
    window = (128, 128)
    ns = [2048, 4096, 8192, 16384, 32768]
    rows = [_measure("ours", n, window) for n in ns]
    benchmark.group = "banded scaling window (128, 128)"
    benchmark.extra_info["points"] = rows
    q, k, v, do = _inputs(1, 4, 2048, 64)
    benchmark.pedantic(lambda: attention(q, k, v, window=window).backward(do), rounds=3, warmup_rounds=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["time_s"] * 1e3 for r in rows]
    m = [r["peak_bytes"] / 2**20 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, y, label in ((axes[0], t, "forward+backward time (ms)"), (axes[1], m, "peak memory above inputs (MiB)")):
        ax.plot(ns, y, "o-", label="leedl_fast banded (128, 128)")
        ax.plot(ns, [y[-1] * n / ns[-1] for n in ns], "--", color="gray", label="linear through the last point")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"banded attention on CPU, B=1 H=4 D=64 fp32, {rows[0]['threads']} thread(s)")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)
    print(f"\nplot: {PLOT}\n" + "\n".join(f"N={n}: {a:.0f} ms, {b:.1f} MiB" for n, a, b in zip(ns, t, m)))
    # Linear, not quadratic: the least-squares slope of log(cost) against log(N) is 1 for a
    # linear cost and 2 for a quadratic one.  One timing per length is noisy (single points
    # can jump), so the fit over the five lengths is what is asserted, with 0.25 of slack;
    # fixed per-call costs make short lengths relatively dearer and push the slope below 1.
    import numpy as np

    for name, y in (("time", t), ("memory", m)):
        slope = float(np.polyfit(np.log(ns), np.log(y), 1)[0])
        assert slope <= 1.25, (name, slope, y)
        assert y[-1] / y[0] <= 16 * 1.3, (name, y)