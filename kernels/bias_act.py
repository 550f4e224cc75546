"""Fused bias + activation + dropout, forward and backward.

    z = x + bias                       bias (C,) broadcast over the rows of x (M, C)
    y = dropout(act(z))                keep-mask of kernels/dropout.py over the (M, C) matrix, kept values times s
    dz = dy * keep * s * act'(z)       (backward; dx = dz, dbias = sum over rows of dz)

The Transformer feed-forward block runs its first GEMM without bias and then this
one elementwise kernel, where torch runs the biased GEMM, the activation and a
dropout that writes its mask to memory.  The backward pass recomputes ``z`` from
the saved pre-bias input and regenerates the dropout mask from Philox (the
counter is the element's row-major index, int64), so no mask and no activation
output are stored.

One program per (BLOCK_M, BLOCK_N) tile of the (M, C) view; tiles are numbered
row-major (a program's neighbours cover the rest of the same rows, so consecutive
programs stream contiguous memory).  The backward writes, per tile, the column
sums of dz to ``dbias_partial[pid_m, :]`` (fp32); the caller reduces those
cdiv(M, BLOCK_M) rows with one torch sum: deterministic, no atomics.

Activations (ACT):
    0 identity
    1 relu          max(z, 0), NaN kept; derivative 1 where z > 0 (or NaN), else 0 (torch's convention at 0)
    2 gelu          z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2));  derivative Phi(z) + z phi(z)
    3 gelu_tanh     0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3) (Hendrycks & Gimpel 2016);
                    computed as z * sigmoid(2u), the same function (0.5 (1 + tanh u) = sigmoid(2u)),
                    which needs one exponential and has no cancellation for negative z
    4 silu          z * sigmoid(z) (Elfwing et al. 2018);  derivative s (1 + z (1 - s))
Math is fp32 whatever the storage dtype; exponentials are exp2 of a log2(e)-scaled argument.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import dropout_scale, dropout_threshold, keep_tile

ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

TILE = 2048        # elements per program: 8 values per thread at 8 warps (one 16-byte bf16 vector)
NUM_WARPS = 8
MAX_BLOCK_N = 128  # columns per tile; a bf16 row segment of 256 bytes
# Ints that Triton's launcher must not specialise (divisible by 16, equal to 1): they only bound
# masks and loops or key Philox (the seed is always i64), so one binary serves every value, the
# one tests/kernels compile-checks.
RUNTIME_INTS = ["n_rows", "n_cols", "n_col_blocks", "threshold", "seed"]


@triton.jit
def _sigmoid(t):
    # 1 / (1 + exp(-t)); exp2 overflows to inf for t << 0, giving exactly 0.
    return 1.0 / (1.0 + tl.exp2(-t * 1.4426950408889634))


@triton.jit
def _sigmoid_pair(t):
    # (sigmoid(t), 1 - sigmoid(t)) each to full relative precision: 1 - s cancels when s ~ 1, and there
    # it equals e * s with e = exp(-t) <= 1; e * s is NaN (inf * 0) only where s < 0.5 picks 1 - s.
    e = tl.exp2(-t * 1.4426950408889634)
    s = 1.0 / (1.0 + e)
    return s, tl.where(s < 0.5, 1.0 - s, e * s)


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:
        a = tl.where(z <= 0.0, 0.0, z)       # F.relu: NaN stays NaN
    elif ACT == 2:
        a = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        a = z * _sigmoid(2.0 * u)
    elif ACT == 4:
        a = z * _sigmoid(z)
    else:
        a = z
    return a


@triton.jit
def _act_bwd(g, z, ACT: tl.constexpr):
    """dz = g * act'(z); relu selects instead of multiplying, as torch's threshold_backward: g passes where
    z > 0 or z is NaN, and an infinite g where z <= 0 gives 0, not inf * 0."""
    if ACT == 1:
        dz = tl.where(z <= 0.0, 0.0, g)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp2(-0.5 * z * z * 1.4426950408889634)  # exp(-z^2/2) / sqrt(2 pi)
        dz = g * (cdf + z * pdf)
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        s, one_minus_s = _sigmoid_pair(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)  # 0.134145 = 3 * 0.044715
        dz = g * (s + z * s * one_minus_s * 2.0 * du)
    elif ACT == 4:
        s, one_minus_s = _sigmoid_pair(z)
        dz = g * (s * (1.0 + z * one_minus_s))
    else:
        dz = g
    return dz


@triton.jit
def _tile_preactivation(x_ptr, b_ptr, stride_xm, n_rows, n_cols, n_col_blocks,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of the (M, C) view and its pre-activation ``z = x + bias`` in fp32 (both passes)."""
    pid = tl.program_id(0)
    pid_m = pid // n_col_blocks
    pid_n = pid % n_col_blocks
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)                  # [BLOCK_M] int64
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                # [BLOCK_N]
    mask_n = offs_n < n_cols
    mask = (offs_m[:, None] < n_rows) & mask_n[None, :]                             # [BLOCK_M, BLOCK_N]
    z = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)         # [BLOCK_N]
        z = z + b[None, :]
    return pid_m, offs_m, pid_n * BLOCK_N, offs_n, mask_n, mask, z


@triton.jit
def _dropout(v, seed, threshold, keep_scale, offs_m, start_n, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout of a tile: element (m, c) of the logical (M, C) matrix in the dropout stream (kernels/dropout.py);
    the backward regenerates the same keep-mask."""
    keep = keep_tile(seed, offs_m * ((n_cols - 1) // 8 + 1), start_n, threshold, BLOCK_M, BLOCK_N)  # [BLOCK_M, BLOCK_N]
    return tl.where(keep, v * keep_scale, 0.0)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _bias_act_fwd_kernel(
    x_ptr, b_ptr, y_ptr,
    stride_xm, stride_ym,
    n_rows, n_cols, n_col_blocks,
    seed: tl.int64, threshold, keep_scale,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, offs_m, start_n, offs_n, mask_n, mask, z = _tile_preactivation(
        x_ptr, b_ptr, stride_xm, n_rows, n_cols, n_col_blocks, HAS_BIAS, BLOCK_M, BLOCK_N)
    y = _act_fwd(z, ACT)                                                            # [BLOCK_M, BLOCK_N]
    if HAS_DROPOUT:
        y = _dropout(y, seed, threshold, keep_scale, offs_m, start_n, n_cols, BLOCK_M, BLOCK_N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _bias_act_bwd_kernel(
    dy_ptr, x_ptr, b_ptr, dx_ptr, dbias_partial_ptr,
    stride_dym, stride_xm, stride_dxm,
    n_rows, n_cols, n_col_blocks,
    seed: tl.int64, threshold, keep_scale,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, offs_m, start_n, offs_n, mask_n, mask, z = _tile_preactivation(
        x_ptr, b_ptr, stride_xm, n_rows, n_cols, n_col_blocks, HAS_BIAS, BLOCK_M, BLOCK_N)
    g = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        g = _dropout(g, seed, threshold, keep_scale, offs_m, start_n, n_cols, BLOCK_M, BLOCK_N)
    dz = _act_bwd(g, z, ACT)                                                        # [BLOCK_M, BLOCK_N]
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_n[None, :], dz.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        part = tl.sum(tl.where(mask, dz, 0.0), axis=0)                              # [BLOCK_N] fp32
        tl.store(dbias_partial_ptr + pid_m.to(tl.int64) * n_cols + offs_n, part, mask=mask_n)


def launch_config(n_cols: int) -> dict:
    """Tile shape and warps for rows of ``n_cols`` (the shipped configurations).

    TILE elements per program; the columns take up to MAX_BLOCK_N of them (at
    least 16, the next power of two of a narrow row), the rows the rest."""
    block_n = min(MAX_BLOCK_N, max(16, triton.next_power_of_2(max(n_cols, 1))))
    return {"BLOCK_M": TILE // block_n, "BLOCK_N": block_n, "num_warps": NUM_WARPS}


def _grid(n_rows: int, n_cols: int, cfg: dict) -> tuple[int, int, int]:
    n_row_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
    n_col_blocks = triton.cdiv(n_cols, cfg["BLOCK_N"])
    return n_row_blocks * n_col_blocks, n_row_blocks, n_col_blocks


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, float]:
    if dropout_p > 0.0:
        return int(seed), dropout_threshold(dropout_p), dropout_scale(dropout_p)
    return 0, 0, 1.0


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, *, activation: int,
                 dropout_p: float, seed: int) -> torch.Tensor:
    """``out = dropout(act(x + bias))`` for 2-D ``x``, ``out`` (M, C) with unit column stride; bias (C,) contiguous."""
    assert x.dim() == 2 and out.shape == x.shape
    assert x.stride(1) == 1 or x.shape[1] <= 1
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return out
    cfg = launch_config(n_cols)
    n_prog, _, n_col_blocks = _grid(n_rows, n_cols, cfg)
    seed, threshold, keep_scale = _dropout_args(dropout_p, seed)
    _bias_act_fwd_kernel[(n_prog,)](
        x, x if bias is None else bias, out,
        x.stride(0), out.stride(0),
        n_rows, n_cols, n_col_blocks,
        seed, threshold, keep_scale,
        ACT=activation, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return out


def bias_act_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, dx: torch.Tensor, *,
                 activation: int, dropout_p: float, seed: int) -> torch.Tensor | None:
    """dx (written into ``dx``) and, with a bias, its gradient as float32 (C,): the column sums of dx
    before rounding, reduced from per-tile partial sums."""
    assert x.dim() == 2 and dy.shape == x.shape and dx.shape == x.shape
    n_rows, n_cols = x.shape
    if n_rows == 0 or n_cols == 0:
        return None if bias is None else torch.zeros(n_cols, dtype=torch.float32, device=x.device)
    cfg = launch_config(n_cols)
    n_prog, n_row_blocks, n_col_blocks = _grid(n_rows, n_cols, cfg)
    partial = None
    if bias is not None:
        partial = torch.empty(n_row_blocks, n_cols, dtype=torch.float32, device=x.device)
    seed, threshold, keep_scale = _dropout_args(dropout_p, seed)
    _bias_act_bwd_kernel[(n_prog,)](
        dy, x, x if bias is None else bias, dx, dx if partial is None else partial,
        dy.stride(0), x.stride(0), dx.stride(0),
        n_rows, n_cols, n_col_blocks,
        seed, threshold, keep_scale,
        ACT=activation, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return None if partial is None else partial.sum(0)
