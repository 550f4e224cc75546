"""Fused dropout + residual add + LayerNorm over the last dim, forward and backward.

    h = residual + dropout(x)        (keep-mask of kernels/dropout.py over the (rows, C) matrix, kept values * s)
    y = (h - mean(h)) * rstd * weight + bias,     rstd = 1 / sqrt(var(h) + eps)   (biased variance)

backward, with xhat = (h - mean) * rstd and g = dy * weight:

    dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh_in       (dh_in: gradient of the h output)
    dresidual = dh,   dx = dh * keep * s,   dweight = sum_rows dy * xhat,   dbias = sum_rows dy

PyTorch runs dropout, add and layer_norm as three kernels and stores the dropout
mask; here the forward is one pass over a row held in registers and the backward
another, with the dropout mask regenerated from Philox instead of stored.  That is
the idea of FlashAttention's fused ``dropout_add_layer_norm`` and of Apex's fused
layer norm (facts only; no code taken from either).

Forward: one program per row.  ``h`` is written (``STORE_H``) when the backward or
the caller needs it; stored or not, it is rounded to x's dtype and the statistics
are taken of the rounded values, so y is exactly the layer norm of that h
(the function torch's unfused dropout, add, layer_norm computes) and the backward,
which reads the stored h, sees the same xhat.  mean and rstd are saved in fp32.

Backward: a fixed grid of programs each walks a contiguous range of rows and keeps
its own fp32 partial sums of dweight and dbias, written to a [num_programs, C]
buffer that the caller reduces: deterministic, no atomics.  A row of up to
``BWD_MAX_BLOCK`` columns is one register block, read once, with the partials in
registers; a wider row (``LOOPED``) is swept twice block by block (sums, then
writes; the second read mostly hits L1/L2) and its partials live in the program's
own row of the buffer, because a whole 8192-wide row with register partials and
Philox state spilled registers in the compile checks.

Rows up to ``MAX_COLS`` columns (the forward holds a row in registers); longer rows
are refused on the Triton path by the op (``leedl_fast.ops.layer_norm``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dropout import dropout_scale, dropout_threshold, keep_row

# Largest row held in registers: at 16 warps, 16 fp32 values per thread and tensor.
MAX_COLS = 8192
# Ints that Triton's launcher must not specialise (divisible by 16, equal to 1): they only bound
# masks and loops or key Philox (the seed is always i64), so one binary serves every value, the
# one tests/kernels compile-checks.
RUNTIME_INTS = ["n_rows", "n_cols", "rows_per_program", "dropout_threshold", "seed"]
# The backward holds at most this many columns per block (longer rows loop over blocks).
BWD_MAX_BLOCK = 4096


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _dropout_add_layer_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
    stride_xm, stride_rm, stride_ym, stride_hm,
    n_cols, eps, dropout_threshold, dropout_scale, seed: tl.int64,
    BLOCK_C: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)                                             # [BLOCK_C]
    mask = offs_c < n_cols
    h = tl.load(x_ptr + row * stride_xm + offs_c, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_C]
    if HAS_DROPOUT:
        keep = keep_row(seed, row * ((n_cols - 1) // 8 + 1), 0, dropout_threshold, BLOCK_C)  # [BLOCK_C]
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * stride_rm + offs_c, mask=mask, other=0.0).to(tl.float32)
    # h rounded to x's dtype (h_ptr's, y's when h is not stored), stored or not: y = LN(rounded h) exactly,
    # the same numbers with and without autograd, and the backward (reading the stored h) sees the same xhat.
    h_st = h.to(h_ptr.dtype.element_ty)
    if STORE_H:
        tl.store(h_ptr + row * stride_hm + offs_c, h_st, mask=mask)
    h = h_st.to(tl.float32)
    mean = tl.sum(h, axis=0) / n_cols                                          # scalar
    hc = tl.where(mask, h - mean, 0.0)                                         # [BLOCK_C]
    var = tl.sum(hc * hc, axis=0) / n_cols                                     # scalar, biased
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    y = hc * rstd                                                              # [BLOCK_C]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs_c, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_c, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs_c, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_load(h_ptr, dy_ptr, w_ptr, row, stride_hm, stride_dym, cols, mask, mean, rstd,
              HAS_WEIGHT: tl.constexpr):
    """xhat, dy and g = dy * weight of one row's column block ``cols``, fp32, zero on padding."""
    h = tl.load(h_ptr + row * stride_hm + cols, mask=mask, other=0.0).to(tl.float32)     # [BLOCK_C]
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)                                          # [BLOCK_C]
    dy = tl.load(dy_ptr + row * stride_dym + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_C]
    if HAS_WEIGHT:
        # Loaded per row (an L1/L2 hit) rather than held: registers go to the accumulators.
        g = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        g = dy
    return xhat, dy, g


@triton.jit
def _bwd_store(dhin_ptr, dres_ptr, dx_ptr, row, stride_dhm, stride_drm, stride_dxm, cols, mask,
               start, xhat, g, c_xhat, c_g, rstd, n_cols, dropout_threshold, dropout_scale, seed,
               HAS_DH_IN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """dh of one column block from the row's two sums; stores dresidual = dh and dx = dropout'(dh)."""
    dh = (g - (xhat * c_xhat + c_g)) * rstd                                                # [BLOCK_C]
    if HAS_DH_IN:
        dh += tl.load(dhin_ptr + row * stride_dhm + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        tl.store(dres_ptr + row * stride_drm + cols, dh.to(dres_ptr.dtype.element_ty), mask=mask)
    if HAS_DROPOUT:
        # The forward's mask, regenerated.
        keep = keep_row(seed, row * ((n_cols - 1) // 8 + 1), start, dropout_threshold, BLOCK_C)  # [BLOCK_C]
        dh = tl.where(keep, dh * dropout_scale, 0.0)
    tl.store(dx_ptr + row * stride_dxm + cols, dh.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _dropout_add_layer_norm_bwd_kernel(
    dy_ptr, dhin_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr,
    stride_dym, stride_dhm, stride_hm, stride_dxm, stride_drm,
    n_rows, n_cols, rows_per_program, dropout_threshold, dropout_scale, seed: tl.int64,
    BLOCK_C: tl.constexpr,
    LOOPED: tl.constexpr,
    HAS_DH_IN: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    # LOOPED=False: the row is one block, read once; dweight/dbias partials sit in registers.
    # LOOPED=True (rows wider than BLOCK_C): a first sweep over the row's blocks takes the two
    # sums, a second reads the blocks again (L1/L2) and writes; the partials then live in this
    # program's own row of the [programs, C] buffer (read-modify-write, same thread each time).
    # A whole 8192-wide row with register partials and Philox state spilled in the compile checks.
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    n_here = tl.minimum(rows_per_program, n_rows - row_start)                  # rows of this program
    cols0 = tl.arange(0, BLOCK_C)                                              # [BLOCK_C]
    mask0 = cols0 < n_cols
    dw_row = dw_ptr + pid.to(tl.int64) * n_cols
    db_row = db_ptr + pid.to(tl.int64) * n_cols
    dw_acc = tl.zeros([BLOCK_C], tl.float32)                                   # [BLOCK_C] partial dweight
    db_acc = tl.zeros([BLOCK_C], tl.float32)                                   # [BLOCK_C] partial dbias
    if LOOPED:
        for start in range(0, n_cols, BLOCK_C):
            if HAS_WEIGHT:
                tl.store(dw_row + start + cols0, dw_acc, mask=start + cols0 < n_cols)
            if HAS_BIAS:
                tl.store(db_row + start + cols0, db_acc, mask=start + cols0 < n_cols)
    for i in range(0, n_here):
        row = row_start + i                                                    # int64
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        if LOOPED:
            s_gx = 0.0
            s_g = 0.0
            for start in range(0, n_cols, BLOCK_C):
                cols = start + cols0                                           # [BLOCK_C]
                mask = cols < n_cols
                xhat, dy, g = _bwd_load(h_ptr, dy_ptr, w_ptr, row, stride_hm, stride_dym, cols, mask, mean, rstd,
                                        HAS_WEIGHT)
                s_gx += tl.sum(g * xhat, axis=0)
                s_g += tl.sum(g, axis=0)
            c_xhat = s_gx / n_cols
            c_g = s_g / n_cols
            for start in range(0, n_cols, BLOCK_C):
                cols = start + cols0
                mask = cols < n_cols
                xhat, dy, g = _bwd_load(h_ptr, dy_ptr, w_ptr, row, stride_hm, stride_dym, cols, mask, mean, rstd,
                                        HAS_WEIGHT)
                if HAS_WEIGHT:
                    tl.store(dw_row + cols, tl.load(dw_row + cols, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_BIAS:
                    tl.store(db_row + cols, tl.load(db_row + cols, mask=mask, other=0.0) + dy, mask=mask)
                _bwd_store(dhin_ptr, dres_ptr, dx_ptr, row, stride_dhm, stride_drm, stride_dxm, cols, mask,
                           start, xhat, g, c_xhat, c_g, rstd, n_cols, dropout_threshold, dropout_scale, seed,
                           HAS_DH_IN, HAS_RESIDUAL, HAS_DROPOUT, BLOCK_C)
        else:
            xhat, dy, g = _bwd_load(h_ptr, dy_ptr, w_ptr, row, stride_hm, stride_dym, cols0, mask0, mean, rstd,
                                    HAS_WEIGHT)
            if HAS_WEIGHT:
                dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
            c_xhat = tl.sum(g * xhat, axis=0) / n_cols                         # scalar
            c_g = tl.sum(g, axis=0) / n_cols                                   # scalar
            _bwd_store(dhin_ptr, dres_ptr, dx_ptr, row, stride_dhm, stride_drm, stride_dxm, cols0, mask0,
                       0, xhat, g, c_xhat, c_g, rstd, n_cols, dropout_threshold, dropout_scale, seed,
                       HAS_DH_IN, HAS_RESIDUAL, HAS_DROPOUT, BLOCK_C)
    if not LOOPED:
        if HAS_WEIGHT:
            tl.store(dw_row + cols0, dw_acc, mask=mask0)
        if HAS_BIAS:
            tl.store(db_row + cols0, db_acc, mask=mask0)


def launch_config(n_cols: int, backward: bool = False) -> dict:
    """Block and warps for rows of ``n_cols`` (the shipped configurations; ``n_cols <= MAX_COLS``).

    About 8 fp32 values per thread and tensor (16 for the forward's 8192-wide rows).  The
    backward's block is at most ``BWD_MAX_BLOCK``; a longer row loops over blocks (``LOOPED``)."""
    assert 1 <= n_cols <= MAX_COLS
    block = max(16, triton.next_power_of_2(n_cols))
    looped = False
    if backward and block > BWD_MAX_BLOCK:
        block, looped = BWD_MAX_BLOCK, True
    cfg = {"BLOCK_C": block, "num_warps": min(16, max(1, block // 256))}
    # Registers a thread may use when one block fills the SM's 64K: ptxas, left to itself, kept
    # the 16-warp forward at 64 and spilled (sm_80, dropout on, 8192 columns).
    cfg["maxnreg"] = min(255, 65536 // (32 * cfg["num_warps"]))
    if backward:
        cfg["LOOPED"] = looped
    return cfg


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def bwd_programs(n_rows: int, device: torch.device, num_warps: int) -> int:
    """Programs of the backward grid: enough resident threads to stream memory (about 1024
    per SM), few enough that the [programs, C] partial-sum buffer stays a small fraction of
    the traffic.  Fixed per device, so results are bit-reproducible."""
    if device.type == "cuda":
        target = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        target *= max(1, 32 // num_warps)
    else:
        target = 4  # the interpreter: a few programs, so the cross-program reduction is exercised
    return max(1, min(n_rows, target))


def dropout_add_layer_norm_fwd(x, residual, weight, bias, *, eps: float, dropout_p: float, seed: int,
                               store_h: bool):
    """Forward on 2-D (rows, C) tensors with unit column stride.

    Returns (y, h, mean, rstd): y contiguous in x's dtype; h contiguous in x's dtype
    when ``store_h`` else None; mean, rstd float32 of shape (rows,)."""
    n_rows, n_cols = x.shape
    dev = x.device
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=dev)
    h = torch.empty((n_rows, n_cols), dtype=x.dtype, device=dev) if store_h else None
    mean = torch.empty(n_rows, dtype=torch.float32, device=dev)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=dev)
    if n_rows == 0:
        return y, h, mean, rstd
    cfg = launch_config(n_cols)
    p = float(dropout_p)
    _dropout_add_layer_norm_fwd_kernel[(n_rows,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, y, h if h is not None else y, mean, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), h.stride(0) if store_h else 0,
        n_cols, float(eps), dropout_threshold(p), dropout_scale(p), int(seed),
        BLOCK_C=cfg["BLOCK_C"], HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, STORE_H=store_h,
        num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"],
    )
    return y, h, mean, rstd


def dropout_add_layer_norm_bwd(dy, dh_in, h, weight, mean, rstd, *, dropout_p: float, seed: int,
                               has_residual: bool, has_bias: bool):
    """Backward on 2-D (rows, C) tensors with unit column stride; ``h`` is the normalised input.

    Returns (dx, dresidual or None, dweight or None, dbias or None): dx and dresidual
    contiguous in h's dtype; dweight in weight's dtype, dbias in h's dtype (fp32 sums of
    per-program partials)."""
    n_rows, n_cols = h.shape
    dev = h.device
    dx = torch.empty((n_rows, n_cols), dtype=h.dtype, device=dev)
    dres = torch.empty((n_rows, n_cols), dtype=h.dtype, device=dev) if has_residual else None
    cfg = launch_config(n_cols, backward=True)
    grid = bwd_programs(n_rows, dev, cfg["num_warps"])
    rows_per_program = triton.cdiv(n_rows, grid) if n_rows else 0
    grid = triton.cdiv(n_rows, rows_per_program) if n_rows else 0
    dw_part = torch.empty((grid, n_cols), dtype=torch.float32, device=dev) if weight is not None else None
    db_part = torch.empty((grid, n_cols), dtype=torch.float32, device=dev) if has_bias else None
    if grid > 0:
        p = float(dropout_p)
        _dropout_add_layer_norm_bwd_kernel[(grid,)](
            dy, dh_in if dh_in is not None else dy, h, weight if weight is not None else h, mean, rstd,
            dx, dres if dres is not None else dx,
            dw_part if dw_part is not None else mean, db_part if db_part is not None else mean,
            dy.stride(0), dh_in.stride(0) if dh_in is not None else 0, h.stride(0), dx.stride(0),
            dres.stride(0) if dres is not None else 0,
            n_rows, n_cols, rows_per_program, dropout_threshold(p), dropout_scale(p), int(seed),
            BLOCK_C=cfg["BLOCK_C"], LOOPED=cfg["LOOPED"], HAS_DH_IN=dh_in is not None,
            HAS_RESIDUAL=has_residual, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DROPOUT=p > 0.0,
            num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"],
        )
    dw = db = None
    if weight is not None:
        dw = (dw_part.sum(0) if grid else torch.zeros(n_cols, device=dev)).to(weight.dtype)
    if has_bias:
        db = (db_part.sum(0) if grid else torch.zeros(n_cols, device=dev)).to(h.dtype)
    return dx, dres, dw, db
