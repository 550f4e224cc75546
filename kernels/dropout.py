"""The dropout stream every kernel draws its masks from: eight decisions per Philox call.

A dropout mask is indexed by (row, column) of a matrix with ``n_cols`` columns: an
attention head's probabilities (row ``(b * Hq + h) * Nq + i``, column the key ``j``),
or the rows of a bias + activation or residual + LayerNorm input.  Element (r, j) is
decided by one 16-bit number:

    words = philox_4x32_10(seed, counter = r * ceil(n_cols / 8) + j // 8)    # tl.randint4x
    s     = j % 8
    u     = (words[s // 2] >> (16 * (s % 2))) & 0xFFFF                         # in [0, 2**16)
    keep  = u >= threshold,    threshold = round(p * 2**16), at most 2**16 - 1

and kept values are scaled by ``2**16 / (2**16 - threshold)``, so dropout is exactly
unbiased for the probability it applies, p rounded to a multiple of 2**-16 (an error of at most
2**-17 = 7.6e-6 in p; 2**-16 for p within 2**-17 of 1, where the threshold is capped).
``leedl_fast.random.dropout_keep`` is the PyTorch twin, bit for bit.

Why not ``tl.rand`` per element: one Philox-4x32-10 call is about sixty integer
instructions, and in attention they run on the CUDA cores next to tensor-core products of
only 4·D flops per element, so a call per element (three per element over forward and
backward) costs several times the matmuls by instruction count.  FlashAttention-2 makes sixteen
8-bit decisions per call (p in steps of 1/256; csrc/flash_attn/src/dropout.h); eight 16-bit ones
keep p exact to 2**-16 at an eighth of the cost.  A row starts a new counter, so the stream does not depend on the kernels' block sizes.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["keep_tile", "keep_row", "dropout_threshold", "dropout_scale"]

_ONE = 1 << 16  # the decisions' resolution


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold for drop probability ``p`` in [0, 1): round(p * 2**16), at most 2**16 - 1.
    ``leedl_fast.random.dropout_threshold`` is the same function (tested)."""
    return min(round(float(p) * _ONE), _ONE - 1)


def dropout_scale(p: float) -> float:
    """The factor on kept values: 1 / (1 - the drop probability the threshold applies)."""
    return _ONE / (_ONE - dropout_threshold(p))


@triton.jit
def _numbers(seed, counters):
    """The eight 16-bit numbers of each counter: [..., 2, 2, 2], slot 4a + 2b + c = half c of word 2a + b."""
    w0, w1, w2, w3 = tl.randint4x(seed, counters)                                   # [...] u32 each
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))                                   # [..., 2, 2]: word 2a + b
    return tl.join(w & 0xFFFF, w >> 16)                                             # [..., 2, 2, 2]


@triton.jit
def keep_tile(seed, row_counter, start_col, threshold, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              TRANSPOSED: tl.constexpr = False):
    """Keep-mask [BLOCK_R, BLOCK_C] of columns ``start_col + arange(BLOCK_C)`` (start_col % 8 == 0,
    BLOCK_C % 8 == 0) for rows whose first counter is ``row_counter`` [BLOCK_R] (int64:
    r * ceil(n_cols / 8)); with TRANSPOSED its transpose [BLOCK_C, BLOCK_R].  Columns past
    n_cols get numbers too; callers mask them."""
    tl.static_assert(BLOCK_C % 8 == 0, "keep_tile covers whole groups of 8 columns")
    g = start_col // 8 + tl.arange(0, BLOCK_C // 8)                                 # [BLOCK_C / 8]
    if TRANSPOSED:
        u = _numbers(seed, g[:, None] + row_counter[None, :])                        # [BLOCK_C / 8, BLOCK_R, 2, 2, 2]
        u = tl.reshape(tl.permute(u, (0, 2, 3, 4, 1)), [BLOCK_C, BLOCK_R])          # [BLOCK_C, BLOCK_R]
    else:
        u = _numbers(seed, row_counter[:, None] + g[None, :])                        # [BLOCK_R, BLOCK_C / 8, 2, 2, 2]
        u = tl.reshape(u, [BLOCK_R, BLOCK_C])                                       # [BLOCK_R, BLOCK_C]
    return u >= threshold


@triton.jit
def keep_row(seed, row_counter, start_col, threshold, BLOCK_C: tl.constexpr):
    """``keep_tile`` of one row: [BLOCK_C], ``row_counter`` a scalar (int64)."""
    tl.static_assert(BLOCK_C % 8 == 0, "keep_row covers whole groups of 8 columns")
    u = _numbers(seed, row_counter + start_col // 8 + tl.arange(0, BLOCK_C // 8))    # [BLOCK_C / 8, 2, 2, 2]
    return tl.reshape(u, [BLOCK_C]) >= threshold                                    # [BLOCK_C]
