"""Fused row softmax, forward and backward.

    y_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x))           (forward)
    dx_i = y_i * (dy_i - sum_j y_j * dy_j)                      (backward)

One program per row.  A row that fits in one block (``n_cols <= MAX_FUSED_COLS``)
is read once and written once: the whole row sits in registers, the lane-wise
max and sum are reductions over that block.  Longer rows take the same kernel
with ``ONE_PASS=False``: a first sweep keeps an online (running max, rescaled
sum) per lane, the Milakov & Gimelshein recurrence ("Online normalizer
calculation for softmax", 2018), and a second sweep writes; that is two reads
and one write, the least a row that does not fit on chip allows.

Math is fp32 whatever the storage dtype; exponentials are ``exp2`` of
``(x - max) * log2(e)``: scaling after the subtraction keeps large logits exact
(pre-scaling x itself by log2(e) loses ~1e-3 relative at |x| ~ 1e4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Largest row kept entirely in registers.  At 16 warps (512 threads) this is
# 32 fp32 values per thread for the forward pass and 64 for the backward.
MAX_FUSED_COLS = 16384
# Ints that Triton's launcher must not specialise (divisible by 16, equal to 1): they only bound
# masks and loops, so one binary serves every value, the one tests/kernels compile-checks.
RUNTIME_INTS = ["n_cols"]


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _softmax_fwd_kernel(
    x_ptr, y_ptr,
    stride_xm, stride_ym,
    n_cols,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    y_row = y_ptr + row * stride_ym
    offs_n = tl.arange(0, BLOCK_N)                                        # [BLOCK_N]
    if ONE_PASS:
        mask = offs_n < n_cols
        x = tl.load(x_row + offs_n, mask=mask, other=-float("inf")).to(tl.float32)  # [BLOCK_N]
        m = tl.max(x, axis=0)                                              # scalar
        # Subtract before scaling: x - m is exact near the max, x * log2(e) is not.
        p = tl.exp2((x - m) * 1.4426950408889634)                          # [BLOCK_N], 0 on padding
        y = p / tl.sum(p, axis=0)
        tl.store(y_row + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m_i = tl.full([BLOCK_N], -float("inf"), tl.float32)               # [BLOCK_N] running max per lane
        l_i = tl.zeros([BLOCK_N], tl.float32)                              # [BLOCK_N] running sum per lane
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offs_n
            x = tl.load(x_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)  # [BLOCK_N]
            m_new = tl.maximum(m_i, x)
            # A lane that has seen only padding keeps m = -inf; guard its rescale.
            alpha = tl.where(m_new == -float("inf"), 0.0, tl.exp2((m_i - m_new) * 1.4426950408889634))
            l_i = l_i * alpha + tl.where(m_new == -float("inf"), 0.0, tl.exp2((x - m_new) * 1.4426950408889634))
            m_i = m_new
        m = tl.max(m_i, axis=0)                                            # scalar
        l = tl.sum(l_i * tl.where(m_i == -float("inf"), 0.0, tl.exp2((m_i - m) * 1.4426950408889634)), axis=0)
        inv_l = 1.0 / l
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offs_n
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
            y = tl.exp2((x - m) * 1.4426950408889634) * inv_l              # [BLOCK_N]
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _softmax_bwd_kernel(
    y_ptr, dy_ptr, dx_ptr,
    stride_ym, stride_dym, stride_dxm,
    n_cols,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_ym
    dy_row = dy_ptr + row * stride_dym
    dx_row = dx_ptr + row * stride_dxm
    offs_n = tl.arange(0, BLOCK_N)                                         # [BLOCK_N]
    if ONE_PASS:
        mask = offs_n < n_cols
        y = tl.load(y_row + offs_n, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        dy = tl.load(dy_row + offs_n, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=0)                                        # scalar
        tl.store(dx_row + offs_n, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)                               # [BLOCK_N]
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offs_n
            mask = cols < n_cols
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offs_n
            mask = cols < n_cols
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=mask)


def launch_config(n_cols: int, backward: bool = False) -> dict:
    """Block size, pass count and warps for a row of ``n_cols`` (the shipped configurations)."""
    if n_cols <= MAX_FUSED_COLS:
        block = max(16, triton.next_power_of_2(n_cols))
        one_pass = True
    else:
        block = 4096
        one_pass = False
    # ~8 (forward) or ~16 (backward: two rows of inputs) fp32 values per thread.
    per_thread = 8 if not backward else 16
    warps = min(16, max(1, block // (32 * per_thread))) if one_pass else 8
    warps = 1 << (warps.bit_length() - 1)  # a power of two
    return {"BLOCK_N": block, "ONE_PASS": one_pass, "num_warps": warps}


def softmax_fwd(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim of a 2-D tensor whose last dim has stride 1."""
    assert x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1)
    n_rows, n_cols = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if n_rows == 0 or n_cols == 0:
        return y
    cfg = launch_config(n_cols)
    _softmax_fwd_kernel[(n_rows,)](
        x, y, x.stride(0), y.stride(0), n_cols,
        BLOCK_N=cfg["BLOCK_N"], ONE_PASS=cfg["ONE_PASS"], num_warps=cfg["num_warps"],
    )
    return y


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of softmax over the last dim of 2-D tensors with unit column stride."""
    assert y.shape == dy.shape and y.dim() == 2
    n_rows, n_cols = y.shape
    dx = torch.empty_like(y, memory_format=torch.contiguous_format) if out is None else out
    if n_rows == 0 or n_cols == 0:
        return dx
    cfg = launch_config(n_cols, backward=True)
    _softmax_bwd_kernel[(n_rows,)](
        y, dy, dx, y.stride(0), dy.stride(0), dx.stride(0), n_cols,
        BLOCK_N=cfg["BLOCK_N"], ONE_PASS=cfg["ONE_PASS"], num_warps=cfg["num_warps"],
    )
    return dx
