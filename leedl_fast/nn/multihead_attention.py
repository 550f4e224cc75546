"""Multi-head attention modules on the fused attention op.

``MultiheadAttention`` mirrors ``torch.nn.MultiheadAttention``: the same constructor
arguments (plus ``window``), parameter names, state_dict keys, initialisation,
forward signature and results, so a state_dict loads either way with
``strict=True``.  For each head h (of ``num_heads``, head dim d = embed_dim / num_heads):

    q_h = query W_q,h + b_q,h,   k_h = key W_k,h + b_k,h,   v_h = value W_v,h + b_v,h
    head_h = softmax(q_h k_h^T / sqrt(d) + mask) v_h
    output = concat_h(head_h) W_o^T + b_o

``TruncatedSelfAttention`` is the same module with a required ``window``: each
position attends only to positions i - left .. i + right (banded attention, O(N * w)).

Which path a call takes:

* ``need_weights=False`` with no mask, a key padding mask, a causal mask (bool or
  float, or ``is_causal=True``) and/or the module's ``window``: the fused op
  ``leedl_fast.ops.attention`` (Triton on CUDA, ATen's fused CPU kernels
  otherwise), dropout included (Philox keyed by a seed drawn from torch's
  generator).  No (L, S) weight matrix is formed.  On the PyTorch backend, plain
  attention, square causal attention and padded (not causal) attention go to
  torch's ``scaled_dot_product_attention`` instead, as torch.nn does
  (``torch_sdpa_computes``).
* ``need_weights=True``: a dense computation that forms the (B, H, L, S) weights
  as torch's module does; it costs O(B * H * L * S) time and memory (what torch's
  module costs on that path) and is differentiable through the weights.
* An arbitrary ``attn_mask`` (not causal, not all-False), a float padding mask with
  values other than 0 / -inf, ``add_bias_kv`` / ``add_zero_attn`` combined with a
  causal mask or a window, or a head dim outside the op's 16..256: the same dense
  computation, with a one-time warning.

Differences from torch: a query row that sees no key returns zeros (torch
returns NaN).  Dropout: on the PyTorch backend (CPU) the mask is torch's own,
drawn as torch.nn draws it, so for the same torch seed the calls that go to SDPA
give torch.nn's result on both paths (the others, such as a window, go to the
op, whose PyTorch path draws the Triton kernel's Philox mask); on the
Triton backend it is the kernel's Philox stream, which the weights path
reproduces, so the two paths compute the same function for the same seed, equal
to torch's in distribution.  With
``add_bias_kv`` / ``add_zero_attn`` the extra keys are appended after the
sequence and are visible to every query, as in torch, with one exception on
torch's side: with ``is_causal=True``, ``need_weights=False`` and no key
padding mask torch calls SDPA's top-left causal mask over the keys and the
extra ones together, which hides the extra keys from the first rows (its
``need_weights=True`` path shows them); here they stay visible on every path.
``is_causal`` is a hint about ``attn_mask``, trusted (as torch trusts it) when
the mask is square; a non-square mask is read, and both causal alignments
(bottom-right, the op's, and top-left, SDPA's) take the fused op.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import backend
from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, _dropout_keep, attention, normalize_window
from ..random import dropout_scale
from ..random import MAX_SEED

__all__ = ["MultiheadAttention", "TruncatedSelfAttention"]

_warned = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def needs_grad(t: Optional[torch.Tensor]) -> bool:
    """Whether autograd will differentiate with respect to ``t`` (a mask: a learned bias) in this call."""
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _bool_or_none(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """A mask (bool or float: ``_check`` refuses the rest) as bool (True = masked out) when it is bool or a
    float mask of only 0 / -inf that needs no gradient; else None.  (A float mask that requires grad, such as a
    learned bias that is still all zeros, stays a float mask: as a bool one it would lose its gradient.)"""
    if mask.dtype == torch.bool:
        return mask
    if needs_grad(mask):
        return None
    neg = torch.isneginf(mask)
    if bool(((mask == 0) | neg).all()):
        return neg
    return None


def torch_sdpa_computes(q: torch.Tensor, *, causal: bool, window, key_padding_mask, n_k: int) -> bool:
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` computes this attention on the PyTorch
    backend (see :func:`torch_sdpa`): no window; causal only when square (SDPA's causal mask is top-left
    aligned) and without a key padding mask; a key padding mask only in bool form and with no fully padded
    row (SDPA before torch 2.5 gives NaN there; ours gives zeros); outside tracing.  There torch's fused
    CPU kernel is the fastest PyTorch path, and its dropout is torch's own, drawn as torch.nn's modules
    draw it (the op's PyTorch path reproduces the Triton kernel's Philox mask, several times slower)."""
    if window is not None or torch.compiler.is_compiling() or backend.select("attention", q) != "torch":
        return False
    if key_padding_mask is None:
        return not causal or q.shape[-2] == n_k
    return (not causal and key_padding_mask.dtype == torch.bool
            and not bool(key_padding_mask.all(dim=-1).any()))


def torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, key_padding_mask,
               dropout_p: float) -> torch.Tensor:
    """Attention of (B, H, L, d) heads by torch's SDPA, where :func:`torch_sdpa_computes` says it does."""
    keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]   # [B, 1, 1, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, is_causal=causal)


def _top_left_causal(n_q: int, n_k: int, device) -> torch.Tensor:
    """(L, S) bool, True where j > i: SDPA's ``is_causal`` mask (top-left aligned), which torch.nn's
    module computes for ``is_causal=True`` when it goes to SDPA."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).triu_(1)


def _causal_pattern(n_q: int, n_k: int, device) -> torch.Tensor:
    """(L, S) bool, True above the bottom-right aligned diagonal: the keys causal attention hides."""
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    return torch.arange(n_k, device=device)[None, :] > i


class MultiheadAttention(nn.Module):
    """Drop-in ``torch.nn.MultiheadAttention`` on the fused attention op, with an optional band.

    Args (as torch.nn.MultiheadAttention): embed_dim, num_heads, dropout, bias, add_bias_kv,
        add_zero_attn, kdim, vdim, batch_first, device, dtype; and
        window: None or (left, right): query i attends keys i - left .. i + right (-1 = unbounded),
            shifted by S - L when the lengths differ (see ``leedl_fast.ops.attention``).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights):
        query (L, B, E) or (B, L, E) with ``batch_first`` or unbatched (L, E); key (S, B, kdim),
        value (S, B, vdim) likewise.  key_padding_mask (B, S) (unbatched: (S,)), bool (True =
        ignore) or float (added).  attn_mask (L, S) or (B * num_heads, L, S), bool (True = not
        allowed) or float (added).  is_causal: attn_mask is the causal mask (a hint, as in torch,
        trusted for a square mask; here attn_mask may also be None: bottom-right causal).  Returns
        output shaped like query (with E = embed_dim), and weights (B, L, S) averaged over heads
        or (B, num_heads, L, S), or None when ``need_weights=False``.

    Cost: ``need_weights=True`` forms the (B, H, L, S) weights (O(B*H*L*S) memory, as torch does);
    pass ``need_weights=False`` for the fused path.  See the module docstring for the paths.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None,
                 window=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.window = None if window is None else normalize_window(False, window)

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation: Xavier-uniform projections, zero biases,
        # Xavier-normal bias_k / bias_v (out_proj.weight keeps nn.Linear's default).
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}"

    # ------------------------------------------------------------------ helpers

    def _projections(self, query, key, value):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(e)
        if self._qkv_same_embed_dim and query is key and key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(e, dim=-1)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _check(self, query, key, value, key_padding_mask, attn_mask):
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must have query's {query.dim()} dims, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got {query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key/value last dims must be kdim={self.kdim}, vdim={self.vdim}, got "
                             f"{key.shape[-1]}, {value.shape[-1]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree except in the last dim, got {tuple(key.shape)} "
                             f"and {tuple(value.shape)}")
        bdim = 0 if self.batch_first else 1
        if query.dim() == 3 and key.shape[bdim] != query.shape[bdim]:
            raise ValueError(f"query and key/value must have the same batch size, got {query.shape[bdim]} and "
                             f"{key.shape[bdim]} (shapes {tuple(query.shape)} and {tuple(key.shape)})")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not (isinstance(m, torch.Tensor) and (m.dtype == torch.bool or m.is_floating_point())):
                # torch.nn raises too; an int 0/1 mask added to the scores would be a silent +1 bias
                raise ValueError(f"{name} must be a bool or floating-point tensor, got "
                                 f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ValueError(f"key_padding_mask must be {query.dim() - 1}-D, got shape {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")

    # ------------------------------------------------------------------ forward

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        self._check(query, key, value, key_padding_mask, attn_mask)
        batched = query.dim() == 3
        # Self-attention (one tensor for all three) keeps its identity through the re-layout below, so that
        # _projections runs one packed product for q, k and v instead of three.
        same = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # (L, B, E) -> (B, L, E) views; torch computes the same function in the other layout.
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if same:
            key = value = query
        bsz, n_q, e = query.shape
        n_k = key.shape[1]
        h, d = self.num_heads, self.head_dim
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, n_k):
            raise ValueError(f"key_padding_mask must have shape {(bsz, n_k) if batched else (n_k,)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            want = [(n_q, n_k), (bsz * h, n_q, n_k)]
            if tuple(attn_mask.shape) not in want:
                raise ValueError(f"attn_mask must have shape {want[0]} or {want[1]}, got {tuple(attn_mask.shape)}")

        q, k, v = self._projections(query, key, value)                                   # [B, L|S, E]
        n_extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, e).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, e).to(v.dtype)], dim=1)
            n_extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, 1, e)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz, 1, e)], dim=1)
            n_extra += 1
        q = q.unflatten(-1, (h, d)).transpose(1, 2)                                      # [B, H, L, d]
        k = k.unflatten(-1, (h, d)).transpose(1, 2)                                      # [B, H, S', d]
        v = v.unflatten(-1, (h, d)).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0

        out, weights = None, None
        if not need_weights:
            plan = self._fused_plan(key_padding_mask, attn_mask, is_causal, n_q, n_k, n_extra, d)
            if plan is not None:
                causal, window, kpm, n_seen = plan
                if n_seen < n_k:                     # keys no query sees (a top-left causal mask, L < S)
                    k, v = k[:, :, :n_seen], v[:, :, :n_seen]
                    kpm = None if kpm is None else kpm[:, :n_seen]
                if kpm is not None and n_extra:
                    kpm = torch.cat([kpm, kpm.new_zeros(bsz, n_extra)], dim=1)
                if torch_sdpa_computes(q, causal=causal, window=window, key_padding_mask=kpm, n_k=k.shape[2]):
                    out = torch_sdpa(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=float(dropout_p))
                else:
                    out = attention(q, k, v, causal=causal, window=window, key_padding_mask=kpm,
                                    dropout_p=float(dropout_p))
        if out is None:
            out, weights = self._dense(q, k, v, key_padding_mask, attn_mask, is_causal, n_q, n_k, n_extra,
                                       float(dropout_p), need_weights)
        out = out.transpose(1, 2).reshape(bsz, n_q, e)                                   # [B, L, E]
        out = self.out_proj(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            if weights is not None:
                weights = weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, (weights if need_weights else None)

    def _fused_plan(self, key_padding_mask, attn_mask, is_causal, n_q, n_k, n_extra, d):
        """(causal, window, bool key padding mask or None, keys seen) for the fused op, or None for the
        dense path.

        ``is_causal`` is trusted, as torch.nn trusts it, when the mask is square or absent; a non-square
        ``attn_mask`` is read instead, since torch's module computes it on one path and SDPA's top-left
        causal mask on the other.  Two causal patterns reach the op without a mask tensor: the op's
        bottom-right one (``j <= i + S - L``) as its causal flag, and SDPA's top-left one (``j <= i``)
        as the band ``(-1, L - S)`` when L > S, or as square causal attention over the first L keys
        (the others are seen by no query) when L < S."""
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            _warn_once("head_dim", f"leedl_fast.nn.MultiheadAttention: head dim {d} is outside the fused op's "
                       f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM}; using the dense PyTorch path")
            return None
        kpm = None
        if key_padding_mask is not None:
            kpm = _bool_or_none(key_padding_mask)
            if kpm is None:
                _warn_once("kpm", "leedl_fast.nn.MultiheadAttention: a float key_padding_mask with values "
                           "other than 0/-inf (or one that requires grad) takes the dense PyTorch path")
                return None
        causal, window, n_seen = False, self.window, n_k
        if attn_mask is None or (is_causal and n_q == n_k):
            causal = bool(is_causal)
        else:
            masked = _bool_or_none(attn_mask)
            if masked is not None and not bool(masked.any()):
                pass
            elif masked is not None and bool((masked == _causal_pattern(n_q, n_k, masked.device)).all()):
                causal = True
            elif masked is not None and bool((masked == _top_left_causal(n_q, n_k, masked.device)).all()) and (
                    n_q > n_k or window is None):
                if n_q > n_k:
                    left, right = window if window is not None else (-1, -1)
                    window = (left, n_q - n_k if right < 0 else min(right, n_q - n_k))
                else:
                    causal, n_seen = True, n_q
            else:
                _warn_once("attn_mask", "leedl_fast.nn.MultiheadAttention: an attn_mask that is neither "
                           "causal nor empty takes the dense PyTorch path (O(L*S) memory)")
                return None
        if n_extra and (causal or window is not None):
            _warn_once("extra", "leedl_fast.nn.MultiheadAttention: add_bias_kv/add_zero_attn with a causal "
                       "mask or a window take the dense PyTorch path")
            return None
        return causal, window, kpm, n_seen

    def _dense(self, q, k, v, key_padding_mask, attn_mask, is_causal, n_q, n_k, n_extra, dropout_p, need_weights):
        """Dense attention with the (B, H, L, S') weights; returns (out [B, H, L, d], weights).

        torch's own weights path in ATen ops (scores, softmax, dropout, product); masks are applied only
        when given, and a row that sees no key gets zero weights (its scores are cleared before the softmax
        and its weights after, so neither the output nor a gradient sees a NaN)."""
        bsz, h, _, d = q.shape
        n_kx = n_k + n_extra
        dev = q.device
        s = (q * (1.0 / math.sqrt(d))) @ k.transpose(-1, -2)                             # [B, H, L, S']
        # Without autograd (inference) every step below overwrites s: the softmax of a fresh (B, H, L, S)
        # tensor costs 4x the in-place one on the CPU (page faults on the new buffer), as torch's own
        # inference path does it in place.  A float mask that needs a gradient (a learned bias on a frozen
        # module) keeps the autograd path: the in-place softmax has no derivative.
        in_place = not (s.requires_grad or needs_grad(attn_mask) or needs_grad(key_padding_mask))
        hidden = []                                                                      # bool, True = masked
        if attn_mask is not None:
            am = attn_mask if attn_mask.dim() == 2 else attn_mask.view(bsz, h, n_q, n_k)
            am = F.pad(am, (0, n_extra))
            if am.dtype == torch.bool:
                hidden.append(am)
            else:
                s = s.add_(am.to(q.dtype)) if in_place else s + am.to(q.dtype)
        elif is_causal:
            hidden.append(F.pad(_causal_pattern(n_q, n_k, dev), (0, n_extra)))
        if self.window is not None:
            left, right = self.window
            i = torch.arange(n_q, device=dev)[:, None] + (n_k - n_q)
            j = torch.arange(n_k, device=dev)[None, :]
            band_out = torch.zeros(n_q, n_k, dtype=torch.bool, device=dev)
            if left >= 0:
                band_out |= j < i - left
            if right >= 0:
                band_out |= j > i + right
            hidden.append(F.pad(band_out, (0, n_extra)))
        if key_padding_mask is not None:
            kp = F.pad(key_padding_mask, (0, n_extra))[:, None, None, :]
            if kp.dtype == torch.bool:
                hidden.append(kp)
            else:
                s = s.add_(kp.to(q.dtype)) if in_place else s + kp.to(q.dtype)
        masked = bool(hidden) or attn_mask is not None or key_padding_mask is not None
        if hidden:
            m = hidden[0]
            for extra in hidden[1:]:
                m = m | extra
            s = s.masked_fill_(m, float("-inf")) if in_place else s.masked_fill(m, float("-inf"))
        if masked:
            dead = torch.isneginf(s).all(-1, keepdim=True)                               # rows with no visible key
            s = s.masked_fill_(dead, 0.0) if in_place else s.masked_fill(dead, 0.0)
        w = torch.softmax(s, dim=-1, out=s) if in_place else torch.softmax(s, dim=-1)
        if masked:
            w = w.masked_fill_(dead, 0.0) if in_place else w.masked_fill(dead, 0.0)
        if dropout_p > 0 and backend.select("attention", q) == "torch":
            w = F.dropout(w, dropout_p)                                                  # torch's, as torch.nn's
        elif dropout_p > 0:
            seed = int(torch.randint(0, MAX_SEED, (), dtype=torch.int64).item())
            keep = _dropout_keep(seed, q, n_kx, 0, n_q, 0, n_kx, dropout_p)  # the kernel's mask
            w = w * keep * dropout_scale(dropout_p)
        return w @ v, w


class TruncatedSelfAttention(MultiheadAttention):
    """Banded (truncated) self-attention: ``MultiheadAttention`` with a required ``window``.

    Each position i attends only to positions i - left .. i + right (``window=(left, right)``,
    -1 = unbounded; ``(w, 0)`` is a causal sliding window of w + 1 positions), in O(N * w) time
    and memory on the fused path.  The course's answer to attention's N^2 cost on long inputs
    such as speech frames.  Mirrors ``torch.nn.MultiheadAttention`` with a band ``attn_mask``
    (same parameters and state_dict keys); ``key`` and ``value`` default to ``query``.
    """

    def __init__(self, embed_dim: int, num_heads: int, window, **mha_kwargs) -> None:
        if window is None:
            raise ValueError("window must be a pair of ints (left, right) for TruncatedSelfAttention, got None")
        super().__init__(embed_dim, num_heads, window=window, **mha_kwargs)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        key = query if key is None else key
        value = key if value is None else value
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
