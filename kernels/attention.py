"""Fused softmax attention, forward and backward: dense, causal and banded in one kernel family.

    S = scale * Q K^T,  P = softmax(S masked to the band and the key padding),
    O = dropout(P) V,   lse_i = log sum_j exp(S_ij)  (natural log, over visible keys)

for q (B, Hq, Nq, D) and k, v (B, Hkv, Nk, D) with Hq a multiple of Hkv (grouped-
query attention: query head h reads key/value head h // (Hq // Hkv); k and v are
never copied).  The layout is that of ``torch.nn.functional.scaled_dot_product_attention``.

The band.  Query i sits at key position i + (Nk - Nq) (bottom-right aligned, as
in FlashAttention-2); key j is visible iff

    (left  == -1 or j >= i + (Nk - Nq) - left) and
    (right == -1 or j <= i + (Nk - Nq) + right) and not key_padding_mask[b, j].

Causal attention is ``right = 0``.  The band is the loop bounds: every program
computes, from its own block of rows (or keys), the first and last key (or query)
block that can hold a visible pair, and never visits a block outside that range,
in the forward pass and in both backward loops.  Within the range, blocks in
which every pair is visible run an unmasked loop body; only the blocks that cut
the band edges, the key/query tail and (when given) the padding mask pay for a
mask.  Dense attention with lengths that are multiples of the block and no
padding mask therefore runs with no masking at all.  ``count_blocks=True``
returns the number of blocks each program visited, so tests can check this.

The algorithm is FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster Attention
with Better Parallelism and Work Partitioning", 2023):

* forward: one program per (query block, head, batch); an online softmax keeps
  the running row max m and row sum l of exp(S - m) and rescales the fp32
  accumulator, so no N x N buffer exists.  Exponentials are exp2 with log2(e)
  folded into the softmax scale.  A row with no visible key ends with l = 0 and
  is written as o = 0, lse = -inf (the -inf - -inf cases are guarded, no NaN).
* backward, deterministic, no atomics: a preprocess computes
  delta_i = rowsum(dO_i * O_i) (which equals rowsum(P * dP) also with dropout);
  one kernel per key block accumulates dK and dV over the query blocks of its band
  and over the Hq/Hkv query heads that share the key/value head; one kernel per
  query block accumulates dQ over the key blocks of its band.  P is recomputed
  from the saved lse.

Dropout acts on the normalised probabilities, with the mask of kernels/dropout.py (eight
16-bit decisions per Philox call) over rows ``(b*Hq + h)*Nq + i`` and columns ``j`` of
Nk: kept iff the element's number is >= ``dropout_threshold``, kept values scaled by
``dropout_scale``; the backward regenerates the same mask.  ``leedl_fast.random.dropout_keep``
reproduces it bit for bit in PyTorch.

Precision: fp16/bf16/fp32 inputs, fp32 accumulation and softmax statistics.  For
fp32 inputs ``tl.dot`` uses TF32 tensor-core products on the GPU (10-bit
mantissa, Triton's default ``input_precision="tf32"``); the Triton interpreter
computes them in full fp32.  Head dims 16..256 of any size: the head dim is
padded to the next power of two inside the kernel (masked loads and stores on d).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dropout import dropout_threshold, dropout_scale, keep_tile

__all__ = ["attention_fwd", "attention_bwd", "launch_configs", "LOG2E"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# One binary per configuration, and it is the one tests/kernels/test_attention_compile.py
# checks.  Triton's launcher specialises an int argument that is divisible by 16 (or equal to
# 1, which becomes a constant) and a 16-byte aligned pointer, and types an int by its value
# (i32 or i64).  The sizes, the window and the seed are therefore never specialised and the
# seed is always i64; every pointer and every stride is made 16-aligned by the launchers
# (_prep, _empty, _kpm), so each kernel always runs its vectorised, aligned variant.
RUNTIME_INTS = ["n_heads", "group", "seq_q", "seq_k", "window_left", "window_right", "dropout_threshold", "seed",
                "batch_offset"]
ALIGN = 16  # elements (strides) and bytes (pointers), as Triton's tt.divisibility
HEAD_DIM_STEP = 8  # the kernels' HEAD_DIM is a multiple of this (kernel_head_dim)
# ptxas's register cap (Triton's maxnreg) on the fp32 launches, as the compile checks compile them: the
# most a thread of a 256-thread block can have.  Left to itself ptxas held the fp32 forward at 128
# registers on sm_90 and spilled at head dims 72..120 (6 LDL/STL; 138 registers and none with the cap).
# The 16-bit launches state none: with the cap the sm_90 dK/dV tile at head dim 256 spilled (4 LDL/STL),
# without it not.
MAXNREG_FP32 = 255


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(base, start, offs_l, n_rows, stride_r, offs_d,
               CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ZERO_PAD: tl.constexpr):
    """Rows ``start + offs_l`` of a (rows, HEAD_DIM) matrix with unit stride along d, padded to BLOCK_D
    columns.  Row offsets are int64: rows * stride may pass 2**31 for permuted layouts.  (Hoisting
    int32 in-block offsets out of the loops instead was measured to raise register pressure and
    spills with triton 3.6.)

    ZERO_PAD: columns HEAD_DIM..BLOCK_D-1 are zeros (a column mask).  Without it they are copies of
    columns 0, 1, ... (column ``d % HEAD_DIM``): a load with no column mask, in bounds, which
    compiles like the load of an unpadded tile.  That is for the tiles the loops load: each meets,
    in every product, either a zero-padded operand (Q K^T with Q zero-padded) or an output whose
    padded columns are never stored (P V, dS Q, P^T dO, dS K).  With column masks in the loops the
    dK/dV kernel spilled at head dims 72 to 120 (sm_80, sm_90) and 136 to 248 (sm_90), and dQ at 136
    to 248 (sm_90), with triton 3.6; without them sm_90 compiles 72 to 120 as it compiles 128, and
    the other spills shrank to what _CONFIGS_PADDED's tiles remove."""
    offs_r = start + offs_l                                                         # [R]
    if HEAD_DIM == BLOCK_D or ZERO_PAD:
        cols = offs_d                                                               # [BLOCK_D]
    else:
        cols = offs_d % HEAD_DIM                                                    # [BLOCK_D]
    ptrs = base + (offs_r.to(tl.int64) * stride_r)[:, None] + cols[None, :]        # [R, BLOCK_D]
    if HEAD_DIM == BLOCK_D or not ZERO_PAD:
        if CHECK_ROWS:
            t = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            t = tl.load(ptrs)
    else:
        if CHECK_ROWS:
            t = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return t


@triton.jit
def _store_tile(base, value, start, offs_l, n_rows, stride_r, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_r = start + offs_l                                                         # [R]
    ptrs = base + (offs_r.to(tl.int64) * stride_r)[:, None] + offs_d[None, :]      # [R, BLOCK_D]
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, value, mask=offs_r[:, None] < n_rows)
    else:
        tl.store(ptrs, value, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_block_range(row_first, row_last, seq_k, window_left, window_right,
                     BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks for the query rows at (shifted) positions row_first..row_last.

    Returns (lo, hi, full_lo, full_hi): keys [lo, hi) hold every visible key of these
    rows (lo block-aligned); the blocks in [full_lo, full_hi) are visible to every row
    and lie inside [0, seq_k).  Integer divisions only see non-negative operands
    (the interpreter floors, the compiler truncates)."""
    lo = row_first * 0
    hi = lo + seq_k
    full_lo = lo
    full_hi = (hi // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(row_first - window_left, 0) // BLOCK_N) * BLOCK_N
        full_lo = ((tl.maximum(row_last - window_left, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(row_last + window_right + 1, 0), seq_k)
        full_hi = tl.minimum(full_hi, (tl.maximum(row_first + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    return lo, hi, full_lo, full_hi


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i, n_visited, q,
    k_base, v_base, kpm_base, stride_kn, stride_vn,
    offs_m, offs_d, start_a, n_a, start_b, n_iter, seq_k, shift, window_left, window_right,
    qk_scale, rng_rows, dropout_threshold, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)                                                 # [BLOCK_N]
    for it in range(0, n_iter):
        # Masked: blocks [start_a, start_a + n_a * BLOCK_N) then from start_b on.
        start_n = tl.where(it < n_a, start_a + it * BLOCK_N, start_b + (it - n_a) * BLOCK_N)
        offs_n = start_n + offs_n0                                                  # [BLOCK_N]
        k = _load_tile(k_base, start_n, offs_n0, seq_k, stride_kn, offs_d, MASKED, HEAD_DIM, BLOCK_D, False)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k)) * qk_scale                                      # [BLOCK_M, BLOCK_N] log2 units
        if MASKED:
            visible = offs_n[None, :] < seq_k                                       # [1, BLOCK_N]
            if HAS_LEFT:
                visible = visible & (offs_n[None, :] >= (offs_m + shift - window_left)[:, None])   # [BLOCK_M, BLOCK_N]
            if HAS_RIGHT:
                visible = visible & (offs_n[None, :] <= (offs_m + shift + window_right)[:, None])  # [BLOCK_M, BLOCK_N]
            if HAS_KPM:
                pad = tl.load(kpm_base + offs_n, mask=offs_n < seq_k, other=1)      # [BLOCK_N]
                visible = visible & (pad == 0)[None, :]
            s = tl.where(visible, s, -float("inf"))                                 # [BLOCK_M, BLOCK_N]
        elif HAS_KPM:
            pad = tl.load(kpm_base + offs_n)                                        # [BLOCK_N]
            s = tl.where((pad == 0)[None, :], s, -float("inf"))                     # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))                                       # [BLOCK_M]
        if MASKED or HAS_KPM:
            # A row that has seen no visible key yet keeps m = -inf: subtract 0 instead
            # so that exp2(-inf - -inf) never makes a NaN (p and alpha come out 0).
            m_sub = tl.where(m_new == -float("inf"), 0.0, m_new)                    # [BLOCK_M]
        else:
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])                                             # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_sub)                                                # [BLOCK_M]
        l_i = l_i * alpha + tl.sum(p, 1)                                            # [BLOCK_M]
        acc = acc * alpha[:, None]                                                  # [BLOCK_M, BLOCK_D]
        if DROPOUT:
            keep = keep_tile(seed, rng_rows, start_n, dropout_threshold, BLOCK_M, BLOCK_N)  # [BLOCK_M, BLOCK_N]
            p = tl.where(keep, p, 0.0)                                              # [BLOCK_M, BLOCK_N]
        v = _load_tile(v_base, start_n, offs_n0, seq_k, stride_vn, offs_d, MASKED, HEAD_DIM, BLOCK_D, False)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc)                                         # [BLOCK_M, BLOCK_D]
        m_i = m_new
        n_visited += 1
    return acc, l_i, m_i, n_visited


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr, count_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_kpmb,
    n_heads, group, seq_q, seq_k,
    qk_scale, window_left, window_right, dropout_threshold, dropout_scale, seed: tl.int64, batch_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    COUNT_BLOCKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if HAS_RIGHT and not HAS_LEFT:
        # Causal-like: later query blocks visit more keys; launch them first.
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    hk = h // group
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    kpm_base = kpm_ptr + b64 * stride_kpmb

    offs_m0 = tl.arange(0, BLOCK_M)                                                 # [BLOCK_M]
    offs_m = start_m + offs_m0                                                      # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)                                                  # [BLOCK_D]
    q = _load_tile(q_base, start_m, offs_m0, seq_q, stride_qm, offs_d, True, HEAD_DIM, BLOCK_D, True)  # [BLOCK_M, BLOCK_D]

    shift = seq_k - seq_q
    row_last = tl.minimum(start_m + BLOCK_M, seq_q) - 1 + shift
    lo, hi, full_lo, full_hi = _key_block_range(start_m + shift, row_last, seq_k, window_left, window_right,
                                                BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # The dropout counters number the rows of the whole batch: a launch over rows batch_offset.. of it
    # gets pointers to its first row (see _batch_chunks).
    rng_rows = (((b64 + batch_offset) * n_heads + h) * seq_q + offs_m) * ((seq_k - 1) // 8 + 1)  # [BLOCK_M] int64

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)                             # [BLOCK_M] running max (log2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                                           # [BLOCK_M] running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                                  # [BLOCK_M, BLOCK_D]
    n_visited = 0
    # Edges of the band and the key tail, masked, in one loop; then the interior, where every
    # pair is visible and no band mask is computed.
    n_lead = (tl.maximum(tl.minimum(full_lo, hi) - lo, 0) + BLOCK_N - 1) // BLOCK_N
    tail = tl.maximum(full_lo, full_hi)
    n_edge = n_lead + (tl.maximum(hi - tail, 0) + BLOCK_N - 1) // BLOCK_N
    n_full = tl.maximum(full_hi - full_lo, 0) // BLOCK_N
    acc, l_i, m_i, n_visited = _attention_fwd_inner(
        acc, l_i, m_i, n_visited, q, k_base, v_base, kpm_base, stride_kn, stride_vn,
        offs_m, offs_d, lo, n_lead, tail, n_edge, seq_k, shift, window_left, window_right,
        qk_scale, rng_rows, dropout_threshold, seed,
        BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT)
    acc, l_i, m_i, n_visited = _attention_fwd_inner(
        acc, l_i, m_i, n_visited, q, k_base, v_base, kpm_base, stride_kn, stride_vn,
        offs_m, offs_d, full_lo, n_full, full_lo, n_full, seq_k, shift, window_left, window_right,
        qk_scale, rng_rows, dropout_threshold, seed,
        BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT)

    # Rows with no visible key: l = 0 -> o = 0, lse = -inf.
    empty = l_i == 0.0                                                              # [BLOCK_M]
    l_safe = tl.where(empty, 1.0, l_i)                                              # [BLOCK_M]
    if DROPOUT:
        inv_l = dropout_scale / l_safe                                              # [BLOCK_M]
    else:
        inv_l = 1.0 / l_safe                                                        # [BLOCK_M]
    o = acc * inv_l[:, None]                                                        # [BLOCK_M, BLOCK_D]
    o_base = o_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh
    _store_tile(o_base, o.to(o_ptr.dtype.element_ty), start_m, offs_m0, seq_q, stride_om, offs_d, HEAD_DIM, BLOCK_D)
    lse = tl.where(empty, -float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # [BLOCK_M] natural log
    row = (b64 * n_heads + h) * seq_q
    tl.store(lse_ptr + row + offs_m, lse, mask=offs_m < seq_q)
    if COUNT_BLOCKS:
        tl.store(count_ptr + (b64 * n_heads + h) * tl.num_programs(0) + pid_m, n_visited)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, lse_ptr, delta_ptr, lse2_ptr,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    n_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O); lse2 = lse * log2(e), +inf for rows with no visible key
    (so that exp2(s - lse2) is 0 for them instead of a NaN)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m0 = tl.arange(0, BLOCK_M)                                                 # [BLOCK_M]
    offs_m = start_m + offs_m0                                                      # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)                                                  # [BLOCK_D]
    o = _load_tile(o_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh, start_m, offs_m0, seq_q, stride_om, offs_d,
                   True, HEAD_DIM, BLOCK_D, True).to(tl.float32)                    # [BLOCK_M, BLOCK_D]
    do = _load_tile(do_ptr + b64 * stride_dob + h.to(tl.int64) * stride_doh, start_m, offs_m0, seq_q, stride_dom, offs_d,
                    True, HEAD_DIM, BLOCK_D, True).to(tl.float32)                   # [BLOCK_M, BLOCK_D]
    delta = tl.sum(o * do, 1)                                                       # [BLOCK_M]
    row = (b64 * n_heads + h) * seq_q
    mask = offs_m < seq_q
    lse = tl.load(lse_ptr + row + offs_m, mask=mask, other=0.0)                     # [BLOCK_M]
    lse2 = tl.where(lse == -float("inf"), float("inf"), lse * 1.4426950408889634)   # [BLOCK_M]
    tl.store(delta_ptr + row + offs_m, delta, mask=mask)
    tl.store(lse2_ptr + row + offs_m, lse2, mask=mask)


@triton.jit
def _attention_bwd_dkdv_inner(
    dk, dv, n_visited, k, v, pad_ok,
    q_base, do_base, lse2_base, delta_base, stride_qm, stride_dom,
    start_n, offs_n, offs_d, start_a, n_a, start_b, n_iter, seq_q, seq_k, shift, window_left, window_right,
    qk_scale, rng_head, dropout_threshold, dropout_scale, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)                                                 # [BLOCK_M]
    for it in range(0, n_iter):
        start_m = tl.where(it < n_a, start_a + it * BLOCK_M, start_b + (it - n_a) * BLOCK_M)
        offs_m = start_m + offs_m0                                                  # [BLOCK_M]
        q = _load_tile(q_base, start_m, offs_m0, seq_q, stride_qm, offs_d, MASKED, HEAD_DIM, BLOCK_D, False)     # [BLOCK_M, BLOCK_D]
        do = _load_tile(do_base, start_m, offs_m0, seq_q, stride_dom, offs_d, MASKED, HEAD_DIM, BLOCK_D, False)  # [BLOCK_M, BLOCK_D]
        if MASKED:
            # Rows past seq_q: lse2 = +inf makes their p exactly 0.
            lse2 = tl.load(lse2_base + offs_m, mask=offs_m < seq_q, other=float("inf"))  # [BLOCK_M]
        else:
            lse2 = tl.load(lse2_base + offs_m)                                      # [BLOCK_M]
        s_t = tl.dot(k, tl.trans(q))                                                # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])                               # [BLOCK_N, BLOCK_M]
        if MASKED:
            visible = offs_m[None, :] < seq_q                                       # [1, BLOCK_M]
            if HAS_LEFT:
                visible = visible & (offs_n[:, None] >= (offs_m + shift - window_left)[None, :])   # [BLOCK_N, BLOCK_M]
            if HAS_RIGHT:
                visible = visible & (offs_n[:, None] <= (offs_m + shift + window_right)[None, :])  # [BLOCK_N, BLOCK_M]
            if HAS_KPM:
                visible = visible & pad_ok[:, None]
            p_t = tl.where(visible, p_t, 0.0)                                       # [BLOCK_N, BLOCK_M]
        elif HAS_KPM:
            p_t = tl.where(pad_ok[:, None], p_t, 0.0)                               # [BLOCK_N, BLOCK_M]
        if DROPOUT:
            rows = rng_head + offs_m.to(tl.int64) * ((seq_k - 1) // 8 + 1)             # [BLOCK_M] first counters
            keep = keep_tile(seed, rows, start_n, dropout_threshold, BLOCK_M, BLOCK_N, True)  # [BLOCK_N, BLOCK_M]
        if DO_DV:
            if DROPOUT:
                dv = tl.dot(tl.where(keep, p_t * dropout_scale, 0.0).to(do.dtype), do, dv)  # [BLOCK_N, BLOCK_D]
            else:
                dv = tl.dot(p_t.to(do.dtype), do, dv)                               # [BLOCK_N, BLOCK_D]
        if DO_DK:
            if MASKED:
                delta = tl.load(delta_base + offs_m, mask=offs_m < seq_q, other=0.0)  # [BLOCK_M]
            else:
                delta = tl.load(delta_base + offs_m)                                # [BLOCK_M]
            dp_t = tl.dot(v, tl.trans(do))                                          # [BLOCK_N, BLOCK_M]
            if DROPOUT:
                dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)                         # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])                                    # [BLOCK_N, BLOCK_M]
            dk = tl.dot(ds_t.to(q.dtype), q, dk)                                    # [BLOCK_N, BLOCK_D]
        n_visited += 1
    return dk, dv, n_visited


@triton.jit
def _attention_bwd_dkdv_heads(
    dk, dv, k, v, pad_ok, hk, b64,
    q_ptr, do_ptr, lse2_ptr, delta_ptr, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
    start_n, offs_n, offs_d, lo, n_lead, tail, n_edge, full_lo, n_full,
    n_heads, group, seq_q, seq_k, shift, window_left, window_right, qk_scale, dropout_threshold, dropout_scale, seed,
    batch_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr,
):
    """dK and/or dV of one key block over the query heads of its group: the band's edge blocks
    (masked), then its interior (unmasked)."""
    n_visited = 0
    for g in range(0, group):
        h = hk * group + g
        h64 = h.to(tl.int64)
        q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
        do_base = do_ptr + b64 * stride_dob + h64 * stride_doh
        row = (b64 * n_heads + h64) * seq_q
        rng_head = (row + batch_offset.to(tl.int64) * n_heads * seq_q) * ((seq_k - 1) // 8 + 1)
        dk, dv, n_visited = _attention_bwd_dkdv_inner(
            dk, dv, n_visited, k, v, pad_ok, q_base, do_base, lse2_ptr + row, delta_ptr + row, stride_qm, stride_dom,
            start_n, offs_n, offs_d, lo, n_lead, tail, n_edge, seq_q, seq_k, shift, window_left, window_right,
            qk_scale, rng_head, dropout_threshold, dropout_scale, seed,
            BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT, DO_DK, DO_DV)
        dk, dv, n_visited = _attention_bwd_dkdv_inner(
            dk, dv, n_visited, k, v, pad_ok, q_base, do_base, lse2_ptr + row, delta_ptr + row, stride_qm, stride_dom,
            start_n, offs_n, offs_d, full_lo, n_full, full_lo, n_full, seq_q, seq_k, shift, window_left, window_right,
            qk_scale, rng_head, dropout_threshold, dropout_scale, seed,
            BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT, DO_DK, DO_DV)
    return dk, dv, n_visited


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr, count_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_kpmb,
    n_heads, group, seq_q, seq_k,
    qk_scale, sm_scale, window_left, window_right, dropout_threshold, dropout_scale, seed: tl.int64, batch_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    COUNT_BLOCKS: tl.constexpr, SPLIT_DKDV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n0 = tl.arange(0, BLOCK_N)                                                 # [BLOCK_N]
    offs_n = start_n + offs_n0                                                      # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)                                                  # [BLOCK_D]
    k = _load_tile(k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh, start_n, offs_n0, seq_k, stride_kn, offs_d,
                   True, HEAD_DIM, BLOCK_D, True)                                   # [BLOCK_N, BLOCK_D]
    if HAS_KPM:
        pad = tl.load(kpm_ptr + b64 * stride_kpmb + offs_n, mask=offs_n < seq_k, other=1)  # [BLOCK_N]
        pad_ok = pad == 0
    else:
        pad_ok = offs_n < seq_k

    # Query i (key position i + shift) sees key j iff j - right <= i + shift <= j + left.
    # Keys past seq_k need no mask here: their dk/dv rows are computed and dropped.
    shift = seq_k - seq_q
    key_last = tl.minimum(start_n + BLOCK_N, seq_k) - 1
    lo = start_n * 0
    hi = lo + seq_q
    full_lo = lo
    full_hi = (hi // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = (tl.maximum(start_n - window_right - shift, 0) // BLOCK_M) * BLOCK_M
        full_lo = ((tl.maximum(key_last - window_right - shift, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(tl.maximum(key_last + window_left - shift + 1, 0), seq_q)
        full_hi = tl.minimum(full_hi, (tl.maximum(start_n + window_left - shift + 1, 0) // BLOCK_M) * BLOCK_M)

    n_lead = (tl.maximum(tl.minimum(full_lo, hi) - lo, 0) + BLOCK_M - 1) // BLOCK_M
    tail = tl.maximum(full_lo, full_hi)
    n_edge = n_lead + (tl.maximum(hi - tail, 0) + BLOCK_M - 1) // BLOCK_M
    n_full = tl.maximum(full_hi - full_lo, 0) // BLOCK_M
    dk_base = dk_ptr + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh
    dv_base = dv_ptr + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    zero = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)                                 # [BLOCK_N, BLOCK_D]
    if SPLIT_DKDV:
        unused = tl.zeros([1, 1], tl.float32)  # stands in for the accumulator a pass does not compute
        # Two passes over the band, dV then dK, each with one [BLOCK_N, BLOCK_D] fp32
        # accumulator instead of two: at head dim 256 the pair (2 x 64 x 256 fp32 over 256
        # threads = 128 registers) with the K, V and dot-operand tiles spilled.  The dV pass
        # recomputes S (one extra Q K^T product per block pair); its block count is not added
        # again, so the counts stay those of one pass.
        _, dv, _ = _attention_bwd_dkdv_heads(
            unused, zero, k, k, pad_ok, hk, b64, q_ptr, do_ptr, lse2_ptr, delta_ptr,
            stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
            start_n, offs_n, offs_d, lo, n_lead, tail, n_edge, full_lo, n_full,
            n_heads, group, seq_q, seq_k, shift, window_left, window_right, qk_scale, dropout_threshold, dropout_scale,
            seed, batch_offset, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT, False, True)
        _store_tile(dv_base, dv.to(dv_ptr.dtype.element_ty), start_n, offs_n0, seq_k, stride_dvn, offs_d, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_base, start_n, offs_n0, seq_k, stride_vn, offs_d, True, HEAD_DIM, BLOCK_D, True)  # [BLOCK_N, BLOCK_D]
        dk, _, n_visited = _attention_bwd_dkdv_heads(
            zero, unused, k, v, pad_ok, hk, b64, q_ptr, do_ptr, lse2_ptr, delta_ptr,
            stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
            start_n, offs_n, offs_d, lo, n_lead, tail, n_edge, full_lo, n_full,
            n_heads, group, seq_q, seq_k, shift, window_left, window_right, qk_scale, dropout_threshold, dropout_scale,
            seed, batch_offset, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT, True, False)
    else:
        v = _load_tile(v_base, start_n, offs_n0, seq_k, stride_vn, offs_d, True, HEAD_DIM, BLOCK_D, True)  # [BLOCK_N, BLOCK_D]
        dk, dv, n_visited = _attention_bwd_dkdv_heads(
            zero, zero, k, v, pad_ok, hk, b64, q_ptr, do_ptr, lse2_ptr, delta_ptr,
            stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
            start_n, offs_n, offs_d, lo, n_lead, tail, n_edge, full_lo, n_full,
            n_heads, group, seq_q, seq_k, shift, window_left, window_right, qk_scale, dropout_threshold, dropout_scale,
            seed, batch_offset, BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT, True, True)
        _store_tile(dv_base, dv.to(dv_ptr.dtype.element_ty), start_n, offs_n0, seq_k, stride_dvn, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(dk_base, (dk * sm_scale).to(dk_ptr.dtype.element_ty), start_n, offs_n0, seq_k, stride_dkn, offs_d, HEAD_DIM, BLOCK_D)
    if COUNT_BLOCKS:
        n_kv_heads = tl.num_programs(1)
        tl.store(count_ptr + (b64 * n_kv_heads + hk) * tl.num_programs(0) + pid_n, n_visited)


@triton.jit
def _attention_bwd_dq_inner(
    dq, n_visited, q, do, lse2, delta,
    k_base, v_base, kpm_base, stride_kn, stride_vn,
    offs_m, offs_d, start_a, n_a, start_b, n_iter, seq_k, shift, window_left, window_right,
    qk_scale, rng_rows, dropout_threshold, dropout_scale, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)                                                 # [BLOCK_N]
    for it in range(0, n_iter):
        start_n = tl.where(it < n_a, start_a + it * BLOCK_N, start_b + (it - n_a) * BLOCK_N)
        offs_n = start_n + offs_n0                                                  # [BLOCK_N]
        k = _load_tile(k_base, start_n, offs_n0, seq_k, stride_kn, offs_d, MASKED, HEAD_DIM, BLOCK_D, False)  # [BLOCK_N, BLOCK_D]
        v = _load_tile(v_base, start_n, offs_n0, seq_k, stride_vn, offs_d, MASKED, HEAD_DIM, BLOCK_D, False)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k))                                                  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(s * qk_scale - lse2[:, None])                                   # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = offs_n[None, :] < seq_k                                       # [1, BLOCK_N]
            if HAS_LEFT:
                visible = visible & (offs_n[None, :] >= (offs_m + shift - window_left)[:, None])   # [BLOCK_M, BLOCK_N]
            if HAS_RIGHT:
                visible = visible & (offs_n[None, :] <= (offs_m + shift + window_right)[:, None])  # [BLOCK_M, BLOCK_N]
            if HAS_KPM:
                pad = tl.load(kpm_base + offs_n, mask=offs_n < seq_k, other=1)      # [BLOCK_N]
                visible = visible & (pad == 0)[None, :]
            p = tl.where(visible, p, 0.0)                                           # [BLOCK_M, BLOCK_N]
        elif HAS_KPM:
            pad = tl.load(kpm_base + offs_n)                                        # [BLOCK_N]
            p = tl.where((pad == 0)[None, :], p, 0.0)                               # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, tl.trans(v))                                                # [BLOCK_M, BLOCK_N]
        if DROPOUT:
            keep = keep_tile(seed, rng_rows, start_n, dropout_threshold, BLOCK_M, BLOCK_N)  # [BLOCK_M, BLOCK_N]
            dp = tl.where(keep, dp * dropout_scale, 0.0)                            # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])                                              # [BLOCK_M, BLOCK_N]
        dq = tl.dot(ds.to(k.dtype), k, dq)                                          # [BLOCK_M, BLOCK_D]
        n_visited += 1
    return dq, n_visited


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dq_ptr, kpm_ptr, count_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_kpmb,
    n_heads, group, seq_q, seq_k,
    qk_scale, sm_scale, window_left, window_right, dropout_threshold, dropout_scale, seed: tl.int64, batch_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
    COUNT_BLOCKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if HAS_RIGHT and not HAS_LEFT:
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    hk = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M)                                                 # [BLOCK_M]
    offs_m = start_m + offs_m0                                                      # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)                                                  # [BLOCK_D]
    q = _load_tile(q_ptr + b64 * stride_qb + h64 * stride_qh, start_m, offs_m0, seq_q, stride_qm, offs_d,
                   True, HEAD_DIM, BLOCK_D, True)                                   # [BLOCK_M, BLOCK_D]
    do = _load_tile(do_ptr + b64 * stride_dob + h64 * stride_doh, start_m, offs_m0, seq_q, stride_dom, offs_d,
                    True, HEAD_DIM, BLOCK_D, True)                                  # [BLOCK_M, BLOCK_D]
    row = (b64 * n_heads + h64) * seq_q
    lse2 = tl.load(lse2_ptr + row + offs_m, mask=offs_m < seq_q, other=float("inf"))  # [BLOCK_M]
    delta = tl.load(delta_ptr + row + offs_m, mask=offs_m < seq_q, other=0.0)        # [BLOCK_M]
    k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    kpm_base = kpm_ptr + b64 * stride_kpmb
    rng_rows = (row + batch_offset.to(tl.int64) * n_heads * seq_q + offs_m) * ((seq_k - 1) // 8 + 1)  # [BLOCK_M] int64

    shift = seq_k - seq_q
    row_last = tl.minimum(start_m + BLOCK_M, seq_q) - 1 + shift
    lo, hi, full_lo, full_hi = _key_block_range(start_m + shift, row_last, seq_k, window_left, window_right,
                                                BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                                   # [BLOCK_M, BLOCK_D]
    n_visited = 0
    n_lead = (tl.maximum(tl.minimum(full_lo, hi) - lo, 0) + BLOCK_N - 1) // BLOCK_N
    tail = tl.maximum(full_lo, full_hi)
    n_edge = n_lead + (tl.maximum(hi - tail, 0) + BLOCK_N - 1) // BLOCK_N
    n_full = tl.maximum(full_hi - full_lo, 0) // BLOCK_N
    dq, n_visited = _attention_bwd_dq_inner(
        dq, n_visited, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn,
        offs_m, offs_d, lo, n_lead, tail, n_edge, seq_k, shift, window_left, window_right,
        qk_scale, rng_rows, dropout_threshold, dropout_scale, seed,
        BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, True, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT)
    dq, n_visited = _attention_bwd_dq_inner(
        dq, n_visited, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn,
        offs_m, offs_d, full_lo, n_full, full_lo, n_full, seq_k, shift, window_left, window_right,
        qk_scale, rng_rows, dropout_threshold, dropout_scale, seed,
        BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, False, HAS_LEFT, HAS_RIGHT, HAS_KPM, DROPOUT)
    dq_base = dq_ptr + b64 * stride_dqb + h64 * stride_dqh
    _store_tile(dq_base, (dq * sm_scale).to(dq_ptr.dtype.element_ty), start_m, offs_m0, seq_q, stride_dqm, offs_d, HEAD_DIM, BLOCK_D)
    if COUNT_BLOCKS:
        tl.store(count_ptr + (b64 * n_heads + h64) * tl.num_programs(0) + pid_m, n_visited)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head-dim group (padded head dim
# <= 64, 128, 256) and GPU generation ("sm80": Ampere and every GPU but Hopper, see _arch; "sm90":
# Hopper), for fp16/bf16.  fp32 (TF32 products, twice the bytes per tile) uses one small
# configuration per kernel for every head dim.  For the dK/dV kernel BLOCK_N is the key block
# a program owns and BLOCK_M the query block it steps over; for dQ the reverse.
#
# How they were chosen (no GPU was available to time them): tile shapes of the Triton
# fused-attention tutorial and FlashAttention-2 (BLOCK_M 128 for the forward, 8 warps at
# D = 128), shrunk until every configuration compiled with triton 3.6 for its target with no
# register spills in the variant with the most live state (band, key padding and dropout), and with BLOCK_M
# (forward, dQ) or BLOCK_N (dK/dV) >= 64 so that fp16/bf16 products use HGMMA on sm_90.
# Compiled with the launcher's specialization for aligned inputs (16-byte aligned pointers,
# strides multiples of 16), which vectorises the loads; see test_attention_compile.py.
# Head dim 256: the largest spill-free tiles found in a sweep of BLOCK_M, BLOCK_N in 16..128,
# 4/8 warps, 1-3 stages (sm_90 forward 128 x 32 at 244 registers, dQ 128 x 32 at 255; dK/dV
# 16 x 64 in two passes, see _SPLIT_DKDV).  On sm_80 the tiles also keep shared memory under
# the ~99 KB per block of the sm_86/sm_89 parts this entry serves as well (64 x 64 forward
# tiles compile spill-free but take 104 KB).  dK/dV on sm_80 at head dim 128: BLOCK_M 32
# (FlashAttention-2 steps over 64 query rows there; 64 spills with triton 3.6); at 64 and
# 256 BLOCK_M 32 spilled, so 16 stays.  dK/dV on sm_90 at 128: 32 x 64 spilled once the loads
# were vectorised; 16 x 128 does not.  dQ on sm_90 at 128: 128 x 32, the Triton tutorial's dQ
# tile, once dropout took one Philox call per eight scores (205 registers; it had been 64 x 16
# when the per-element Philox state did not fit).
# tests/kernels/test_attention_compile.py compiles every entry for its target.
_CONFIGS = {
    "_attention_fwd_kernel": {
        (64, "sm80"): (128, 64, 8, 3), (128, "sm80"): (128, 32, 8, 3), (256, "sm80"): (64, 32, 8, 2),
        (64, "sm90"): (128, 64, 8, 3), (128, "sm90"): (128, 64, 8, 3), (256, "sm90"): (128, 32, 8, 2),
    },
    "_attention_bwd_dkdv_kernel": {
        (64, "sm80"): (16, 64, 8, 2), (128, "sm80"): (32, 64, 8, 2), (256, "sm80"): (16, 32, 8, 1),
        (64, "sm90"): (32, 128, 8, 2), (128, "sm90"): (16, 128, 8, 1), (256, "sm90"): (16, 64, 8, 2),
    },
    "_attention_bwd_dq_kernel": {
        (64, "sm80"): (128, 32, 8, 2), (128, "sm80"): (64, 32, 8, 2), (256, "sm80"): (64, 16, 8, 2),
        (64, "sm90"): (128, 32, 8, 2), (128, "sm90"): (128, 32, 8, 2), (256, "sm90"): (128, 32, 8, 2),
    },
}
# Head dims below the tile's BLOCK_D (kernel_head_dim(D) < BLOCK_D: 40, 80, 96, 160, ...) run
# zero-padded tiles outside the loops, column-wrapped ones inside (_load_tile) and column-masked
# stores, which take a few more registers than the unpadded code.  Where that spilled with the
# entry above, a padded head dim takes the entry below (swept over the padded multiples of 8 of
# the group, triton 3.6): dK/dV on sm_80 at 72..120: 32 x 64 with 2 stages spilled (28 LDL/STL),
# 16 x 64 does not (the tile sm_80 runs at 64 and 256).  dQ on sm_90 at 136..248: 128 x 32
# spilled 8 (64 x 32: 16), 128 x 16 does not.  dK/dV on sm_90 at 136..248: every tile that keeps
# HGMMA spilled (16 x 64 with 8 warps: 8 LDL/STL with 2 stages, 53 with 1, 128 with 3; 4 or 16
# warps, 32 x 64: hundreds), so it takes 16 x 32 with 8 warps, spill-free on HMMA (mma.sync), the
# one entry on sm_90 without HGMMA (untimed: no GPU has measured which of the two is faster).
_CONFIGS_PADDED = {
    "_attention_bwd_dkdv_kernel": {(128, "sm80"): (16, 64, 8, 2), (256, "sm90"): (16, 32, 8, 1)},
    "_attention_bwd_dq_kernel": {(256, "sm90"): (128, 16, 8, 2)},
}
_CONFIGS_FP32 = {
    "_attention_fwd_kernel": (32, 16, 8, 2),
    "_attention_bwd_dkdv_kernel": (16, 16, 8, 2),
    "_attention_bwd_dq_kernel": (16, 16, 8, 2),  # (32, 16, 8, 2) needs 112 KiB of shared memory at D=256: no
}                                               # launch on sm_86/sm_89 (99 KiB per block)
# (head-dim group, arch) where the dK/dV kernel accumulates dV and dK in two passes over the
# band (SPLIT_DKDV) for fp16/bf16: on sm_90 at head dim 256 the two [BLOCK_N, 256] fp32
# accumulators of one pass spilled at every tile that keeps HGMMA (BLOCK_N >= 64 at 8 warps);
# on sm_80 a one-pass tile with BLOCK_N = 32 fits and needs no recomputation.  fp32 uses a
# tile small enough for one pass everywhere.
_SPLIT_DKDV = {(256, "sm90")}
# Under the interpreter one fixed configuration, unequal blocks so that the band arithmetic
# is exercised with BLOCK_M != BLOCK_N: (BLOCK_M, BLOCK_N).
_INTERP = {"_attention_fwd_kernel": (64, 32), "_attention_bwd_dkdv_kernel": (32, 64),
           "_attention_bwd_dq_kernel": (64, 32)}


def block_d_for(head_dim: int) -> int:
    """BLOCK_D, the padded head dim the kernels are compiled for: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def _pre_block_m(block_d: int) -> int:
    return min(64, 4096 // block_d)  # o and do tiles of <= 4096 elements each


def _head_dim_group(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> str:
    """The tile table of a GPU: "sm90" for Hopper only, whose 227 KB of shared memory per block the
    sm90 tiles need (up to 200 KB); "sm80" (within 99 KB) everywhere else, newer GPUs included:
    consumer Blackwell (sm_120) has the 99 KB of sm_86/sm_89."""
    return "sm90" if torch.cuda.get_device_capability(device_index)[0] == 9 else "sm80"


def _split_dkdv(t: torch.Tensor, block_d: int) -> bool:
    """Whether the dK/dV kernel runs its two passes (SPLIT_DKDV): 16-bit inputs in a
    (head-dim group, arch) of _SPLIT_DKDV; under the interpreter 16-bit inputs in any head-dim
    group listed there, so that the interpreter tests exercise the path."""
    if t.dtype == torch.float32:
        return False
    group = _head_dim_group(block_d)
    if not t.is_cuda:
        return any(g == group for g, _ in _SPLIT_DKDV)
    return (group, _arch(t.device.index or 0)) in _SPLIT_DKDV


def _config(kernel: str, t: torch.Tensor, block_d: int, blocks) -> dict:
    """Launch meta-parameters of ``kernel`` for inputs like ``t``.  ``blocks`` (tests and tile
    sweeps only): (BLOCK_M, BLOCK_N), or for the dK/dV kernel optionally (BLOCK_M, BLOCK_N,
    SPLIT_DKDV); or a dict of launch meta-parameters (BLOCK_M, BLOCK_N, num_warps, num_stages,
    optionally SPLIT_DKDV) used as given."""
    split = {"SPLIT_DKDV": _split_dkdv(t, block_d)} if kernel == "_attention_bwd_dkdv_kernel" else {}
    if isinstance(blocks, dict):
        return {**split, **blocks}
    if blocks is not None:
        if len(blocks) == 3:
            split = {"SPLIT_DKDV": blocks[2]}
        return {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], **split}
    if not t.is_cuda:
        bm, bn = _INTERP[kernel]
        return {"BLOCK_M": bm, "BLOCK_N": bn, **split}
    if t.dtype == torch.float32:
        bm, bn, w, s = _CONFIGS_FP32[kernel]
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "maxnreg": MAXNREG_FP32, **split}
    key = (_head_dim_group(block_d), _arch(t.device.index or 0))
    padded = _CONFIGS_PADDED.get(kernel, {}) if kernel_head_dim(t.shape[-1]) < block_d else {}
    bm, bn, w, s = padded.get(key) or _CONFIGS[kernel][key]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, **split}


def launch_configs() -> list[dict]:
    """Every shipped GPU configuration, one dict per entry: kernel, arch ("sm80"/"sm90"),
    block_d (the largest padded head dim it serves), dtype ("16" = fp16/bf16, "32" = fp32),
    BLOCK_M, BLOCK_N, num_warps, num_stages, split_dkdv (the dK/dV kernel's SPLIT_DKDV; False for
    the other kernels), maxnreg (ptxas's register cap, None for ptxas's own), serves: the head dims
    it runs, "full" (kernel_head_dim(D) == BLOCK_D), "padded" (kernel_head_dim(D) < BLOCK_D,
    _CONFIGS_PADDED) or "both"."""
    def entry(kernel, arch, block_d, dtype, tile, serves):
        bm, bn, w, s = tile
        return {"kernel": kernel, "arch": arch, "block_d": block_d, "dtype": dtype, "BLOCK_M": bm, "BLOCK_N": bn,
                "num_warps": w, "num_stages": s, "serves": serves,
                "maxnreg": MAXNREG_FP32 if dtype == "32" else None,
                "split_dkdv": (kernel == "_attention_bwd_dkdv_kernel" and dtype == "16"
                               and (block_d, arch) in _SPLIT_DKDV)}

    out = []
    for kernel, table in _CONFIGS.items():
        for (block_d, arch), tile in table.items():
            padded = _CONFIGS_PADDED.get(kernel, {}).get((block_d, arch))
            out.append(entry(kernel, arch, block_d, "16", tile, "full" if padded else "both"))
            if padded:
                out.append(entry(kernel, arch, block_d, "16", padded, "padded"))
    for kernel, tile in _CONFIGS_FP32.items():
        for arch in ("sm80", "sm90"):
            out.append(entry(kernel, arch, 256, "32", tile, "both"))
    for block_d in (64, 256):
        for arch in ("sm80", "sm90"):
            out.append(entry("_attention_bwd_preprocess_kernel", arch, block_d, "16", (_pre_block_m(block_d), 0, 4, 1),
                             "both"))
    return out


MAX_GRID_YZ = 65535  # CUDA's limit on a grid's second and third dimensions


def _batch_chunks(batch: int, limit: int = MAX_GRID_YZ):
    """(first row, slice) of the batch rows of each launch.  The grids are (blocks, heads, batch
    rows) and CUDA caps the third dimension at 65535 rows, a batch that window attention over image
    patches can pass: such a batch takes several launches, each given views from its first row and
    that row's index (``batch_offset``), which only the dropout counters read, so a chunked launch
    draws the mask a single one would.  A chunk after the first may start off the 16-byte alignment
    of lse (B, H, Nq): Triton then compiles that launch's own (correct) variant."""
    for b0 in range(0, batch, limit):
        yield b0, slice(b0, min(batch, b0 + limit))


def _rows(t: torch.Tensor, rows: slice, used: bool) -> torch.Tensor:
    """``t[rows]`` for a per-batch tensor the kernel reads, else ``t`` itself (an unread stand-in)."""
    return t[rows] if used else t


def _aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` launches the aligned variant: unit last stride, every other stride a multiple
    of ALIGN elements and a 16-byte aligned start."""
    return (t.stride(-1) == 1 and t.data_ptr() % ALIGN == 0
            and all(s % ALIGN == 0 for s in t.stride()[:-1]))


def _empty(shape, dtype, device, zero_pad: bool = False) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose rows start every ALIGN-multiple elements: a view of
    (..., round_up(D, ALIGN)) storage when D is not a multiple of ALIGN (D = 40 rows 48 apart).
    ``zero_pad``: the storage columns past D are zeros."""
    d = shape[-1]
    padded = -(-d // ALIGN) * ALIGN
    buf = torch.empty((*shape[:-1], padded), dtype=dtype, device=device)
    if zero_pad:
        buf[..., d:].zero_()
    return buf[..., :d]


def kernel_head_dim(d: int) -> int:
    """The HEAD_DIM the kernels are compiled with for head dim ``d``: ``d`` rounded up to a multiple of
    HEAD_DIM_STEP, so that a row of a 16-bit tile is whole 16-byte vectors.  The columns past ``d``
    are zeros in the inputs' storage (_prep) and never leave the outputs' storage padding (_empty)."""
    return -(-d // HEAD_DIM_STEP) * HEAD_DIM_STEP


def _prep(t: torch.Tensor, head: bool = True) -> torch.Tensor:
    """``t`` itself when aligned, else a copy in _empty's layout: O(N*D) bytes against the kernels'
    O(N^2*D) work, the price of never running Triton's unaligned (scalar-load) variant.  The head
    dim is padded in storage only, never in the math (FlashAttention-2's interface pads q, k, v to
    a multiple of 8 for the same reason).  For a q, k, v, o or dO (``head``) whose head dim D is not
    a multiple of HEAD_DIM_STEP the copy is always made, with zeros in the storage columns up to
    kernel_head_dim(D), which the kernels read as part of the head: such head dims (20, 77, 100,
    150) then run the code compiled for multiples of 8, whose loads are 16-byte vectors, instead of
    the scalar-load code, which spilled registers (head dims 77, 100 and 150 on sm_90)."""
    ragged = head and t.shape[-1] % HEAD_DIM_STEP != 0
    if _aligned(t) and not ragged:
        return t
    out = _empty(t.shape, t.dtype, t.device, zero_pad=ragged)
    out.copy_(t)
    return out


def _kpm(key_padding_mask, q):
    """(mask as uint8 with an aligned row stride, that stride, HAS_KPM)."""
    if key_padding_mask is None:
        return q, 0, False  # any aligned pointer; never read
    m = key_padding_mask
    m = _prep(m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).to(torch.uint8), head=False)
    return m, m.stride(0), True


def _check_common(q, k, v, left, right):
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, N, D)"
    B, Hq, Nq, D = q.shape
    assert k.shape[0] == B and v.shape[:3] == k.shape[:3] and k.shape[3] == D and v.shape[3] == D
    assert Hq % k.shape[1] == 0, "Hq must be a multiple of Hkv"
    assert 16 <= D <= 256, "head dim must be in [16, 256]"
    assert left >= -1 and right >= -1
    return B, Hq, k.shape[1], Nq, k.shape[2], D


def _band(left: int, right: int, Nq: int, Nk: int) -> tuple[int, int]:
    """The window as the kernels take it: a bound at least as wide as the problem is lowered to the
    problem's size, the same band (left >= Nk - 1 or right >= Nq - 1 already makes every key on
    that side visible).  The kernels' band arithmetic (row + shift + right, key + left - shift + 1,
    ...) is int32: a bound near 2**31 (say 2**31 - 1 for "unbounded") wrapped there and the rows saw
    no key or the wrong ones, and one past 2**31 made Triton type the argument i64, a variant no
    compile check covers."""
    return (left if left <= Nk else Nk), (right if right <= Nq else Nq)


def attention_fwd(q, k, v, *, scale: float, left: int, right: int, key_padding_mask, dropout_p: float, seed: int,
                  count_blocks: bool = False, _blocks: tuple | dict | None = None):
    """Forward pass.  q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); any strides (an input that is not
    ALIGN-aligned, such as every tensor with D = 40, runs from an aligned copy: _prep).

    Returns ``(o, lse)``: o (B, Hq, Nq, D) contiguous in q's dtype, lse (B, Hq, Nq) float32,
    the natural-log logsumexp of ``scale * q.k`` over the visible keys (before dropout),
    -inf (with o = 0) for a row with no visible key.  With ``count_blocks=True`` a third
    tensor (B, Hq, ceil(Nq / BLOCK_M)) int32 gives the key blocks each program visited.
    ``left``/``right`` = -1 mean unbounded; ``seed`` keys the dropout Philox stream.
    ``_blocks=(BLOCK_M, BLOCK_N)`` or a dict of launch meta-parameters overrides the tile choice
    (tests and tile sweeps only, see _config)."""
    B, Hq, Hkv, Nq, Nk, D = _check_common(q, k, v, left, right)
    left, right = _band(left, right, Nq, Nk)
    q, k, v = _prep(q), _prep(k), _prep(v)
    o = _empty((B, Hq, Nq, D), q.dtype, q.device)
    lse = torch.empty((B, Hq, Nq), device=q.device, dtype=torch.float32)
    block_d = block_d_for(D)
    kpm, stride_kpmb, has_kpm = _kpm(key_padding_mask, q)
    dropout = dropout_p > 0.0
    meta = _config("_attention_fwd_kernel", q, block_d, _blocks)
    block_m = meta["BLOCK_M"]
    n_mblocks = triton.cdiv(Nq, block_m)
    counts = torch.empty((B, Hq, n_mblocks), device=q.device, dtype=torch.int32) if count_blocks else lse
    if B * Hq * Nq == 0:
        return (o.contiguous(), lse, counts) if count_blocks else (o.contiguous(), lse)
    for b0, rows in _batch_chunks(B):
        _attention_fwd_kernel[(n_mblocks, Hq, rows.stop - rows.start)](
            q[rows], k[rows], v[rows], o[rows], lse[rows], _rows(kpm, rows, has_kpm), _rows(counts, rows, count_blocks),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            stride_kpmb,
            Hq, Hq // Hkv, Nq, Nk,
            float(scale) * LOG2E, int(left), int(right), dropout_threshold(dropout_p), dropout_scale(dropout_p),
            int(seed or 0), b0,
            HEAD_DIM=kernel_head_dim(D), BLOCK_D=block_d,
            HAS_LEFT=left != -1, HAS_RIGHT=right != -1, HAS_KPM=has_kpm, DROPOUT=dropout,
            COUNT_BLOCKS=count_blocks, **meta,
        )
    o = o.contiguous()  # a copy only when D is not a multiple of ALIGN (rows written padded, see _empty)
    return (o, lse, counts) if count_blocks else (o, lse)


def attention_bwd(do, q, k, v, o, lse, *, scale: float, left: int, right: int, key_padding_mask,
                  dropout_p: float, seed: int, count_blocks: bool = False, _blocks: tuple | None = None):
    """Backward pass of :func:`attention_fwd` given its ``o`` and ``lse``.

    Returns ``(dq, dk, dv)`` with the shapes and dtypes of q, k, v; dk/dv are summed over
    the query heads of each key/value group.  Deterministic (no atomics).  With
    ``count_blocks=True`` also returns the blocks visited by each dQ program
    (B, Hq, ceil(Nq / BLOCK_M_dq)) and by each dK/dV program (B, Hkv, ceil(Nk / BLOCK_N_dkdv)),
    the latter summed over the group's query heads.
    ``_blocks=((dkdv BLOCK_M, BLOCK_N), (dq BLOCK_M, BLOCK_N))`` overrides the tiles, either of them
    also a dict of launch meta-parameters (tests and tile sweeps only, see _config)."""
    B, Hq, Hkv, Nq, Nk, D = _check_common(q, k, v, left, right)
    left, right = _band(left, right, Nq, Nk)
    q, k, v, do, o = _prep(q), _prep(k), _prep(v), _prep(do), _prep(o)
    if not lse.is_contiguous() or lse.data_ptr() % ALIGN:  # read as (B*Hq*Nq,) from its start
        lse = lse.clone(memory_format=torch.contiguous_format)
    dq = _empty((B, Hq, Nq, D), q.dtype, q.device)
    dk = _empty((B, Hkv, Nk, D), k.dtype, q.device)
    dv = _empty((B, Hkv, Nk, D), v.dtype, q.device)
    block_d = block_d_for(D)
    kpm, stride_kpmb, has_kpm = _kpm(key_padding_mask, q)
    dropout = dropout_p > 0.0
    mdkdv = _config("_attention_bwd_dkdv_kernel", q, block_d, None if _blocks is None else _blocks[0])
    mdq = _config("_attention_bwd_dq_kernel", q, block_d, None if _blocks is None else _blocks[1])
    bn_dkdv, bm_dq = mdkdv["BLOCK_N"], mdq["BLOCK_M"]
    n_dq = triton.cdiv(Nq, bm_dq)
    n_dkdv = triton.cdiv(Nk, bn_dkdv)
    if count_blocks:
        cnt_dq = torch.empty((B, Hq, n_dq), device=q.device, dtype=torch.int32)
        cnt_dkdv = torch.empty((B, Hkv, n_dkdv), device=q.device, dtype=torch.int32)
    else:
        cnt_dq = cnt_dkdv = lse
    if B * Hq * Nq == 0 or Nk == 0:  # nothing attends: every gradient is zero
        dq, dk, dv = (t.contiguous().zero_() for t in (dq, dk, dv))
        return (dq, dk, dv, cnt_dq, cnt_dkdv) if count_blocks else (dq, dk, dv)

    delta = torch.empty((B, Hq, Nq), device=q.device, dtype=torch.float32)
    lse2 = torch.empty((B, Hq, Nq), device=q.device, dtype=torch.float32)
    pre_m = _pre_block_m(block_d)
    for _, rows in _batch_chunks(B):
        _attention_bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m), Hq, rows.stop - rows.start)](
            o[rows], do[rows], lse[rows], delta[rows], lse2[rows],
            o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            Hq, Nq, HEAD_DIM=kernel_head_dim(D), BLOCK_D=block_d, BLOCK_M=pre_m, num_warps=4,
        )
    common = dict(HEAD_DIM=kernel_head_dim(D), BLOCK_D=block_d, HAS_LEFT=left != -1, HAS_RIGHT=right != -1, HAS_KPM=has_kpm,
                  DROPOUT=dropout, COUNT_BLOCKS=count_blocks)
    scalars = (Hq, Hq // Hkv, Nq, Nk, float(scale) * LOG2E, float(scale), int(left), int(right),
               dropout_threshold(dropout_p), dropout_scale(dropout_p), int(seed or 0))
    for b0, rows in _batch_chunks(B):
        n_rows = rows.stop - rows.start
        q_, k_, v_, do_, lse2_, delta_ = q[rows], k[rows], v[rows], do[rows], lse2[rows], delta[rows]
        kpm_ = _rows(kpm, rows, has_kpm)
        _attention_bwd_dkdv_kernel[(n_dkdv, Hkv, n_rows)](
            q_, k_, v_, do_, lse2_, delta_, dk[rows], dv[rows], kpm_, _rows(cnt_dkdv, rows, count_blocks),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            stride_kpmb, *scalars, b0, **common, **mdkdv,
        )
        _attention_bwd_dq_kernel[(n_dq, Hq, n_rows)](
            q_, k_, v_, do_, lse2_, delta_, dq[rows], kpm_, _rows(cnt_dq, rows, count_blocks),
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            stride_kpmb, *scalars, b0, **common, **mdq,
        )
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()  # as o in attention_fwd
    return (dq, dk, dv, cnt_dq, cnt_dkdv) if count_blocks else (dq, dk, dv)
