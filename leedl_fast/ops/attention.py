"""Softmax attention, dense, causal and banded: reference, torch path, Triton path, autograd.

    o_i = sum_j P_ij v_j,   P_ij = softmax_j(scale * q_i . k_j  over the keys j visible to i)

q is (B, Hq, Nq, D); k and v are (B, Hkv, Nk, D) with Hq a multiple of Hkv (query
head h reads key/value head h // (Hq // Hkv): grouped-query and multi-query
attention, without copying k or v).  That is the layout of
``torch.nn.functional.scaled_dot_product_attention``.

Which keys a query sees
-----------------------
Query i sits at key position ``i + (Nk - Nq)`` (bottom-right alignment, as in
FlashAttention-2 and xformers; the plain lower triangle when Nq == Nk).  Every
option of the op is normalised to one band ``(left, right)``, -1 meaning
unbounded on that side:

    key j is visible to query i  iff  (left == -1 or j >= i + (Nk - Nq) - left)
                                  and (right == -1 or j <= i + (Nk - Nq) + right)
                                  and not key_padding_mask[b, j]

* ``window=None`` is ``(-1, -1)``; ``window=(left, right)`` is taken as is.
* ``causal=True`` is the constraint ``j <= i + (Nk - Nq)``, intersected with the
  window: since a window's right bound is >= 0 or unbounded, the result is always
  ``right = 0``: ``causal`` with window ``(w, r)`` for any r is ``(w, 0)``, a
  causal sliding window of w + 1 keys; ``causal`` alone is ``(-1, 0)``.

Window conventions of other libraries (each converter is a function here, tested):

* FlexAttention's sliding-window mask ``q_idx - kv_idx <= W`` combined with its
  causal mask ``q_idx >= kv_idx`` is ``window=(W, 0)``:
  ``window_from_flex_sliding(W)``.  Without the causal part it is ``(W, -1)``.
  (FlexAttention indexes queries and keys from the same origin, top-left; the two
  agree when Nq == Nk.)
* FlashAttention's ``window_size=(left, right)`` has exactly this meaning
  (bottom-right aligned, -1 unbounded): ``window_from_flash_attn((l, r))``.
* "a window of W keys including the query's own position": causal ``(W - 1, 0)``;
  centred (W odd) ``((W - 1) // 2, (W - 1) // 2)``: ``window_from_num_keys(W)``.

A query row with no visible key (all its band padded, or before the first key
under causal with Nq > Nk) returns zeros, log-sum-exp -inf and zero gradients,
never NaN.

Dropout
-------
``dropout_p`` drops normalised probabilities: P_ij is kept iff
``leedl_fast.random.dropout_keep(seed, rows=(b * Hq + h) * Nq + i, n_cols=Nk, p=dropout_p)``
keeps column j: eight 16-bit decisions per Philox call (kernels/dropout.py says why), so the
drop probability applied is dropout_p rounded to a multiple of 2**-16, and kept values are
scaled by ``dropout_scale(dropout_p)``, one over its complement (exactly unbiased).  The
kernel draws the same numbers and regenerates them in the backward pass, so both paths
compute the same function for the same seed.  ``seed=None`` draws one from torch's default
generator (``torch.manual_seed`` makes runs reproducible).

How autograd and the custom ops fit
-----------------------------------
``leedl_fast::attention_fwd(q, k, v, key_padding_mask, seed, scale, left, right,
dropout_p) -> (o, lse)`` and ``leedl_fast::attention_bwd(...) -> (dq, dk, dv)``
are torch custom ops with fake implementations; ``register_autograd`` ties the
backward op to the forward.  Both paths live *inside* the ops (the Triton
launchers of ``leedl_fast.kernels.attention``, or the torch path below), so
``torch.compile(fullgraph=True)`` sees one opaque node whatever the device, and
``torch.library.opcheck`` runs on CPU.  The backward is hand-written on both
paths, from the saved (q, k, v, o, lse): FlashAttention-2's recomputation
scheme, which never keeps the N x N probabilities.  ``lse`` is float32 (float64
for float64 inputs) and contiguous.  ``o`` and the gradients have fixed layouts,
because a compiled graph relies on the fake strides (``_layout``, ``_grad_layout``):
on CPU o has q's own strides when q is dense, else (B, N, H, D) order; the
gradients have (B, N, H, D) order without dropout (what ATen's CPU kernels
write, so no copy) and their input's with dropout; on CUDA everything is
contiguous (what the Triton launchers write).  Either path copies only when its
result differs and allocates a buffer only where it writes into one, so the
dense CPU path's peak memory is SDPA's (measured in ``bench/``).  The seed
travels as a 0-d int64 tensor so that a compiled graph can draw it.

A backward taken with ``create_graph=True`` (a gradient penalty, a Hessian-vector
product) still runs the fused backward, wrapped in ``_AttentionGrads``, whose own
backward differentiates the same gradient formula written as dense PyTorch math
(``_grads_dense``, O(Nq * Nk) memory per head); that one is differentiable again,
so every order works.  A first-order backward never reaches the dense math.

The torch path (CPU fallback)
-----------------------------
* Without dropout it runs ATen's fused CPU attention kernels
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: the
  ones ``scaled_dot_product_attention`` itself runs on CPU), so dense attention
  costs what SDPA costs.  Key padding enters as a (B, 1, 1, Nk) additive mask.
  Grouped-query attention goes to the kernels as is where they support it (newer
  torch; probed once); otherwise the G = Hq / Hkv query heads of one key head are
  folded into the kernel's head axis and k, v get a stride-0 head axis (no copy).
* A band bounded only on the right (causal attention with any Nq, Nk; a window
  (-1, r)) sees keys j <= i + s, s = Nk - Nq + r: the keys before s in one plain
  call, the rest with the kernel's (top-left) causal flag, the two merged by their
  log-sum-exps; rows with i + s < 0 see nothing.  No mask tensor; Nq == Nk causal
  is one call.
* A band with a left bound runs over blocks of bm query rows;
  each block attends only to the key window its band can reach.  For a finite
  band the interior blocks go to the kernel in a few calls: q's blocks and the
  (overlapping) key windows are strided views (``as_strided``, no copy), the band
  inside a window is one (bm, span) additive mask shared by all blocks, and the
  key gradients of overlapping windows are summed with span / bm strided adds.
  Blocks at the ends, and one-sided bands, loop block by block with small
  block-local masks.  Time and memory are O(N * w); no N x N score or mask tensor
  exists, forward or backward (peak memory measured in ``bench/``).
* With dropout (or when the torch path is forced on a non-CPU device) the same
  blocks run plain PyTorch math in float32 (float64 for float64 inputs) with the
  Philox keep-mask (``leedl_fast.random.dropout_keep``, one Philox call per eight
  scores, its rounds in numpy uint64 arrays on the CPU) regenerated block by block in
  the backward; memory stays bounded by the block size.  A problem that is one block
  (at most 2**20 scores) keeps that block's probabilities instead, the dropped ones
  negated, and its backward reads them rather than recomputing scores, exponentials
  and mask (B=4 H=4 N=100 dropout 0.1 fwd+bwd: 1.6x SDPA before, 1.13x after, on the
  2-core development machine).  Scale, normalisation and dropout scale multiply the
  (rows x D) products, not the (rows x keys) blocks.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import backend
from .._checks import check_int, check_number
from ..random import dropout_keep, dropout_scale
from ._common import check_dropout, check_same, check_tensor, dropout_seed, seed_int

__all__ = [
    "attention", "banded_attention", "attention_reference", "normalize_window",
    "window_from_flex_sliding", "window_from_flash_attn", "window_from_num_keys",
]

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256

# Elements of one interior kernel call's key-gradient windows (see _chunks); tests lower it.
_CHUNK_ELEMS = 1 << 19
# Scores of one block of the plain-math path (see _math_blocks); tests lower it.
_MATH_BLOCK_SCORES = 1 << 20

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# ----------------------------------------------------------------------------- windows

def _check_window(window) -> tuple[int, int]:
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair of ints (left, right), got {window!r}")
    out = []
    for w in window:
        if isinstance(w, torch.Tensor) and w.dim() == 0 and not w.dtype.is_floating_point and w.dtype != torch.bool:
            w = int(w.item())
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise ValueError(f"window must be a pair of ints (left, right), got {window!r}")
        if w < -1:
            raise ValueError(f"window values must be >= -1 (-1 = unbounded), got {window!r}")
        out.append(int(w))
    return out[0], out[1]


def normalize_window(causal: bool = False, window=None) -> tuple[int, int]:
    """The band ``(left, right)`` that ``causal`` and ``window`` together describe (-1 = unbounded).

    ``causal`` intersects the window with ``j <= i + (Nk - Nq)``, so its right bound
    becomes 0 whatever it was: ``(w, -1)``, ``(w, 0)`` and ``(w, 5)`` with
    ``causal=True`` are all ``(w, 0)``.
    """
    left, right = (-1, -1) if window is None else _check_window(window)
    if causal:
        right = 0
    return left, right


def window_from_flex_sliding(w: int, causal: bool = True) -> tuple[int, int]:
    """FlexAttention's sliding-window mask ``q_idx - kv_idx <= w`` as a ``window``.

    With FlexAttention's causal mask ``q_idx >= kv_idx`` (the usual sliding-window
    attention, w + 1 keys including self) it is ``(w, 0)``; without it ``(w, -1)``.
    """
    w = check_int("w", w, 0)
    return (w, 0) if causal else (w, -1)


def window_from_flash_attn(window_size) -> tuple[int, int]:
    """FlashAttention's ``window_size=(left, right)``: the same band, same alignment, -1 unbounded."""
    return _check_window(window_size)


def window_from_num_keys(num_keys: int, causal: bool = True) -> tuple[int, int]:
    """A window of ``num_keys`` keys including the query's own position.

    Causal: the query and the ``num_keys - 1`` keys before it, ``(num_keys - 1, 0)``.
    Centred (``causal=False``, ``num_keys`` odd): ``((num_keys - 1) // 2,) * 2``.
    """
    num_keys = check_int("num_keys", num_keys, 1)
    if causal:
        return num_keys - 1, 0
    if num_keys % 2 == 0:
        raise ValueError(f"num_keys must be odd for a centred window, got {num_keys}")
    return (num_keys - 1) // 2, (num_keys - 1) // 2


# ----------------------------------------------------------------------------- reference

def _visible_mask(nq: int, nk: int, left: int, right: int, key_padding_mask, device) -> torch.Tensor:
    """(B or 1, 1, Nq, Nk) bool: True where query i may attend key j.  Dense; for the reference."""
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    vis = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & ~key_padding_mask[:, None, None, :]
    return vis


def _dropout_keep(seed: int, q: torch.Tensor, nk: int, i0: int, i1: int, lo: int, hi: int, p: float) -> torch.Tensor:
    """Keep-mask (B, Hq, i1 - i0, hi - lo) of queries [i0, i1) and keys [lo, hi) for q (B, Hq, Nq, D), on
    q's device: rows (b * Hq + h) * Nq + i of ``dropout_keep``'s matrix of Nk columns."""
    b, hq, nq = q.shape[:3]
    rows = (torch.arange(b * hq, dtype=torch.int64, device=q.device)[:, None] * nq
            + torch.arange(i0, i1, device=q.device)[None, :])
    return dropout_keep(seed, rows.view(b, hq, i1 - i0), nk, p, (lo, hi))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        window=None, key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                        scale: Optional[float] = None, seed: Optional[int] = None,
                        return_lse: bool = False):
    """The definition, dense, in the inputs' dtype (use float64 inputs for a reference).

    Same arguments and meaning as ``attention``; builds the full (B, Hq, Nq, Nk)
    score matrix.  With ``return_lse=True`` returns ``(o, lse)``, ``lse`` the
    natural-log log-sum-exp of the visible scaled scores (-inf on empty rows).
    ``seed`` is required when ``dropout_p > 0`` (so the reference never draws).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    left, right = normalize_window(causal, window)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = (q @ kk.transpose(-1, -2)) * scale
    vis = _visible_mask(nq, nk, left, right, key_padding_mask, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isinf(lse) & (lse < 0)
    # exp(s - lse) is the softmax; on an empty row use 0 instead of exp(nan).
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None]).masked_fill(~vis, 0.0)
    if dropout_p > 0:
        if seed is None:
            raise ValueError("attention_reference needs an explicit seed when dropout_p > 0")
        keep = _dropout_keep(int(seed), q, nk, 0, nq, 0, nk, float(dropout_p))
        p = p * keep * dropout_scale(dropout_p)
    o = p @ vv
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- layouts

def _bnhd_empty(shape, dtype, device) -> torch.Tensor:
    """An empty (B, H, N, D) tensor stored in (B, N, H, D) order."""
    b, h, n, d = shape
    return torch.empty(b, n, h, d, dtype=dtype, device=device).transpose(1, 2)


def _layout(t: torch.Tensor) -> torch.Tensor:
    """The layout of o, like q's (``_grad_layout`` for the gradients), as a meta tensor: no memory.
    On CPU: the input's own strides when it is dense (as ``torch.empty_like``), else (B, N, H, D)
    order, which is what ATen's CPU attention kernels write for such inputs (so they need no copy).
    Elsewhere: contiguous, what the Triton launchers write.  Both paths conform to it (the fake
    implementations promise it).  A buffer is allocated (``_empty``) only where a path writes into
    one: a result a kernel returns in this layout is passed on as is (``_conform``)."""
    if t.device.type != "cpu":
        return torch.empty(t.shape, dtype=t.dtype, device="meta")     # what the Triton launchers write
    like = torch.empty_like(t, device="meta")
    return like if _same_layout(like, t) else _bnhd_empty(t.shape, t.dtype, "meta")


def _grad_layout(t: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The layout of the gradient of ``t`` (q, k or v), as ``_layout``.  On CPU without dropout
    (ATen's fused kernels) (B, N, H, D) order whatever t's: what ATen's CPU attention backward writes
    (torch 2.13), so the dense path passes its gradients on as they are and, for a leaf of another
    layout, autograd re-lays them out after this node's saved tensors are freed, as it does for SDPA's
    (a copy here would add one gradient's size to the peak).  Otherwise (the math blocks, which write
    their own buffers, and the Triton launchers) ``_layout(t)``: no re-layout for any leaf."""
    if t.device.type == "cpu" and dropout_p == 0:
        return _bnhd_empty(t.shape, t.dtype, "meta")
    return _layout(t)


def _lse_layout(q: torch.Tensor) -> torch.Tensor:
    """lse: (B, Hq, Nq) contiguous, float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty(q.shape[:3], dtype=dtype, device="meta")


def _empty(layout: torch.Tensor, device) -> torch.Tensor:
    return torch.empty_strided(layout.shape, layout.stride(), dtype=layout.dtype, device=device)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _accumulator(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A zeroed buffer of ``t``'s shape in ``acc`` to sum key-gradient blocks into: ``t`` itself when
    it has that dtype (the caller copies into ``t`` otherwise)."""
    return t.zero_() if t.dtype == acc else torch.zeros(t.shape, dtype=acc, device=t.device)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """x with its infinities (the max or log-sum-exp of a row that sees no key) replaced by 0."""
    return torch.where(torch.isinf(x), torch.zeros((), dtype=x.dtype, device=x.device), x)


def _conform(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``t``'s values in ``layout`` (see ``_layout``): ``t`` itself when it has it, else a copy."""
    if _same_layout(t, layout) and t.storage_offset() == 0:
        return t
    return _empty(layout, t.device).copy_(t)


# ----------------------------------------------------------------------------- torch path: geometry

def _visible_counts(b: int, nq: int, nk: int, left: int, right: int, kpm) -> torch.Tensor:
    """(B or 1, Nq) int64: how many keys each query row sees.  O(B * (Nq + Nk)), no N x N tensor."""
    dev = kpm.device if kpm is not None else torch.device("cpu")
    pos = torch.arange(nq, device=dev, dtype=torch.int64) + (nk - nq)
    lo = (pos - left).clamp(0, nk) if left >= 0 else torch.zeros_like(pos)
    hi = (pos + right + 1).clamp(0, nk) if right >= 0 else torch.full_like(pos, nk)  # exclusive
    hi = torch.maximum(hi, lo)
    if kpm is None:
        return (hi - lo)[None]
    prefix = torch.zeros(kpm.shape[0], nk + 1, dtype=torch.int64, device=dev)
    prefix[:, 1:] = torch.cumsum((~kpm).to(torch.int64), dim=1)
    return prefix[:, hi] - prefix[:, lo]


def _key_range(i0: int, i1: int, nq: int, nk: int, left: int, right: int) -> tuple[int, int]:
    """Keys [lo, hi) that some query row in [i0, i1) can see (before padding)."""
    off = nk - nq
    lo = 0 if left < 0 else max(0, i0 + off - left)
    hi = nk if right < 0 else min(nk, i1 - 1 + off + right + 1)
    return lo, max(lo, hi)


def _block_visible(i0: int, i1: int, lo: int, hi: int, nq: int, nk: int, left: int, right: int,
                   kpm, device) -> Optional[torch.Tensor]:
    """(B or 1, 1, rows, keys) bool visibility of a block, or None when everything in it is visible."""
    off = nk - nq
    band_cut = (left >= 0 and lo < (i1 - 1) + off - left) or (right >= 0 and hi - 1 > i0 + off + right)
    vis = None
    if band_cut:
        i = torch.arange(i0, i1, device=device)[:, None] + off
        j = torch.arange(lo, hi, device=device)[None, :]
        vis = torch.ones(i1 - i0, hi - lo, dtype=torch.bool, device=device)
        if left >= 0:
            vis &= j >= i - left
        if right >= 0:
            vis &= j <= i + right
        vis = vis[None, None]
    if kpm is not None:
        pad = ~kpm[:, None, None, lo:hi]
        vis = pad if vis is None else vis & pad
    return vis


def _additive(vis: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    if vis is None:
        return None
    return torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, float("-inf"))


# ----------------------------------------------------------------------------- torch path: fused CPU kernels

_NATIVE_GQA: Optional[bool] = None


def _native_gqa() -> bool:
    """Whether ATen's CPU flash kernels take k, v with fewer heads than q themselves (grouped-query
    attention inside the kernel, key gradients summed there: newer torch releases).  Probed once,
    lazily, on a tiny problem against the folded form; older kernels reject the shapes."""
    global _NATIVE_GQA
    if _NATIVE_GQA is None:
        g = torch.Generator().manual_seed(0)
        q, do = torch.randn(2, 1, 2, 3, 16, generator=g, dtype=torch.float64).unbind(0)
        k, v = torch.randn(2, 1, 1, 3, 16, generator=g, dtype=torch.float64).unbind(0)
        ke, ve = k.expand(1, 2, 3, 16), v.expand(1, 2, 3, 16)
        try:
            o, lse = _cpu_flash(q, k, v, 0.0, True, scale=0.25)
            grads = _cpu_flash_bwd(do, q, k, v, o, lse, 0.0, True, scale=0.25)
        except RuntimeError:
            _NATIVE_GQA = False
            return False
        o_ref, lse_ref = _cpu_flash(q, ke, ve, 0.0, True, scale=0.25)
        gq_ref, gk_ref, gv_ref = _cpu_flash_bwd(do, q, ke, ve, o_ref, lse_ref, 0.0, True, scale=0.25)
        gk_ref, gv_ref = gk_ref.sum(1, keepdim=True), gv_ref.sum(1, keepdim=True)
        _NATIVE_GQA = all(a.shape == b.shape and torch.allclose(a, b)
                          for a, b in zip((o, *grads), (o_ref, gq_ref, gk_ref, gv_ref)))
    return _NATIVE_GQA


def _fold(q, k, v, mask):
    """Grouped-query heads for ATen's kernels.  When they handle Hkv < Hq themselves, as is.
    Otherwise fold: q (B, Hkv*G, N, D) -> (B*Hkv, G, N, D); k, v -> (B*Hkv, G, Nk, D) with a
    stride-0 head axis (no copy); mask batch axis B -> B*Hkv.  Returns (q, k, v, mask, folded)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    if g == 1 or _native_gqa():
        return q, k, v, mask, False
    qf = q.reshape(b * hkv, g, nq, d)
    kf = k.reshape(b * hkv, 1, nk, d).expand(b * hkv, g, nk, d)
    vf = v.reshape(b * hkv, 1, nk, d).expand(b * hkv, g, nk, d)
    if mask is not None and mask.shape[0] != 1:
        mask = mask[:, None].expand(mask.shape[0], hkv, *mask.shape[1:]).reshape(b * hkv, *mask.shape[1:])
    return qf, kf, vf, mask, True


def _scale_into_q(causal: bool, scale: float) -> bool:
    """Whether ATen's CPU flash kernels need the scale folded into q: with ``is_causal`` they give NaN for a
    scale that is not positive in float32 (0, negative, or below float32's range: the masked -inf times the
    scale; torch's SDPA does the same).  Folded (q * scale, scale 1) the scores are the same; 1e-30 leaves a
    wide margin above float32's smallest number."""
    return causal and not scale >= 1e-30


def _flash(q, k, v, causal: bool, mask, scale: float):
    """ATen's fused CPU forward on (B, Hq, N, D) q and (B, Hkv, Nk, D) k, v: (o, lse) in q's head
    layout.  ``causal`` is the kernel's flag: top-left aligned (query i sees keys j <= i)."""
    if _scale_into_q(causal, scale):
        q, scale = q * scale, 1.0
    qf, kf, vf, mf, folded = _fold(q, k, v, mask)
    of, lf = _cpu_flash(qf, kf, vf, 0.0, causal, attn_mask=mf, scale=scale)
    if not folded:
        return of, lf
    b, hq, nq, d = q.shape
    return of.reshape(b, hq, nq, d), lf.reshape(b, hq, nq)


def _flash_bwd(do, q, k, v, o, lse, causal: bool, mask, scale: float):
    """ATen's fused CPU backward: (dq, dk, dv), dk and dv with k's (B, Hkv, Nk, D) shape."""
    if _scale_into_q(causal, scale):                 # as _flash: the gradient of q * scale, times scale
        gq, gk, gv = _flash_bwd(do, q * scale, k, v, o, lse, causal, mask, 1.0)
        return gq * scale, gk, gv
    qf, kf, vf, mf, folded = _fold(q, k, v, mask)
    if not folded:
        return _cpu_flash_bwd(do, q, k, v, o, lse, 0.0, causal, attn_mask=mf, scale=scale)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    gq, gk, gv = _cpu_flash_bwd(do.reshape(qf.shape), qf, kf, vf, o.reshape(qf.shape), lse.reshape(qf.shape[:3]),
                                0.0, causal, attn_mask=mf, scale=scale)
    gk = gk.view(b, hkv, hq // hkv, nk, d).sum(2)
    gv = gv.view(b, hkv, hq // hkv, nk, d).sum(2)
    return gq.reshape(b, hq, nq, d), gk, gv


def _pad_additive(kpm, lo: int, hi: int, dtype) -> Optional[torch.Tensor]:
    """(B, 1, 1, hi - lo) additive mask of the padded keys lo..hi-1, or None without padding."""
    return None if kpm is None else _additive(~kpm[:, None, None, lo:hi], dtype)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _effective_band(nq: int, nk: int, left: int, right: int) -> tuple[int, int]:
    """The same band with bounds that never bind replaced by -1 (a window wider than the sequence)."""
    if left >= nk - 1:
        left = -1
    if right >= nq - 1:
        right = -1
    return left, right


def _mergeable(*xs: torch.Tensor) -> bool:
    """True when each tensor's first two axes merge into one without a copy."""
    return all(x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1) for x in xs)


def _batch_views(b: int, per_batch: bool):
    """Selectors turning a (B, H, ...) tensor into (Z, ...) views: one over all of B*H, or one per b."""
    if not per_batch:
        return [lambda x: x.flatten(0, 1)]
    return [(lambda x, i=i: x[i]) for i in range(b)]


def _heads(x: torch.Tensor, g: int, groups: int) -> torch.Tensor:
    """The query heads h = hk * groups + g of x (B, Hq, ...), as (B, Hkv, ...): a view."""
    return x if groups == 1 else x.unflatten(1, (-1, groups))[:, :, g]


def _windows(x: torch.Tensor, start: int, count: int, step: int, width: int) -> torch.Tensor:
    """View of x (Z, N, ...) as ``count`` windows of ``width`` positions every ``step`` from ``start``:
    (Z, count, width, ...).  Windows overlap when width > step (keys); no copy either way."""
    st = x.stride()
    return x.as_strided((x.shape[0], count, width, *x.shape[2:]), (st[0], step * st[1], st[1], *st[2:]),
                        x.storage_offset() + start * st[1])


def _band_tiling(nq: int, nk: int, left: int, right: int) -> tuple[int, int, int, int]:
    """For a finite band: rows per block ``bm``, key window ``span`` (a multiple of bm, covering
    bm + left + right keys) and the blocks ``t_lo <= t < t_hi`` whose window lies inside [0, Nk)."""
    w = left + right + 1
    bm = 64 if w <= 192 else (128 if w <= 768 else 256)
    span = -(-(bm + left + right) // bm) * bm
    off = nk - nq
    t_lo = max(0, -(-(left - off) // bm))
    t_hi = min(nq // bm, (nk - span - off + left) // bm + 1)
    return bm, span, t_lo, max(t_lo, t_hi)


def _band_additive(bm: int, span: int, left: int, right: int, dtype, device) -> torch.Tensor:
    """(1, 1, bm, span) additive mask of a block in its key window: row r sees columns r .. r+left+right."""
    r = torch.arange(bm, device=device)[:, None]
    c = torch.arange(span, device=device)[None, :]
    return torch.zeros(bm, span, dtype=dtype, device=device).masked_fill_((c < r) | (c > r + left + right),
                                                                           float("-inf"))[None, None]


def _chunks(r0: int, nt: int, bm: int, span: int, z: int, d: int):
    """Split the interior blocks into kernel calls whose key-gradient windows (z, blocks, span, d)
    hold about 2**20 elements, so the backward's transient memory stays a few MB."""
    per_call = max(1, _CHUNK_ELEMS // (span * z * d))
    for t in range(0, nt, per_call):
        yield r0 + t * bm, min(per_call, nt - t)


def _loop_ranges(nq: int, nk: int, left: int, right: int):
    """Row ranges for the block loop, and the tiled interior (bm, span, r0, nt) or None."""
    if left >= 0 and right >= 0:
        bm, span, t_lo, t_hi = _band_tiling(nq, nk, left, right)
        if t_hi > t_lo:
            r0, r1 = t_lo * bm, t_hi * bm
            return bm, [(0, r0), (r1, nq)], (bm, span, r0, t_hi - t_lo)
        return bm, [(0, nq)], None
    return 256, [(0, nq)], None


def _prefix_empty(kpm, lo: int, hi: int, nq: int, causal: bool) -> Optional[torch.Tensor]:
    """(B, 1, Nq) bool: rows of a part (keys lo..hi-1, all of them, or the first i + 1 for query i
    under the kernel's top-left causal flag) whose keys are all padded; None without padding."""
    if kpm is None:
        return None
    seen = torch.cumsum((~kpm[:, lo:hi]).to(torch.int32), dim=1)                       # [B, hi - lo]
    if not causal:
        return (seen[:, -1:] == 0).expand(kpm.shape[0], nq)[:, None]
    idx = torch.arange(nq, device=kpm.device).clamp_(max=hi - lo - 1)
    return (seen[:, idx] == 0)[:, None]


def _fwd_right_bounded(q, k, v, kpm, scale, right, o_layout, lse):
    """A band bounded on the right only (causal with any Nq, Nk; window (-1, r)): query i sees keys
    j <= i + s, s = Nk - Nq + right.  Rows i < -s see nothing; keys j < s are seen by every row (a
    plain call); keys j >= s by the kernel's top-left causal flag.  Two such parts are merged by their
    log-sum-exps (Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018): no mask
    tensor, and each part costs what its visible scores cost."""
    nq, nk = q.shape[2], k.shape[2]
    s = nk - nq + right
    if s <= 0:
        r0 = -s
        ob, lb = _flash(q[:, :, r0:], k, v, True, _pad_additive(kpm, 0, nk, q.dtype), scale)
        if r0 == 0:
            o = _conform(ob, o_layout)
        else:
            o = _empty(o_layout, q.device)
            o[:, :, :r0] = 0
            lse[:, :, :r0] = float("-inf")
            o[:, :, r0:] = ob
        lse[:, :, r0:] = lb
        return o
    o = _empty(o_layout, q.device)
    oa, la = _flash(q, k[:, :, :s], v[:, :, :s], False, _pad_additive(kpm, 0, s, q.dtype), scale)
    ob, lb = _flash(q, k[:, :, s:], v[:, :, s:], True, _pad_additive(kpm, s, nk, q.dtype), scale)
    la, lb = la.to(lse.dtype), lb.to(lse.dtype)
    if kpm is not None:         # the kernel gives lse 0 (and o 0) on a row whose keys are all masked
        la = la.masked_fill(_prefix_empty(kpm, 0, s, nq, False), float("-inf"))
        lb = lb.masked_fill(_prefix_empty(kpm, s, nk, nq, True), float("-inf"))
    torch.logaddexp(la, lb, out=lse)
    ref = _finite(lse)                                                                 # rows with no key: o = 0
    wa, wb = torch.exp(la - ref)[..., None], torch.exp(lb - ref)[..., None]
    if o.dtype == lse.dtype:
        torch.mul(oa, wa, out=o)
        o.addcmul_(ob, wb)
    else:                       # half precision: merge in float32, round once
        o.copy_(torch.addcmul(oa * wa, ob, wb))
    return o


def _fwd_fused_cpu(q, k, v, kpm, scale, left, right, o_layout, lse):
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    groups = hq // hkv
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if left < 0 and right < 0:
        of, lf = _flash(q, k, v, False, _pad_additive(kpm, 0, nk, q.dtype), scale)
        lse.copy_(lf)
        return _conform(of, o_layout)
    if left < 0:
        return _fwd_right_bounded(q, k, v, kpm, scale, right, o_layout, lse)
    o = _empty(o_layout, q.device)
    bm, ranges, interior = _loop_ranges(nq, nk, left, right)
    for r0, r1 in ranges:
        for i0 in range(r0, r1, bm):
            i1 = min(r1, i0 + bm)
            lo, hi = _key_range(i0, i1, nq, nk, left, right)
            if hi == lo:
                o[:, :, i0:i1] = 0
                lse[:, :, i0:i1] = float("-inf")
                continue
            mask = _additive(_block_visible(i0, i1, lo, hi, nq, nk, left, right, kpm, q.device), q.dtype)
            o[:, :, i0:i1], lse[:, :, i0:i1] = _flash(q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], False, mask,
                                                      scale)
    if interior is None:
        return o
    # The interior blocks in one kernel call per (query-head group[, batch row]): block t's rows
    # attend to a key window that is a strided view of k (windows overlap; nothing is copied).
    bm, span, r0_all, nt_all = interior
    band = _band_additive(bm, span, left, right, q.dtype, q.device)
    per_batch = kpm is not None or not _mergeable(q, k, v, o, lse)
    z = (1 if per_batch else b) * hkv
    for r0, nt in _chunks(r0_all, nt_all, bm, span, z, d):
        ks0 = r0 + (nk - nq) - left
        for g in range(groups):
            qg, og, lg = _heads(q, g, groups), _heads(o, g, groups), _heads(lse, g, groups)
            for bi, sel in enumerate(_batch_views(b, per_batch)):
                mask = band
                if kpm is not None:
                    kw_pad = _windows(kpm[bi][None], ks0, nt, bm, span)[0]               # [nt, span]
                    mask = band.expand(1, nt, bm, span).masked_fill(kw_pad[None, :, None, :], float("-inf"))
                of, lf = _cpu_flash(_windows(sel(qg), r0, nt, bm, bm), _windows(sel(k), ks0, nt, bm, span),
                                    _windows(sel(v), ks0, nt, bm, span), 0.0, False, attn_mask=mask, scale=scale)
                _windows(sel(og), r0, nt, bm, bm).copy_(of)
                _windows(sel(lg), r0, nt, bm, bm).copy_(lf)
    return o


def _bwd_right_bounded(do, q, k, v, o, lse, kpm, scale, right, dq_layout, dk_layout, dv_layout):
    """Backward of ``_fwd_right_bounded``: each part's kernel call with the merged o and lse gives
    that part's share of dq (P and rowsum(dO * O) are the merged ones) and its keys' dk, dv."""
    nq, nk = q.shape[2], k.shape[2]
    s = nk - nq + right
    if s <= 0:
        r0 = -s
        gq, gk, gv = _flash_bwd(do[:, :, r0:], q[:, :, r0:], k, v, o[:, :, r0:], lse[:, :, r0:], True,
                                _pad_additive(kpm, 0, nk, q.dtype), scale)
        if r0 == 0:
            dq = _conform(gq, dq_layout)
        else:
            dq = _empty(dq_layout, q.device)
            dq[:, :, :r0] = 0
            dq[:, :, r0:] = gq
        return dq, _conform(gk, dk_layout), _conform(gv, dv_layout)
    gqa, gka, gva = _flash_bwd(do, q, k[:, :, :s], v[:, :, :s], o, lse, False, _pad_additive(kpm, 0, s, q.dtype),
                               scale)
    gqb, gkb, gvb = _flash_bwd(do, q, k[:, :, s:], v[:, :, s:], o, lse, True, _pad_additive(kpm, s, nk, q.dtype),
                               scale)
    dq, dk, dv = _empty(dq_layout, q.device), _empty(dk_layout, q.device), _empty(dv_layout, q.device)
    torch.add(gqa, gqb, out=dq)
    dk[:, :, :s], dk[:, :, s:] = gka, gkb
    dv[:, :, :s], dv[:, :, s:] = gva, gvb
    return dq, dk, dv


def _bwd_fused_cpu(do, q, k, v, o, lse, kpm, scale, left, right, dq_layout, dk_layout, dv_layout):
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    groups = hq // hkv
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    # Empty rows carry lse = -inf; the kernel wants a finite value there (their scores are all
    # -inf, so any finite lse gives P = 0 and zero gradients).
    if left >= 0 or right >= 0 or kpm is not None:
        lse = _finite(lse)
    if left < 0 and right < 0:
        gq, gk, gv = _flash_bwd(do, q, k, v, o, lse, False, _pad_additive(kpm, 0, nk, q.dtype), scale)
        return _conform(gq, dq_layout), _conform(gk, dk_layout), _conform(gv, dv_layout)
    if left < 0:
        return _bwd_right_bounded(do, q, k, v, o, lse, kpm, scale, right, dq_layout, dk_layout, dv_layout)
    dq, dk, dv = _empty(dq_layout, q.device), _empty(dk_layout, q.device), _empty(dv_layout, q.device)

    # Key gradients sum over overlapping blocks: accumulate in float32 (float64 for float64).
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dk_acc, dv_acc = _accumulator(dk, acc), _accumulator(dv, acc)
    bm, ranges, interior = _loop_ranges(nq, nk, left, right)
    for r0, r1 in ranges:
        for i0 in range(r0, r1, bm):
            i1 = min(r1, i0 + bm)
            lo, hi = _key_range(i0, i1, nq, nk, left, right)
            if hi == lo:
                dq[:, :, i0:i1] = 0
                continue
            mask = _additive(_block_visible(i0, i1, lo, hi, nq, nk, left, right, kpm, q.device), q.dtype)
            dq[:, :, i0:i1], gk, gv = _flash_bwd(do[:, :, i0:i1], q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi],
                                                 o[:, :, i0:i1], lse[:, :, i0:i1], False, mask, scale)
            dk_acc[:, :, lo:hi] += gk
            dv_acc[:, :, lo:hi] += gv
    if interior is not None:
        bm, span, r0_all, nt_all = interior
        band = _band_additive(bm, span, left, right, q.dtype, q.device)
        per_batch = kpm is not None or not _mergeable(q, k, v, o, lse, do, dq, dk_acc, dv_acc)
        z = (1 if per_batch else b) * hkv
        for r0, nt in _chunks(r0_all, nt_all, bm, span, z, d):
            ks0 = r0 + (nk - nq) - left
            for g in range(groups):
                qg, og, lg = _heads(q, g, groups), _heads(o, g, groups), _heads(lse, g, groups)
                dog, dqg = _heads(do, g, groups), _heads(dq, g, groups)
                for bi, sel in enumerate(_batch_views(b, per_batch)):
                    mask = band
                    if kpm is not None:
                        kw_pad = _windows(kpm[bi][None], ks0, nt, bm, span)[0]
                        mask = band.expand(1, nt, bm, span).masked_fill(kw_pad[None, :, None, :], float("-inf"))
                    gq, gk, gv = _cpu_flash_bwd(
                        _windows(sel(dog), r0, nt, bm, bm), _windows(sel(qg), r0, nt, bm, bm),
                        _windows(sel(k), ks0, nt, bm, span), _windows(sel(v), ks0, nt, bm, span),
                        _windows(sel(og), r0, nt, bm, bm), _windows(sel(lg), r0, nt, bm, bm),
                        0.0, False, attn_mask=mask, scale=scale)
                    _windows(sel(dqg), r0, nt, bm, bm).copy_(gq)
                    # Window t's key chunk c lands on keys ks0 + (t + c) * bm: one strided add per chunk.
                    for c in range(span // bm):
                        _windows(sel(dk_acc), ks0 + c * bm, nt, bm, bm).add_(gk[:, :, c * bm:(c + 1) * bm])
                        _windows(sel(dv_acc), ks0 + c * bm, nt, bm, bm).add_(gv[:, :, c * bm:(c + 1) * bm])
    if dk_acc is not dk:
        dk.copy_(dk_acc)
        dv.copy_(dv_acc)
    return dq, dk, dv


# ----------------------------------------------------------------------------- torch path: dropout (plain math)

def _math_blocks(nq, nk, left, right, b, hq):
    """Query blocks (i0, i1) and their key ranges [lo, hi) for the plain-math path.  A block holds
    at most about ``_MATH_BLOCK_SCORES`` (2**20) scores, 4 MiB per float32 temporary (the backward
    holds three); for a band the block has about as many rows as the band is wide, so the work
    stays close to N * w."""
    budget = _MATH_BLOCK_SCORES
    if left >= 0 and right >= 0:
        w = left + right + 1
        bm = max(16, min(256, w))
        while bm > 1 and b * hq * bm * (bm + w) > budget:
            bm //= 2
    else:
        bm = max(1, min(1024, budget // max(1, b * hq * nk)))
    for i0 in range(0, nq, bm):
        i1 = min(nq, i0 + bm)
        lo, hi = _key_range(i0, i1, nq, nk, left, right)
        yield i0, i1, lo, hi


def _math_qk(q, k, scale, i0, i1, lo, hi, acc):
    """The block's ``qs`` (B, Hkv, G, rows, D), q's rows times ``scale``, and keys ``kb`` (B, Hkv, 1, keys, D)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qs = (q[:, :, i0:i1].to(acc) * scale).reshape(b, hkv, hq // hkv, i1 - i0, d)
    return qs, k[:, :, lo:hi].to(acc)[:, :, None]


def _math_scores(q, k, kpm, scale, left, right, i0, i1, lo, hi, acc):
    """Scores of a block with invisible entries at -inf, (B, Hkv, G, rows, keys), from q's rows times
    ``scale`` (``qs``, (B, Hkv, G, rows, D): scaling q costs N * D, scaling the scores N * keys) and
    the keys ``kb`` (B, Hkv, 1, keys, D)."""
    qs, kb = _math_qk(q, k, scale, i0, i1, lo, hi, acc)
    nq, nk = q.shape[2], k.shape[2]
    s = qs @ kb.transpose(-1, -2)                                                      # [B, Hkv, G, rows, keys]
    vis = _block_visible(i0, i1, lo, hi, nq, nk, left, right, kpm, q.device)
    if vis is not None:
        s.masked_fill_(~vis[:, :, None], float("-inf"))
    return s, qs, kb


def _keep_factors(seed: int, q: torch.Tensor, nk: int, i0: int, i1: int, lo: int, hi: int, p: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """``_dropout_keep`` as contiguous 0/1 numbers of ``dtype``, (B, Hq, rows, keys).  The mask's key
    slice is a strided view whenever ``lo`` or ``hi`` is not a multiple of 8 (decisions come eight to
    a Philox call): a float block multiplies by such a bool or uint8 view through a slow converting
    path (ten times a contiguous float multiply at N = 100), and copying the view's bytes into a float
    block is the fastest of the conversions torch offers (bool to float is several times slower)."""
    keep = _dropout_keep(seed, q, nk, i0, i1, lo, hi, p)
    return torch.empty(keep.shape, dtype=dtype, device=keep.device).copy_(keep.view(torch.uint8))


def _fwd_math(q, k, v, kpm, scale, left, right, p, seed, o, lse, save_probs=False):
    # Per block: E = exp(S - m) with S = (scale q) k^T; O = (E * keep) V * dropout_scale / rowsum(E).
    # The normalisation and the dropout scale act on O (rows x D), not on E (rows x keys).
    # Returns (o, probs): probs None, or with ``save_probs`` and a problem that is one block, that block's
    # probabilities P = E / rowsum(E) with the sign of the dropped ones flipped (B, Hkv, G, Nq, keys), so
    # that ``_bwd_math`` reads P = |probs| and P * keep = max(probs, 0) instead of recomputing the scores
    # and the mask (FlashAttention-2's returned dropout mask encodes drops in the sign the same way).
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    blocks = list(_math_blocks(nq, nk, left, right, b, hq))
    probs = None
    for i0, i1, lo, hi in blocks:
        if hi == lo:
            o[:, :, i0:i1] = 0
            lse[:, :, i0:i1] = float("-inf")
            continue
        s, _, _ = _math_scores(q, k, kpm, scale, left, right, i0, i1, lo, hi, acc)
        m = _finite(s.amax(-1, keepdim=True))
        e = s.sub_(m).exp_()                                                              # [B, Hkv, G, rows, keys]
        den = e.sum(-1, keepdim=True)                                                     # 0 for a row that sees nothing
        lse[:, :, i0:i1] = (m + torch.log(den)).reshape(b, hq, i1 - i0)
        den.masked_fill_(den == 0, 1.0).reciprocal_()                                     # 1 / rowsum(E)
        kept = e
        if p > 0:
            kept = e * _keep_factors(seed, q, nk, i0, i1, lo, hi, p, acc).view(b, hkv, g, i1 - i0, hi - lo)
        vb = v[:, :, lo:hi].to(acc)[:, :, None]                                           # [B, Hkv, 1, keys, D]
        o[:, :, i0:i1] = ((kept @ vb) * (den * dropout_scale(p) if p > 0 else den)).reshape(b, hq, i1 - i0, d)
        if save_probs and len(blocks) == 1:
            probs = (kept.mul_(2).sub_(e) if p > 0 else e).mul_(den)                      # +-P: 2 E K - E = +-E
    return o, probs


def _bwd_math(do, q, k, v, o, lse, kpm, scale, left, right, p, seed, dq, dk, dv, probs=None):
    # With P = exp(S - lse), K = keep (0/1) and c = dropout_scale: O = c (P * K) V, so
    #   dV = c (P * K)^T dO,   dS = P * (c K * dO V^T - delta) = c P * (K * dO V^T - delta / c),
    #   delta = rowsum(dO * O) (Dao, FlashAttention-2, sec. 3.1),  dq = scale dS K,  dk = dS^T (scale q).
    # The constants c and scale act on the (rows x D) products, not on the (rows x keys) blocks.
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = dropout_scale(p) if p > 0 else 1.0
    dk_acc, dv_acc = _accumulator(dk, acc), _accumulator(dv, acc)
    for i0, i1, lo, hi in _math_blocks(nq, nk, left, right, b, hq):
        rows = i1 - i0
        if hi == lo:
            dq[:, :, i0:i1] = 0
            continue
        dob = do[:, :, i0:i1].to(acc).reshape(b, hkv, g, rows, d)
        vb = v[:, :, lo:hi].to(acc)[:, :, None]
        delta = (dob * o[:, :, i0:i1].to(acc).reshape(b, hkv, g, rows, d)).sum(-1, keepdim=True)
        ds = dob @ vb.transpose(-1, -2)                                                   # dO V^T
        if probs is not None:                                  # the forward's +-P (_fwd_math): one block
            qs, kb = _math_qk(q, k, scale, i0, i1, lo, hi, acc)
            kept = probs.clamp_min(0)                                                     # P * keep
            ds.mul_(kept).sub_(probs.abs().mul_(delta / c))                               # dS / c
        else:
            s, qs, kb = _math_scores(q, k, kpm, scale, left, right, i0, i1, lo, hi, acc)
            lse_b = _finite(lse[:, :, i0:i1].to(acc).reshape(b, hkv, g, rows, 1))
            kept = s.sub_(lse_b).exp_()                                                   # P: [B, Hkv, G, rows, keys]
            if p > 0:
                keep = _keep_factors(seed, q, nk, i0, i1, lo, hi, p, acc).view(b, hkv, g, rows, hi - lo)
                ds.mul_(keep)
            ds.sub_(delta / c).mul_(kept)                                                 # dS / c
            if p > 0:
                kept.mul_(keep)                                                           # P * keep
        dq[:, :, i0:i1] = ((ds @ kb) * (c * scale)).reshape(b, hq, rows, d)
        dk_acc[:, :, lo:hi].add_((ds.transpose(-1, -2) @ qs).sum(2), alpha=c)
        dv_acc[:, :, lo:hi].add_((kept.transpose(-1, -2) @ dob).sum(2), alpha=c)
    if dk_acc is not dk:
        dk.copy_(dk_acc)
        dv.copy_(dv_acc)
    return dq, dk, dv


def _attention_fwd_torch(q, k, v, kpm, scale, left, right, p, seed, save_probs=False):
    """``(o, lse, probs)``: ``probs`` is what ``_fwd_math`` saves for the backward (with ``save_probs``), or None."""
    lse = _empty(_lse_layout(q), q.device)
    left, right = _effective_band(q.shape[2], k.shape[2], left, right)
    probs = None
    if p > 0 or q.device.type != "cpu":        # ATen's fused kernels used here are the CPU ones
        o, probs = _fwd_math(q, k, v, kpm, scale, left, right, p, seed, _empty(_layout(q), q.device), lse,
                             save_probs)
    else:
        o = _fwd_fused_cpu(q, k, v, kpm, scale, left, right, _layout(q), lse)
    if kpm is not None or left >= 0 or right >= 0:
        empty = _visible_counts(q.shape[0], q.shape[2], k.shape[2], left, right, kpm) == 0   # [B or 1, Nq]
        if bool(empty.any()):
            e = empty[:, None, :]
            lse.masked_fill_(e, float("-inf"))
            o.masked_fill_(e[..., None], 0.0)
    return o, lse, probs


def _attention_bwd_torch(do, q, k, v, o, lse, kpm, scale, left, right, p, seed, probs=None):
    """(dq, dk, dv); ``probs``: what ``_attention_fwd_torch`` returned for this problem, if anything."""
    layouts = _grad_layout(q, p), _grad_layout(k, p), _grad_layout(v, p)
    left, right = _effective_band(q.shape[2], k.shape[2], left, right)
    if p > 0 or q.device.type != "cpu":
        return _bwd_math(do, q, k, v, o, lse, kpm, scale, left, right, p, seed,
                         *(_empty(t, q.device) for t in layouts), probs=probs)
    return _bwd_fused_cpu(do, q, k, v, o, lse, kpm, scale, left, right, *layouts)


# ----------------------------------------------------------------------------- second order

def _grads_dense(do, q, k, v, kpm, seed, scale, left, right, p):
    """(dq, dk, dv) of attention for the upstream gradient ``do``, as differentiable PyTorch math on the
    dense (B, Hq, Nq, Nk) scores in float32 (float64 for float64 inputs): the first backward written
    so that autograd can differentiate it (``_AttentionGrads``).  Same formula as ``_bwd_math``; empty
    rows give zeros without a NaN anywhere in the graph (the row maximum is a detached constant)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, do = (t.to(acc) for t in (q, k, v, do))
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)          # [B, Hq, Nk, D]
    s = (q @ kk.transpose(-1, -2)) * scale                                         # [B, Hq, Nq, Nk]
    s = s.masked_fill(~_visible_mask(nq, nk, left, right, kpm, q.device), float("-inf"))
    e = torch.exp(s - _finite(s.detach().amax(-1, keepdim=True)))                  # exp(-inf) = 0, and so its grad
    den = e.sum(-1, keepdim=True)
    prob = e / torch.where(den == 0, torch.ones_like(den), den)
    mult = None
    if p > 0:
        mult = _dropout_keep(seed, q, nk, 0, nq, 0, nk, p).to(acc) * dropout_scale(p)
    dv = (prob if mult is None else prob * mult).transpose(-1, -2) @ do            # [B, Hq, Nk, D]
    dprob = do @ vv.transpose(-1, -2)
    if mult is not None:
        dprob = dprob * mult
    ds = prob * (dprob - (dprob * prob).sum(-1, keepdim=True))
    dq = (ds @ kk) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale

    def per_kv_head(t):
        return t.reshape(b, hkv, g, nk, d).sum(2)

    return dq, per_kv_head(dk), per_kv_head(dv)


class _AttentionGrads(torch.autograd.Function):
    """The first backward, ``(do, q, k, v) -> (dq, dk, dv)``, as a function autograd can differentiate:
    used only when a backward runs with ``create_graph=True`` (a gradient penalty such as WGAN-GP's
    through a discriminator with self-attention, a Hessian-vector product).  Its forward is the fused
    backward (``first``, a closure over the saved tensors); its own backward differentiates
    ``_grads_dense``, which holds the dense (B, Hq, Nq, Nk) scores: O(Nq * Nk) memory per head, in the
    second derivative only.  That backward is itself differentiable, so every order works."""

    @staticmethod
    def forward(ctx, do, q, k, v, first, problem):
        ctx.save_for_backward(do, q, k, v)
        ctx.problem = problem
        return first()

    @staticmethod
    def backward(ctx, ddq, ddk, ddv):
        higher = torch.is_grad_enabled()           # a third derivative will be taken
        with torch.enable_grad():
            # Fresh aliases, so that the vector-Jacobian product treats (do, q, k, v) as independent
            # (do may depend on q through the outer graph); differentiable back to the originals.
            xs = [t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in ctx.saved_tensors]
            grads = _grads_dense(*xs, *ctx.problem)
            used = [(gr, dd) for gr, dd in zip(grads, (ddq, ddk, ddv)) if dd is not None]
            if not used:
                return (None,) * 6
            outs, gouts = zip(*used)
            d = torch.autograd.grad(outs, xs, gouts, allow_unused=True, create_graph=higher)
        return (*(None if t is None else t.to(x.dtype) for t, x in zip(d, xs)), None, None)


def _first_backward(first, do, q, k, v, problem):
    """``first()``, the fused backward's (dq, dk, dv); wrapped in ``_AttentionGrads`` when the backward runs
    with create_graph=True (grad mode on inside it), so that the gradients are differentiable.  ``problem()``
    gives ``_grads_dense``'s arguments; it is called only then (reading the custom op's seed tensor while
    torch.compile traces a backward would be a data-dependent guard)."""
    if torch.is_grad_enabled():
        return _AttentionGrads.apply(do, q, k, v, first, problem())
    return first()


# ----------------------------------------------------------------------------- custom ops

def _use_triton(q: torch.Tensor) -> bool:
    return q.dtype != torch.float64 and backend.select("attention", q) == "triton"


@torch.library.custom_op("leedl_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                      seed: Optional[torch.Tensor], scale: float, left: int, right: int,
                      dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(q):
        return _attention_fwd_torch(q, k, v, key_padding_mask, scale, left, right, dropout_p, seed_int(seed))[:2]
    from leedl_fast.kernels.attention import attention_fwd

    o, lse = attention_fwd(q, k, v, scale=scale, left=left, right=right, key_padding_mask=key_padding_mask,
                           dropout_p=dropout_p, seed=seed_int(seed))
    return _conform(o, _layout(q)), _conform(lse, _lse_layout(q))


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, seed, scale, left, right, dropout_p):
    return _empty(_layout(q), q.device), _empty(_lse_layout(q), q.device)


@torch.library.custom_op("leedl_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                      scale: float, left: int, right: int,
                      dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _use_triton(q):
        return _attention_bwd_torch(do, q, k, v, o, lse, key_padding_mask, scale, left, right, dropout_p,
                                    seed_int(seed))
    from leedl_fast.kernels.attention import attention_bwd

    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, scale=scale, left=left, right=right,
                               key_padding_mask=key_padding_mask, dropout_p=dropout_p, seed=seed_int(seed))
    return (_conform(dq, _grad_layout(q, dropout_p)), _conform(dk, _grad_layout(k, dropout_p)),
            _conform(dv, _grad_layout(v, dropout_p)))


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, seed, scale, left, right, dropout_p):
    return tuple(_empty(_grad_layout(t, dropout_p), t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, seed, scale, left, right, dropout_p = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kpm, seed)
    ctx.args = (scale, left, right, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, kpm, seed = ctx.saved_tensors
    scale, left, right, dropout_p = ctx.args
    if do is None:
        return (None,) * 9
    do = do.to(o.dtype)

    def first():
        return _attention_bwd_op(do, q, k, v, o, lse, kpm, seed, scale, left, right, dropout_p)

    dq, dk, dv = _first_backward(first, do, q, k, v, lambda: (kpm, seed_int(seed), scale, left, right, dropout_p))
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("leedl_fast::attention_fwd", _backward, setup_context=_setup_context)


def _one_call(q, k, kpm, left, right, dropout_p):
    """``(causal, mask)`` when the eager PyTorch path is one call of ATen's fused CPU kernel (on the CPU, no
    dropout, a band that is dense, or causal with Nq == Nk), else None.  That call gives a row whose keys are
    all padded o = 0 and lse = 0, so zero gradients in its backward: nothing to patch up."""
    if dropout_p > 0 or q.device.type != "cpu":
        return None
    nq, nk = q.shape[2], k.shape[2]
    left, right = _effective_band(nq, nk, left, right)
    if left >= 0 or (right >= 0 and not (right == 0 and nq == nk)):
        return None
    return right == 0, _pad_additive(kpm, 0, nk, q.dtype)


class _EagerTorchAttention(torch.autograd.Function):
    """The custom ops' PyTorch implementations and autograd formula, called without torch.library's
    dispatch: in eager mode on the PyTorch path that dispatch costs about 0.1 ms a call on the
    2-core development machine, as much as the whole op at the sizes of a decoding step.  The
    elementwise ops skip it the same way; torch.compile traces the custom op.  A problem that is one
    call of ATen's kernel (``_one_call``) skips the layout bookkeeping the custom ops need for their fake
    implementations too (lse stays internal, in the kernel's own layout): about 0.2 ms a forward and
    backward at small sizes."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, seed, scale, left, right, dropout_p):
        o, saved, ctx.one_call = _eager_fwd(q, k, v, kpm, seed, scale, left, right, dropout_p, for_backward=True)
        ctx.save_for_backward(q, k, v, o, *saved)
        ctx.problem = (kpm, seed, scale, left, right, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, *saved = ctx.saved_tensors
        do = do.to(o.dtype)
        kpm, seed, scale, left, right, dropout_p = ctx.problem

        def first():
            if ctx.one_call is not None:
                lse, mask = saved
                return _flash_bwd(_unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v), o, lse,
                                  ctx.one_call, mask, scale)
            lse, *probs = saved
            return _attention_bwd_torch(do, q, k, v, o, lse, kpm, scale, left, right, dropout_p, seed, *probs)

        dq, dk, dv = _first_backward(first, do, q, k, v, lambda: ctx.problem)
        return dq, dk, dv, None, None, None, None, None, None


def _eager_fwd(q, k, v, kpm, seed, scale, left, right, dropout_p, for_backward=False):
    """The eager forward: ``(o, what the backward needs besides q, k, v and o, causal)``.  ``causal`` is
    None unless the problem is one call of ATen's kernel (``_one_call``), whose backward needs the
    kernel's lse and additive mask; the general backward needs lse, and ``for_backward`` keeps the
    plain-math path's probabilities when the problem is one block of it (``_fwd_math``): at most
    ``_MATH_BLOCK_SCORES`` numbers, fewer than the probabilities, mask and dropped probabilities SDPA's
    math path keeps, and a backward without the score product, the exponentials and the Philox rounds."""
    one = _one_call(q, k, kpm, left, right, dropout_p)
    if one is not None:
        causal, mask = one
        o, lse = _flash(_unit_last(q), _unit_last(k), _unit_last(v), causal, mask, scale)
        return o, (lse, mask), causal
    o, lse, probs = _attention_fwd_torch(q, k, v, kpm, scale, left, right, dropout_p, seed, for_backward)
    return o, (lse,) if probs is None else (lse, probs), None


class _NoScores(torch.autograd.Function):
    """Attention with Nq = 0 or Nk = 0: no score to compute.  Every query row sees no key, so the output
    is zeros (as for any such row) and every gradient is zero; no kernel runs."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.specs = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)

    @staticmethod
    def backward(ctx, do):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs)


# ----------------------------------------------------------------------------- public API

def _check_args(q, k, v, causal, window, key_padding_mask, dropout_p, scale, seed):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same(("q", "k", "v"), (q, k, v))
    b, hq, nq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {b}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {d}")
    hkv, nk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q's head count {hq} must be a multiple of k's {hkv} (grouped-query attention)")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q's head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = ignore that key), got "
                             f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(b, nk)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    check_dropout(dropout_p, seed)
    check_number("scale", scale, optional=True)
    return normalize_window(causal, window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, window=None,
              key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              scale: Optional[float] = None, seed: Optional[int] = None) -> torch.Tensor:
    """Softmax attention ``softmax(scale * q k^T + mask) v`` without materialising the attention matrix.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq a multiple of Hkv (GQA/MQA, no copies).
            float16, bfloat16, float32 (float64 on the torch path); any strides; 16 <= D <= 256;
            Nq != Nk allowed; Nq = 0 gives an empty result, Nk = 0 zeros (no query sees a key).
        causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned).
        window: None or (left, right): query i sees keys i + (Nk - Nq) - left .. i + (Nk - Nq) + right,
            inclusive, -1 = unbounded on that side.  With ``causal`` the right bound is 0.  See the
            module docstring for converters from FlexAttention / FlashAttention conventions.
        key_padding_mask: (B, Nk) bool, True = ignore that key (torch.nn.MultiheadAttention's convention).
        dropout_p: probability of dropping an attention probability, in [0, 1), applied in steps of
            2**-16; kept ones are scaled by ``leedl_fast.random.dropout_scale(dropout_p)`` (see Dropout).
        scale: multiplies q k^T; default 1 / sqrt(D).
        seed: Philox seed for the dropout mask; None draws one from torch's default generator.

    Returns (B, Hq, Nq, D) in q's dtype; rows with no visible key are zeros (zero gradients).
    Runs the Triton kernels for CUDA tensors (``leedl_fast.backend``), the torch path otherwise:
    ATen's fused CPU attention kernels, over blocks of query rows for a band (O(N * w)).  On GPU,
    float32 inputs use TF32 tensor-core products (``tl.dot``), so float32 results carry about
    1e-3 relative error there.  Deterministic: the same inputs and seed give the same bits.
    Differentiable any number of times (the second derivative by dense math, see the module docstring).
    """
    left, right = _check_args(q, k, v, causal, window, key_padding_mask, dropout_p, scale, seed)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return _NoScores.apply(q, k, v)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed_t = dropout_seed(seed, dropout_p)
    kpm = key_padding_mask.contiguous() if key_padding_mask is not None else None
    if not torch.compiler.is_compiling() and not _use_triton(q):
        seed_i = seed_int(seed_t)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _EagerTorchAttention.apply(q, k, v, kpm, seed_i, scale, left, right, dropout_p)
        return _eager_fwd(q, k, v, kpm, seed_i, scale, left, right, dropout_p)[0]
    o, _ = _attention_fwd_op(q, k, v, kpm, seed_t, scale, left, right, dropout_p)
    return o


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, **kwargs) -> torch.Tensor:
    """``attention(q, k, v, window=window, **kwargs)``: query i sees keys i - left .. i + right
    (shifted by Nk - Nq), in O(N * (left + right + 1)) time and memory on every path."""
    if window is None:
        raise ValueError("window must be a pair of ints (left, right) for banded_attention, got None")
    return attention(q, k, v, window=window, **kwargs)
