"""Counter-based random numbers that match Triton's ``tl.rand`` / ``tl.randn``.

Every op that draws random numbers inside a kernel (attention dropout,
diffusion noise) keys them by ``(seed, offset)``: the seed is one integer per
call and the offset is the element's linear index.  This module is a
pure-PyTorch port of the Philox-4x32-10 generator that Triton 3.x ships in
``triton/language/random.py`` (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC'11), so the torch path of an op reproduces the kernel's random
numbers exactly and a seed gives the same noise on CPU and GPU.

What Triton does, and what this port reproduces bit for bit:

* the 64-bit seed is the key ``(k0, k1) = (seed & 0xffffffff, seed >> 32)``;
* a 64-bit offset is the counter ``(c0, c1, c2, c3) = (lo32, hi32, 0, 0)``;
* ten rounds of Philox with the 32-bit constants;
* ``rand``: the first output word, read as int32, folded to ``x < 0 ? -x-1 : x``
  and multiplied by 4.6566127342e-10 in float32, giving [0, 1);
* ``randn``: Box-Muller on the first two words (``u1`` clamped at 1e-7), cosine
  branch.

The reference port (``philox_randint4x``) does all arithmetic in int64 tensors
holding 32-bit values, so it runs on any device torch supports and never relies
on signed-overflow behaviour.  The streams the ops use (``dropout_keep``,
``normal_rows``) run the rounds in numpy uint64 arrays on the CPU, whose
multiply gives a 32 x 32 product directly (wrapping modulo 2**64 is defined for
unsigned arrays, and never happens here): about half the time of the int64
tensor rounds on the 2-core development machine, which still serve other
devices and torch.compile traces.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from ._checks import MAX_SEED, check_number, check_seed

__all__ = ["philox_uniform", "philox_normal", "philox_randint4x", "dropout_keep", "dropout_mask", "dropout_threshold",
           "dropout_scale", "normal_rows", "normal_noise", "MAX_SEED"]


_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # largest s with (2**31 - 1) * s < 1 in float32
_TWO_PI = 6.283185307179586


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of a constant ``a`` and ``b``.

    Split into 16-bit halves so that no intermediate leaves int64's range.
    """
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    low = al * bl
    mid = ah * bl + al * bh + (low >> 16)
    hi = ah * bh + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (low & 0xFFFF)
    return hi & _MASK32, lo


def _check_seed(seed: int) -> int:
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    return check_seed(seed)


def _check_offsets(offsets: torch.Tensor) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor):
        raise ValueError("offsets must be an integer torch.Tensor")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise ValueError(f"offsets must be an integer tensor, got dtype {offsets.dtype}")
    return offsets.to(torch.int64)


def philox_randint4x(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four 32-bit Philox output words for each offset, as int64 in [0, 2**32).

    Equal to ``tl.randint4x(seed, offsets)`` with ``offsets`` an int64 block.
    """
    seed = _check_seed(seed)
    off = _check_offsets(offsets)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = off & _MASK32
    c1 = (off >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    x = torch.where(x >= 2**31, x - 2**32, x)  # read the word as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform float32 numbers in [0, 1): bit-identical to ``tl.rand(seed, offsets)``.

    ``seed`` is an int in [0, 2**63 - 1]; ``offsets`` any integer tensor (values
    used as int64). The result has the shape and device of ``offsets``.
    """
    c0, _, _, _ = philox_randint4x(seed, offsets)
    return _uint_to_uniform(c0)


def philox_normal(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 numbers: ``tl.randn(seed, offsets)``.

    On the CPU (outside torch.compile) the float32 ``log`` and ``cos`` of Box-Muller are numpy's, the
    functions Triton's interpreter evaluates ``tl.log`` / ``tl.cos`` with, so the result equals the
    interpreted kernel's bit for bit.  Elsewhere they are torch's, which round the last bit differently
    from numpy's and from the GPU's libdevice: agreement to 1e-6 (what the tests check there)."""
    c0, c1, _, _ = philox_randint4x(seed, offsets)
    return _box_muller(c0, c1)[0]


# Philox constants minus 2**32: negative, |a| < 2**31, so c * a is exact in int64 for any 32-bit c.
_ROUND_A_NEG = _ROUND_A - (1 << 32)
_ROUND_B_NEG = _ROUND_B - (1 << 32)
_CHUNK = 1 << 15           # counters per pass of the numpy rounds: their buffers stay in cache
_DROP_ONE = 1 << 16        # the resolution of a dropout decision


def _mulhilo(c: torch.Tensor, a_neg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of c * (a_neg + 2**32) for 32-bit c: c * a_neg is exact in int64 and
    c * 2**32 only adds c to the high word.  The high word comes back unmasked (equal mod 2**32)."""
    prod = c * a_neg
    return (prod >> 32) + c, prod & _MASK32


def _philox_words_fast(k0: int, k1: int, ctr: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``philox_randint4x`` for int64 counters in [0, 2**63), returned unmasked: each word is correct in
    its low 32 bits.  One int64 multiply per 32x32 product (``_mulhilo``), masks deferred past the xors."""
    hi_a, c3 = _mulhilo(ctr & _MASK32, _ROUND_A_NEG)      # round 1: c2 = c3 = 0
    c0, c1, c2 = ctr >> 32 ^ k0, None, hi_a.bitwise_xor_(k1).bitwise_and_(_MASK32)
    for _ in range(1, _N_ROUNDS):
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
        hi_b, lo_b = _mulhilo(c2, _ROUND_B_NEG)
        n0 = hi_b.bitwise_xor_(k0) if c1 is None else hi_b.bitwise_xor_(c1).bitwise_xor_(k0)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A_NEG)
        c0, c1, c2, c3 = n0.bitwise_and_(_MASK32), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32), lo_a
    return c0, c1, c2, c3


_A64, _B64, _S32, _M64 = np.uint64(_ROUND_A), np.uint64(_ROUND_B), np.uint64(32), np.uint64(_MASK32)


def _philox_words_np(k0: int, k1: int, ctr: np.ndarray) -> tuple[np.ndarray, ...]:
    """``philox_randint4x``'s four words (uint64 arrays in [0, 2**32)) for uint64 counters ``ctr``.  The
    32 x 32 products are uint64 multiplies (wrapping is defined for unsigned numpy arrays, and never
    happens here); six buffers rotate through the rounds, so a round allocates nothing."""
    c0, c1 = ctr & _M64, ctr >> _S32
    c2, c3, pa, pb = np.zeros_like(c0), np.zeros_like(c0), np.empty_like(c0), np.empty_like(c0)
    for _ in range(_N_ROUNDS):
        np.multiply(c0, _A64, out=pa)
        np.multiply(c2, _B64, out=pb)
        np.right_shift(pb, _S32, out=c0)                 # c0 = hi(B * c2) ^ c1 ^ k0
        c0 ^= c1
        c0 ^= np.uint64(k0)
        np.right_shift(pa, _S32, out=c2)                 # c2 = hi(A * c0) ^ c3 ^ k1
        c2 ^= c3
        c2 ^= np.uint64(k1)
        c1, pb = pb, c1                                  # c1 = lo(B * c2)
        c1 &= _M64
        c3, pa = pa, c3                                  # c3 = lo(A * c0)
        c3 &= _M64
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _numpy_rounds(t: torch.Tensor) -> bool:
    """Whether the rounds for counters ``t`` run in numpy: on the CPU, outside a torch.compile trace."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold of drop probability ``p`` in [0, 1): round(p * 2**16), at most 2**16 - 1
    (``leedl_fast.kernels.dropout.dropout_threshold``, the same function).  ValueError for another p."""
    p = check_number("p (the drop probability)", p, 0, 1, hi_open=True)
    return min(round(p * _DROP_ONE), _DROP_ONE - 1)


def dropout_scale(p: float) -> float:
    """The factor on kept values: 1 / (1 - the drop probability the threshold applies), so that the
    dropout is exactly unbiased; it differs from 1 / (1 - p) by a relative 2**-17 / (1 - p) at most."""
    return _DROP_ONE / (_DROP_ONE - dropout_threshold(p))


def dropout_keep(seed: int, rows: torch.Tensor, n_cols: int, p: float, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """The keep-mask every dropout of leedl_fast applies, bit for bit the kernels' (kernels/dropout.py).

    Element (r, j) of a matrix with ``n_cols`` columns takes the 16-bit number ``s = j % 8`` of the
    Philox call at counter ``r * ceil(n_cols / 8) + j // 8``: half ``s % 2`` (low first) of word
    ``s // 2`` of ``philox_randint4x``; it is kept iff that number is >= ``dropout_threshold(p)``.
    ``rows``: an integer tensor of row indices r, any shape; ``cols = (start, stop)``: the columns
    (all of them by default).  Returns bool ``(*rows.shape, stop - start)`` on ``rows``' device."""
    seed = _check_seed(seed)
    rows = _check_offsets(rows)
    start, stop = (0, n_cols) if cols is None else (int(cols[0]), int(cols[1]))
    if not 0 <= start <= stop <= n_cols:
        raise ValueError(f"cols must satisfy 0 <= start <= stop <= n_cols = {n_cols}, got {cols}")
    t = dropout_threshold(p)
    g0, g1 = start // 8, -(-stop // 8)
    ctr = (rows.reshape(-1, 1) * (-(-n_cols // 8)) + torch.arange(g0, g1, device=rows.device)).reshape(-1)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    if _numpy_rounds(ctr):
        keep = torch.from_numpy(_keep_np(k0, k1, ctr.numpy().view(np.uint64), t))
    else:
        words = torch.stack(_philox_words_fast(k0, k1, ctr), -1)                      # [n, 4] int64
        if sys.byteorder == "little":
            # The int16 pairs at the start of each int64 are the word's two halves, low first; flipping the
            # sign bit maps the unsigned order onto int16's (the upper halves of the int64 are never read).
            keep = torch.ge(words.view(torch.int16).view(-1, 4, 4)[..., :2] ^ -0x8000, t - 0x8000)
        else:
            keep = torch.ge(torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], -1), t)
    return keep.reshape(*rows.shape, (g1 - g0) * 8)[..., start - 8 * g0:stop - 8 * g0]


def _keep_np(k0: int, k1: int, ctr: np.ndarray, t: int) -> np.ndarray:
    """``dropout_keep``'s decisions, bool (len(ctr), 8), from the numpy rounds, ``_CHUNK`` counters a pass
    (the rounds' six buffers stay in cache)."""
    out = np.empty((ctr.size, 8), dtype=np.bool_)
    for s in range(0, ctr.size, _CHUNK):
        words = np.stack(_philox_words_np(k0, k1, ctr[s:s + _CHUNK]), axis=-1, dtype=np.uint32)   # [n, 4]
        if sys.byteorder == "little":
            halves = words.view(np.uint16)                                         # [n, 8]: low half first
        else:
            halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1, 8)
        np.greater_equal(halves, t, out=out[s:s + _CHUNK])
    return out


def dropout_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """``dropout_keep`` of a tensor of ``shape`` (..., C) seen as a (rows, C) matrix, the leading dims
    flattened row-major: the mask of the row-wise dropout ops (bias + activation, residual + LayerNorm)."""
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1] if shape else 1
    rows = torch.arange(math.prod(shape[:-1]), dtype=torch.int64, device=device)
    return dropout_keep(seed, rows, n_cols, p).reshape(shape)


def _uniform_np(w: np.ndarray) -> np.ndarray:
    """``_uint_to_uniform`` in numpy, for words in [0, 2**32) of any integer dtype: the word read as
    int32 x, folded to x ^ (x >> 31) (which is -x - 1 for negative x), times the float32 scale."""
    x = w.astype(np.uint32).view(np.int32)
    return (x ^ (x >> 31)).astype(np.float32) * np.float32(_UNIFORM_SCALE)


def _box_muller_np(wa: np.ndarray, wb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_box_muller`` in numpy float32: log, sqrt, cos and sin are the functions Triton's interpreter
    evaluates, so the result equals an interpreted kernel's bit for bit."""
    u1 = np.maximum(_uniform_np(wa), np.float32(1.0e-7))
    th = _uniform_np(wb) * np.float32(_TWO_PI)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return r * np.cos(th), r * np.sin(th)


def _box_muller(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's Box-Muller on two words, both branches (``tl.randn4x``'s pair; ``tl.randn`` is the first):
    (r cos th, r sin th), float32.  On the CPU (outside torch.compile) all in numpy (``_box_muller_np``);
    elsewhere torch's functions, which may round the last bit differently."""
    if wa.device.type == "cpu" and not torch.compiler.is_compiling():
        return tuple(torch.from_numpy(x) for x in _box_muller_np(wa.numpy(), wb.numpy()))
    u1 = torch.clamp_min(_uint_to_uniform(wa), 1.0e-7)
    th = _uint_to_uniform(wb) * torch.tensor(_TWO_PI, dtype=torch.float32, device=wb.device)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def normal_rows(seed: int, rows: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The diffusion kernels' noise: standard normals, float32 ``(*rows.shape, n_cols)``, bit for bit
    the kernel's under Triton's interpreter (within 1e-6 of a compiled GPU kernel, whose libdevice
    rounds the last bit its own way).

    Element (r, j) of a matrix with ``n_cols`` columns is normal ``j % 4`` of ``tl.randn4x`` at counter
    ``r * ceil(n_cols / 4) + j // 4``: words (w0, w1) and (w2, w3) of one Philox call each make a
    Box-Muller pair, cosine branch first (the first is ``tl.randn``'s number for that counter)."""
    seed = _check_seed(seed)
    rows = _check_offsets(rows)
    n_groups = -(-n_cols // 4)
    ctr = (rows.reshape(-1, 1) * n_groups + torch.arange(n_groups, device=rows.device)).reshape(-1)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    if _numpy_rounds(ctr):
        out = torch.from_numpy(_normals_np(k0, k1, ctr.numpy().view(np.uint64)))
    else:
        c0, c1, c2, c3 = _philox_words_fast(k0, k1, ctr)
        out = torch.stack([*_box_muller(c0, c1), *_box_muller(c2, c3)], -1)
    return out.view(*rows.shape, 4 * n_groups)[..., :n_cols]


def _normals_np(k0: int, k1: int, ctr: np.ndarray) -> np.ndarray:
    """``normal_rows``' four normals per counter, float32 (len(ctr), 4), from the numpy rounds and
    Box-Muller, ``_CHUNK`` counters a pass (as ``_keep_np``)."""
    out = np.empty((ctr.size, 4), dtype=np.float32)
    for s in range(0, ctr.size, _CHUNK):
        w0, w1, w2, w3 = _philox_words_np(k0, k1, ctr[s:s + _CHUNK])
        out[s:s + _CHUNK] = np.stack([*_box_muller_np(w0, w1), *_box_muller_np(w2, w3)], axis=-1)
    return out


def normal_noise(seed: int, shape, device=None) -> torch.Tensor:
    """``normal_rows`` for a tensor of ``shape`` (B, ...): one row per sample (the leading dim), its
    elements in row-major order; a 0-d shape is one sample of one element.  Contiguous float32."""
    shape = tuple(int(s) for s in shape)
    batch = shape[0] if shape else 1
    per_sample = math.prod(shape) // batch if batch else 0
    rows = torch.arange(batch, dtype=torch.int64, device=device)
    return normal_rows(seed, rows, per_sample).reshape(shape).contiguous()
