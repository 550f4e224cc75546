"""The course's Transformer: encoder, decoder and seq2seq model as drop-ins for torch.nn's.

``TransformerEncoderLayer``, ``TransformerEncoder``, ``TransformerDecoderLayer``,
``TransformerDecoder`` and ``Transformer`` take the constructor arguments, and
have the parameter names, state_dict keys and forward signatures, of their
``torch.nn`` twins, so ``load_state_dict(strict=True)`` works both ways.  An
encoder layer computes (post-norm; ``norm_first=True`` moves each norm in
front of its block)

    x = norm1(x + dropout1(self_attn(x)))
    x = norm2(x + dropout2(linear2(dropout(activation(linear1(x))))))

and a decoder layer adds masked self-attention and cross-attention over the
encoder's output ``memory`` (Vaswani et al., 2017, "Attention Is All You Need").

What differs from torch.nn:

* Attention runs on ``leedl_fast.ops.attention``.  A causal mask (the
  ``*_is_causal`` hints, or a bool/float mask equal to
  ``generate_square_subsequent_mask``) reaches the kernel as its causal flag,
  never as a dense N x N mask; a boolean ``*_key_padding_mask`` reaches it as
  a per-key flag.  Other masks (arbitrary bool/float masks, float key padding
  masks) take a dense fallback built on ``F.scaled_dot_product_attention``.
  On the PyTorch path, plain and causal self-attention also use
  ``F.scaled_dot_product_attention`` (torch's fused CPU kernel).
* ``window=(left, right)`` on the layers and on ``Transformer`` restricts
  self-attention to keys ``i - left <= j <= i + right`` (``-1``: unbounded):
  truncated self-attention, O(N * w) on the kernel path.
* A query row with no visible key (say a fully padded sequence) gives zeros,
  not NaN.  ``is_causal=True`` with no mask means causal (torch.nn requires
  the mask too).
* Incremental decoding: ``TransformerDecoder.new_cache()`` returns a
  ``DecoderCache``; ``decoder(new_tgt, memory, cache=cache)`` decodes only the
  new target positions, attending to the keys/values of all earlier positions
  kept in the cache, and gives the same result as decoding the full sequence
  with a causal mask.  ``Transformer.generate`` does greedy seq2seq decoding
  with it.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend
from .._checks import check_int, check_number
from ..ops.attention import MAX_HEAD_DIM as _OP_MAX_HEAD_DIM
from ..ops.attention import MIN_HEAD_DIM as _OP_MIN_HEAD_DIM
from ..ops.attention import attention as _attention_op
from ..ops.attention import normalize_window
from ..ops.bias_act import bias_act_dropout
from ..ops.layer_norm import dropout_add_layer_norm
from .multihead_attention import MultiheadAttention, needs_grad, torch_sdpa, torch_sdpa_computes

__all__ = [
    "TransformerEncoderLayer", "TransformerEncoder", "TransformerDecoderLayer", "TransformerDecoder",
    "Transformer", "DecoderCache", "LayerCache",
]


# ----------------------------------------------------------------------------------------------------------------
# Argument handling
# ----------------------------------------------------------------------------------------------------------------

def _get_activation(activation) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    if callable(activation):
        return activation
    raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")


def _check_sizes(d_model, nhead, dim_feedforward, dropout):
    for name, v in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
        check_int(name, v, 1)
    if d_model % nhead:
        raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
    check_number("dropout", dropout, 0, 1)


def _batched(x: Tensor, name: str, batch_first: bool, d_model: int) -> tuple[Tensor, bool]:
    """``x`` with a batch dimension (an unbatched (seq, d_model) input gets one of size 1)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != d_model:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        layout = "(batch, seq, d_model)" if batch_first else "(seq, batch, d_model)"
        raise ValueError(f"{name} must be {layout} or unbatched (seq, d_model) with d_model={d_model}, got {shape}")
    if x.dim() == 2:
        return x.unsqueeze(0 if batch_first else 1), True
    return x, False


def _unbatched(x: Tensor, unbatched: bool, batch_first: bool) -> Tensor:
    return x.squeeze(0 if batch_first else 1) if unbatched else x


def _seq_len(x: Tensor, batch_first: bool) -> int:
    return x.shape[1] if (batch_first and x.dim() == 3) else x.shape[0]


def _check_padding(name: str, kpm, batch: int, n: int, unbatched: bool):
    if kpm is None:
        return None
    if not isinstance(kpm, torch.Tensor) or not (kpm.dtype == torch.bool or kpm.is_floating_point()):
        raise ValueError(f"{name} must be a bool or float tensor, got "
                         f"{kpm.dtype if isinstance(kpm, torch.Tensor) else type(kpm).__name__}")
    if unbatched and kpm.dim() == 1:
        kpm = kpm.unsqueeze(0)
    if tuple(kpm.shape) != (batch, n):
        raise ValueError(f"{name} must have shape (batch, seq) = ({batch}, {n}), got {tuple(kpm.shape)}")
    return kpm


def _check_mask(name: str, mask, nq: int, nk: int, batch_heads: int | None = None):
    """``mask`` (nq, nk) or (batch * nhead, nq, nk); ``batch_heads`` checks the leading size where it is known."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"{name} must be a bool or float tensor, got "
                         f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    lead = "batch * nhead" if batch_heads is None else batch_heads
    if (mask.dim() not in (2, 3) or tuple(mask.shape[-2:]) != (nq, nk)
            or (mask.dim() == 3 and batch_heads is not None and mask.shape[0] != batch_heads)):
        raise ValueError(f"{name} must have shape ({nq}, {nk}) or ({lead}, {nq}, {nk}), got {tuple(mask.shape)}")
    return mask


def _causal_pattern(nq: int, nk: int, device) -> Tensor:
    """True where key j is in the future of query i, bottom-right aligned: j > i + nk - nq."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).triu_(1 + nk - nq)


def _is_causal_mask(mask: Tensor, nq: int, nk: int) -> bool:
    """Whether ``mask`` (bool: True = masked; float: additive) is exactly the causal mask.

    A data-dependent test (one host sync), skipped while torch.compile traces:
    there a mask takes the dense path.  A float mask that requires grad (a learned bias that still equals the
    causal mask) is not replaced by the flag, which would drop its gradient."""
    if mask.dim() != 2 or torch.compiler.is_compiling() or needs_grad(mask):
        return False
    pattern = _causal_pattern(nq, nk, mask.device)
    if mask.dtype == torch.bool:
        return torch.equal(mask, pattern)
    return torch.equal(mask, torch.zeros(nq, nk, dtype=mask.dtype, device=mask.device).masked_fill_(pattern, float("-inf")))


def _resolve_mask(mask, is_causal, nq: int, nk: int) -> tuple[bool, Tensor | None]:
    """(causal flag, dense mask or None).  The ``is_causal`` hint is trusted for square masks, as torch.nn does;
    otherwise a mask equal to the causal one is recognised and dropped in favour of the flag."""
    if mask is None:
        return bool(is_causal), None
    if is_causal and nq == nk:
        return True, None
    if _is_causal_mask(mask, nq, nk):
        return True, None
    return False, mask


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------

def _to_heads(x: Tensor, batch_first: bool) -> Tensor:
    """(B, N, H, D) [batch first] or (N, B, H, D) -> (B, H, N, D), a view."""
    return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)


def _from_heads(o: Tensor, batch_first: bool) -> Tensor:
    """(B, H, N, D) -> (B, N, H*D) or (N, B, H*D)."""
    o = o.transpose(1, 2) if batch_first else o.permute(2, 0, 1, 3)
    return o.reshape(o.shape[0], o.shape[1], o.shape[2] * o.shape[3])     # explicit sizes: B or N may be 0


def _dense_attention(q, k, v, *, causal, window, mask, kpm, dropout_p) -> Tensor:
    """Attention with an explicit additive mask: arbitrary masks and float padding masks.

    Built on ``F.scaled_dot_product_attention``; rows with no visible key give zeros (their mask row is
    cleared before the softmax so neither the output nor the gradient sees a NaN)."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    neg = float("-inf")
    bias = torch.zeros(1, 1, nq, nk, dtype=q.dtype, device=q.device)
    if mask is not None:
        m = mask if mask.dim() == 2 else mask.view(b, h, nq, nk)
        bias = bias.masked_fill(m, neg) if m.dtype == torch.bool else bias + m.to(q.dtype)
    if kpm is not None:
        p = kpm[:, None, None, :]
        bias = bias.masked_fill(p, neg) if p.dtype == torch.bool else bias + p.to(q.dtype)
    if causal or window is not None:
        i = torch.arange(nq, device=q.device)[:, None] + (nk - nq)
        j = torch.arange(nk, device=q.device)[None, :]
        hidden = torch.zeros(nq, nk, dtype=torch.bool, device=q.device)
        if causal:
            hidden |= j > i
        if window is not None:
            if window[0] >= 0:
                hidden |= j < i - window[0]
            if window[1] >= 0:
                hidden |= j > i + window[1]
        bias = bias.masked_fill(hidden, neg)
    dead = torch.isneginf(bias).all(-1, keepdim=True)
    bias = bias.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    return out.masked_fill(dead, 0.0)


def _attend(q, k, v, *, causal, window, mask, kpm, dropout_p) -> Tensor:
    """softmax(q k^T / sqrt(D)) v over (B, H, N, D) heads, on the fastest path that computes it."""
    nq, nk = q.shape[2], k.shape[2]
    if causal and nq == 1 and window is None:
        causal = False  # the newest query sees every key
    op_head_dim = _OP_MIN_HEAD_DIM <= q.shape[-1] <= _OP_MAX_HEAD_DIM
    if mask is not None or (kpm is not None and kpm.dtype != torch.bool) or not op_head_dim:
        # head dims outside the op's range also land here (dense: O(N^2) memory, a fallback only)
        return _dense_attention(q, k, v, causal=causal, window=window, mask=mask, kpm=kpm, dropout_p=dropout_p)
    if torch_sdpa_computes(q, causal=causal, window=window, key_padding_mask=kpm, n_k=nk):
        return torch_sdpa(q, k, v, causal=causal, key_padding_mask=kpm, dropout_p=dropout_p)
    return _attention_op(q, k, v, causal=causal, window=window, key_padding_mask=kpm, dropout_p=dropout_p)


class LayerCache:
    """One decoder layer's state for incremental decoding.

    ``self_k`` / ``self_v``: (batch, nhead, n, head_dim) keys and values of the target positions decoded so
    far (only the last ``left`` of them when the layer has a window ``(left, right)``); ``memory_k`` /
    ``memory_v``: the cross-attention keys and values of ``memory``, computed on the first call."""

    __slots__ = ("self_k", "self_v", "memory_k", "memory_v")

    def __init__(self):
        self.self_k = self.self_v = self.memory_k = self.memory_v = None


class DecoderCache:
    """The key/value cache of a ``TransformerDecoder``: one ``LayerCache`` per layer, and ``length``, the
    number of target positions decoded so far (the position index of the next one).  Make one with
    ``decoder.new_cache()`` per sequence batch; a call with ``cache=`` appends to it."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.length = 0


def _self_attention(mha, x, *, batch_first, causal, window, mask, kpm, training, cache: LayerCache | None):
    h = mha.num_heads
    d = mha.embed_dim // h
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).unflatten(-1, (3, h, d))
    q, k, v = (_to_heads(t, batch_first) for t in qkv.unbind(-3))
    if cache is not None:
        if cache.self_k is not None:
            k = torch.cat([cache.self_k, k], dim=2)
            v = torch.cat([cache.self_v, v], dim=2)
        # A window (left, right) on a causal decoder never looks further back than `left` positions.
        keep = k.shape[2] if (window is None or window[0] < 0) else min(window[0], k.shape[2])
        cache.self_k, cache.self_v = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
    o = _attend(q, k, v, causal=causal, window=window, mask=mask, kpm=kpm,
                dropout_p=mha.dropout if training else 0.0)
    return _out_proj(mha, o, batch_first, x)


def _out_proj(mha, o: Tensor, batch_first: bool, x: Tensor) -> Tensor:
    """``out_proj`` of the heads o (B, H, N, D): (B, N, E) or (N, B, E).  On the PyTorch path, batch first, laid
    out as torch.nn.MultiheadAttention returns it, a transposed view of an (N, B, E) tensor: the layer's dropout
    (torch's there) then draws its mask in torch's memory order, so a torch seed gives torch.nn's result.  The
    fused kernels take it contiguous."""
    if batch_first and not _fused(x):
        return F.linear(_from_heads(o, False), mha.out_proj.weight, mha.out_proj.bias).transpose(0, 1)
    return F.linear(_from_heads(o, batch_first), mha.out_proj.weight, mha.out_proj.bias)


def _cross_attention(mha, x, memory, *, batch_first, causal, mask, kpm, training, cache: LayerCache | None):
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = _to_heads(F.linear(x, w[:e], None if b is None else b[:e]).unflatten(-1, (h, d)), batch_first)
    if cache is not None and cache.memory_k is not None:
        k, v = cache.memory_k, cache.memory_v
    else:
        kv = F.linear(memory, w[e:], None if b is None else b[e:]).unflatten(-1, (2, h, d))
        k, v = (_to_heads(t, batch_first) for t in kv.unbind(-3))
        if cache is not None:
            cache.memory_k, cache.memory_v = k, v
    o = _attend(q, k, v, causal=causal, window=None, mask=mask, kpm=kpm,
                dropout_p=mha.dropout if training else 0.0)
    return _out_proj(mha, o, batch_first, x)


# ----------------------------------------------------------------------------------------------------------------
# Fused elementwise work on the kernel path
#
# torch runs linear1's bias, the activation and dropout, and later dropout, the residual add and layer norm, as
# separate kernels, each a pass over memory, and stores the dropout masks.  On the Triton path the layers run
# linear1 without its bias and then one ``bias_act_dropout`` kernel, and one ``dropout_add_layer_norm`` kernel
# per residual connection; both regenerate their dropout masks from Philox in the backward.  On the PyTorch path
# (CPU) the layers keep torch's own ops, which are fastest there.
# ----------------------------------------------------------------------------------------------------------------

_FUSED_ACTIVATIONS = {F.relu: "relu", F.gelu: "gelu"}


def _fused(x: Tensor, *params: Tensor | None) -> bool:
    """The kernel path, for activations and parameters of one dtype (under autocast torch's ops decide)."""
    return (x.dtype != torch.float64 and not torch.is_autocast_enabled(x.device.type)
            and all(p is None or p.dtype == x.dtype for p in params) and backend.select("layer_norm", x) == "triton")


def _p(dropout: nn.Module) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _fusable_norm(norm, d_model: int) -> bool:
    return (type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (d_model,)
            and type(norm.eps) is float)


def _fusable_residual(x: Tensor, y: Tensor, dropout: nn.Module, norm: nn.Module | None) -> bool:
    """Whether ``norm(x + dropout(y))`` runs as one ``dropout_add_layer_norm`` kernel."""
    return (norm is not None and type(dropout) is nn.Dropout and _fusable_norm(norm, x.shape[-1])
            and y.dtype == x.dtype and _fused(x, norm.weight, norm.bias))


def _add_norm(x: Tensor, y: Tensor, dropout: nn.Module, norm: nn.Module) -> Tensor:
    """Post-norm residual connection: ``norm(x + dropout(y))``."""
    if _fusable_residual(x, y, dropout, norm):
        return dropout_add_layer_norm(y, x, norm.weight, norm.bias, eps=norm.eps, dropout_p=_p(dropout))
    return norm(x + dropout(y))


def _add_then_norm(x: Tensor, y: Tensor, dropout: nn.Module, norm: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    """Pre-norm residual connection: ``h = x + dropout(y)`` and the next block's input ``norm(h)`` (None when
    no block follows)."""
    if _fusable_residual(x, y, dropout, norm):
        y_norm, h = dropout_add_layer_norm(y, x, norm.weight, norm.bias, eps=norm.eps, dropout_p=_p(dropout),
                                           return_residual=True)
        return h, y_norm
    h = x + dropout(y)
    return h, (None if norm is None else norm(h))


def _feed_forward(layer, x: Tensor) -> Tensor:
    """``linear2(dropout(activation(linear1(x))))``."""
    # by identity: a callable activation need not be hashable (torch.nn takes any callable)
    act = next((name for fn, name in _FUSED_ACTIVATIONS.items() if layer.activation is fn), None)
    if act is not None and type(layer.dropout) is nn.Dropout and _fused(x, layer.linear1.weight, layer.linear1.bias):
        y = F.linear(x, layer.linear1.weight)
        y = bias_act_dropout(y, layer.linear1.bias, activation=act, dropout_p=_p(layer.dropout))
        return layer.linear2(y)
    # As torch.nn does.  (An in-place ReLU would save a buffer, but linear1's output is a view of addmm's
    # (seq*batch, dim_feedforward) result, and autograd's CopySlices/AsStrided backward for the in-place
    # op on it cost ~5% of a CPU training step.)
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


def _mha_kwargs(window):
    return {} if window is None else {"window": window}


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------

class TransformerEncoderLayer(nn.Module):
    """Self-attention and a feed-forward network, each with a residual connection and layer norm.

    Mirrors ``torch.nn.TransformerEncoderLayer`` (same arguments, parameters, state_dict keys: ``self_attn.*``,
    ``linear1``, ``linear2``, ``norm1``, ``norm2``; same forward).  Input and output: (seq, batch, d_model),
    or (batch, seq, d_model) with ``batch_first=True``, or unbatched (seq, d_model).  ``window=(left, right)``
    truncates the self-attention to a band around each position.
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, window: tuple[int, int] | None = None) -> None:
        super().__init__()
        _check_sizes(d_model, nhead, dim_feedforward, dropout)
        f = {"device": device, "dtype": dtype}
        self.window = None if window is None else normalize_window(False, window)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            **_mha_kwargs(self.window), **f)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **f)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **f)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **f)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **f)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _get_activation(activation)
        self.batch_first = batch_first
        self.d_model = d_model

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        """``src_mask``: (seq, seq) or (batch * nhead, seq, seq), bool (True = not allowed) or float (added to
        the scores); ``src_key_padding_mask``: (batch, seq), True (or -inf) = padding; ``is_causal``: a hint that
        ``src_mask`` is the causal mask (or, with no mask, a request for causal attention)."""
        x, unbatched = _batched(src, "src", self.batch_first, self.d_model)
        n = _seq_len(x, self.batch_first)
        batch = x.shape[0] if self.batch_first else x.shape[1]
        mask = _check_mask("src_mask", src_mask, n, n, batch * self.self_attn.num_heads)
        kpm = _check_padding("src_key_padding_mask", src_key_padding_mask, batch, n, unbatched)
        causal, mask = _resolve_mask(mask, is_causal, n, n)
        if self.norm_first:
            x, h = _add_then_norm(x, self._sa_block(self.norm1(x), causal, mask, kpm), self.dropout1, self.norm2)
            x, _ = _add_then_norm(x, _feed_forward(self, h), self.dropout2, None)
        else:
            x = _add_norm(x, self._sa_block(x, causal, mask, kpm), self.dropout1, self.norm1)
            x = _add_norm(x, _feed_forward(self, x), self.dropout2, self.norm2)
        return _unbatched(x, unbatched, self.batch_first)

    def _sa_block(self, x, causal, mask, kpm):
        """Self-attention without its residual dropout (``dropout1``, applied in the residual connection)."""
        return _self_attention(self.self_attn, x, batch_first=self.batch_first, causal=causal, window=self.window,
                               mask=mask, kpm=kpm, training=self.training, cache=None)


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def _layer_batch_first(layer: nn.Module) -> bool:
    """The layout a layer takes: its ``batch_first``, else its ``self_attn``'s (where torch.nn's containers
    read it: torch.nn's layers keep no ``batch_first`` of their own)."""
    return bool(getattr(layer, "batch_first", getattr(getattr(layer, "self_attn", None), "batch_first", False)))


def _relu_or_gelu(activation) -> bool:
    """torch.nn.TransformerEncoderLayer's ``activation_relu_or_gelu`` test."""
    return activation in (F.relu, F.gelu) or isinstance(activation, (nn.ReLU, nn.GELU))


def _nested_capable(layer: nn.Module) -> bool:
    """torch.nn.TransformerEncoder's construction-time conditions for its nested-tensor path
    (``use_nested_tensor``), for our layer or torch.nn's."""
    if not isinstance(layer, (TransformerEncoderLayer, nn.TransformerEncoderLayer)):
        return False
    attn = layer.self_attn
    return (not layer.norm_first and attn.batch_first and attn._qkv_same_embed_dim
            and attn.in_proj_bias is not None and _relu_or_gelu(layer.activation)
            and layer.norm1.eps == layer.norm2.eps and attn.num_heads % 2 == 0)


def _left_aligned(pad: Tensor) -> bool:
    """Every row of the (B, N) padding mask is valid positions first, then padding."""
    valid = ~pad
    return not bool((valid[:, 1:] & ~valid[:, :-1]).any())


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` deep copies of ``encoder_layer``, then the optional ``norm``.

    Mirrors ``torch.nn.TransformerEncoder`` (state_dict keys ``layers.<i>.*`` and ``norm.*``).
    Padding is handled by the attention kernel's key mask; no nested tensors are built.  Where
    torch.nn.TransformerEncoder would run its nested-tensor path (``enable_nested_tensor`` and
    ``use_nested_tensor``, set from the layer as torch sets it; eval mode, no autograd, a key padding
    mask whose padding is at the end of each row when ``mask_check``, no ``mask``), the output is zero
    at the padded positions before ``norm``, as torch's is, and the padding is read as that path reads
    it: a position is padded iff its mask is nonzero (a float mask's finite values are not added to the
    scores there, as on torch's other paths, but drop their keys).  (With ``mask_check=False`` and
    padding elsewhere torch's path runs the first unpadded-count positions instead of the unpadded
    ones; here the padded positions are zeroed.)"""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        num_layers = check_int("num_layers", num_layers, 0)
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = bool(enable_nested_tensor) and _nested_capable(encoder_layer)
        self.mask_check = mask_check

    def _nested_padding(self, src: Tensor, mask, src_key_padding_mask) -> Tensor | None:
        """The (B, N) positions torch.nn.TransformerEncoder's nested-tensor path would return as zeros for
        this call, or None when it would not take that path (its forward-time conditions)."""
        kpm = src_key_padding_mask
        if (not self.use_nested_tensor or not torch.backends.mha.get_fastpath_enabled() or not self.layers
                or self.layers[0].training or src.dim() != 3 or kpm is None or mask is not None
                or src.is_nested or torch.is_autocast_enabled()):
            return None
        pad = kpm if kpm.dtype == torch.bool else kpm != 0
        if self.mask_check and (torch.compiler.is_compiling() or not _left_aligned(pad)):
            return None
        first = self.layers[0]
        tensors = (src, first.self_attn.in_proj_weight, first.self_attn.in_proj_bias, first.self_attn.out_proj.weight,
                   first.self_attn.out_proj.bias, first.norm1.weight, first.norm1.bias, first.norm2.weight,
                   first.norm2.bias, first.linear1.weight, first.linear1.bias, first.linear2.weight,
                   first.linear2.bias)
        if (src.device.type not in ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name)
                or torch.overrides.has_torch_function(tensors)
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
            return None
        return pad

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        """As ``TransformerEncoderLayer.forward``; a ``mask`` equal to the causal mask is detected once here."""
        out = src
        causal = bool(is_causal)
        zero = self._nested_padding(src, mask, src_key_padding_mask) if isinstance(src, torch.Tensor) else None
        if isinstance(src, torch.Tensor) and self.layers:
            n = _seq_len(src, _layer_batch_first(self.layers[0]))
            causal, resolved = _resolve_mask(_check_mask("mask", mask, n, n), is_causal, n, n)
            # Our layers take a causal mask as the flag alone; any other layer (torch.nn's) gets the mask with
            # the flag as a hint, as torch.nn.TransformerEncoder passes them.
            if all(isinstance(layer, TransformerEncoderLayer) for layer in self.layers):
                mask = resolved
        # On torch's nested-tensor path a position is padding iff its key padding mask is nonzero (True, or any
        # nonzero float): the padded keys are dropped, whatever a float mask's values (elsewhere they are added to
        # the scores).  There the layers take the same boolean mask.
        kpm = src_key_padding_mask if zero is None else zero
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=kpm, is_causal=causal)
        if zero is not None:
            out = out.masked_fill(zero[..., None], 0.0)
        if self.norm is not None:
            out = self.norm(out)
        return out


class TransformerDecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over ``memory`` and a feed-forward network, each with a residual
    connection and layer norm.

    Mirrors ``torch.nn.TransformerDecoderLayer`` (parameters ``self_attn.*``, ``multihead_attn.*``,
    ``linear1``, ``linear2``, ``norm1..3``; same forward).  ``window`` truncates the self-attention.
    With ``cache=`` (a ``LayerCache``) ``tgt`` holds only new positions: see ``TransformerDecoder``.
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, window: tuple[int, int] | None = None) -> None:
        super().__init__()
        _check_sizes(d_model, nhead, dim_feedforward, dropout)
        f = {"device": device, "dtype": dtype}
        self.window = None if window is None else normalize_window(False, window)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            **_mha_kwargs(self.window), **f)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, **f)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **f)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **f)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **f)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **f)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **f)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _get_activation(activation)
        self.batch_first = batch_first
        self.d_model = d_model

    def new_cache(self) -> LayerCache:
        return LayerCache()

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False, *, cache: LayerCache | None = None) -> Tensor:
        x, unbatched = _batched(tgt, "tgt", self.batch_first, self.d_model)
        mem, mem_unbatched = _batched(memory, "memory", self.batch_first, self.d_model)
        if mem_unbatched != unbatched:
            raise ValueError("tgt and memory must both be batched or both unbatched")
        bdim = 0 if self.batch_first else 1
        if x.shape[bdim] != mem.shape[bdim]:
            raise ValueError(f"tgt and memory must have the same batch size, got {x.shape[bdim]} and {mem.shape[bdim]}")
        n, s, batch = _seq_len(x, self.batch_first), _seq_len(mem, self.batch_first), x.shape[bdim]
        mem_kpm = _check_padding("memory_key_padding_mask", memory_key_padding_mask, batch, s, unbatched)
        if cache is not None:
            if not isinstance(cache, LayerCache):
                raise ValueError(f"cache must be a LayerCache (from new_cache()), got {type(cache).__name__}")
            for name, value in (("tgt_mask", tgt_mask), ("memory_mask", memory_mask),
                                ("tgt_key_padding_mask", tgt_key_padding_mask)):
                if value is not None:
                    raise ValueError(f"{name} is not supported with cache= (decoding with a cache is causal)")
            if memory_is_causal:
                # A causal cross-attention is aligned on the full target length (query i sees memory positions
                # j <= i + S - T), which a step of incremental decoding does not know; ignoring the flag would
                # silently compute the non-causal cross-attention.
                raise ValueError("memory_is_causal is not supported with cache= (the cross-attention of a decoding "
                                 "step sees all of memory)")
            if cache.self_k is not None and cache.self_k.shape[0] != batch:
                raise ValueError(f"cache holds a batch of {cache.self_k.shape[0]} sequences, tgt has {batch}: "
                                 f"use a new cache per batch")
            if cache.memory_k is not None and tuple(cache.memory_k.shape[::2]) != (batch, s):
                raise ValueError(f"memory must be the one of the cache's first call: (batch, length) "
                                 f"{tuple(cache.memory_k.shape[::2])}, got ({batch}, {s})")
            causal, mask, kpm = True, None, None
            mem_causal, mem_mask = False, None
        else:
            mask = _check_mask("tgt_mask", tgt_mask, n, n, batch * self.self_attn.num_heads)
            kpm = _check_padding("tgt_key_padding_mask", tgt_key_padding_mask, batch, n, unbatched)
            causal, mask = _resolve_mask(mask, tgt_is_causal, n, n)
            mem_mask = _check_mask("memory_mask", memory_mask, n, s, batch * self.multihead_attn.num_heads)
            mem_causal, mem_mask = _resolve_mask(mem_mask, memory_is_causal, n, s)
        if self.norm_first:
            x, h = _add_then_norm(x, self._sa_block(self.norm1(x), causal, mask, kpm, cache), self.dropout1,
                                  self.norm2)
            x, h = _add_then_norm(x, self._mha_block(h, mem, mem_causal, mem_mask, mem_kpm, cache), self.dropout2,
                                  self.norm3)
            x, _ = _add_then_norm(x, _feed_forward(self, h), self.dropout3, None)
        else:
            x = _add_norm(x, self._sa_block(x, causal, mask, kpm, cache), self.dropout1, self.norm1)
            x = _add_norm(x, self._mha_block(x, mem, mem_causal, mem_mask, mem_kpm, cache), self.dropout2,
                          self.norm2)
            x = _add_norm(x, _feed_forward(self, x), self.dropout3, self.norm3)
        return _unbatched(x, unbatched, self.batch_first)

    def _sa_block(self, x, causal, mask, kpm, cache):
        """Masked self-attention without its residual dropout (``dropout1``, applied in the residual connection)."""
        return _self_attention(self.self_attn, x, batch_first=self.batch_first, causal=causal, window=self.window,
                               mask=mask, kpm=kpm, training=self.training, cache=cache)

    def _mha_block(self, x, mem, causal, mask, kpm, cache):
        """Cross-attention over ``memory`` without its residual dropout (``dropout2``)."""
        return _cross_attention(self.multihead_attn, x, mem, batch_first=self.batch_first, causal=causal, mask=mask,
                                kpm=kpm, training=self.training, cache=cache)


class TransformerDecoder(nn.Module):
    """A stack of ``num_layers`` deep copies of ``decoder_layer``, then the optional ``norm``.

    Mirrors ``torch.nn.TransformerDecoder`` (state_dict keys ``layers.<i>.*``, ``norm.*``; same forward).

    Incremental decoding: ``cache = decoder.new_cache()``, then for each step
    ``decoder(tgt_new, memory, memory_key_padding_mask=..., cache=cache)`` where ``tgt_new`` holds only the
    positions not decoded yet (usually one; their positional encoding must use offset ``cache.length``).  The
    self-attention sees the cached keys/values of every earlier position and is causal among the new ones; the
    cross-attention keys/values of ``memory`` are computed on the first call and reused, so pass the same
    ``memory`` each time.  The result equals the matching rows of a full causal decoding
    (``tgt_is_causal=True``).  ``tgt_mask``, ``memory_mask``, ``tgt_key_padding_mask`` and
    ``memory_is_causal=True`` are not accepted with a cache.
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        num_layers = check_int("num_layers", num_layers, 0)
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm
        self._batch_first = _layer_batch_first(decoder_layer)     # the layout, also with no layers

    def new_cache(self) -> DecoderCache:
        """An empty key/value cache for incremental decoding with this decoder."""
        return DecoderCache(len(self.layers))

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False, *, cache: DecoderCache | None = None) -> Tensor:
        out = tgt
        causal = bool(tgt_is_causal)
        ours = all(isinstance(layer, TransformerDecoderLayer) for layer in self.layers)
        batch_first = _layer_batch_first(self.layers[0]) if self.layers else getattr(self, "_batch_first", False)
        if cache is not None:
            if not isinstance(cache, DecoderCache) or len(cache.layers) != len(self.layers):
                raise ValueError("cache must be a DecoderCache made by this decoder's new_cache()")
            if not ours:
                raise ValueError("cache needs leedl_fast TransformerDecoderLayer layers (they keep the keys and "
                                 "values); this decoder holds other layers")
        elif isinstance(tgt, torch.Tensor) and self.layers and tgt_mask is not None:
            n = _seq_len(tgt, batch_first)
            causal, resolved = _resolve_mask(_check_mask("tgt_mask", tgt_mask, n, n), tgt_is_causal, n, n)
            if ours:            # as in TransformerEncoder: other layers get the mask with the flag as a hint
                tgt_mask = resolved
        for i, layer in enumerate(self.layers):
            kw = {} if cache is None else {"cache": cache.layers[i]}
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=causal, memory_is_causal=memory_is_causal, **kw)
        if self.norm is not None:
            out = self.norm(out)
        if cache is not None:
            cache.length += _seq_len(tgt, batch_first)
        return out


class Transformer(nn.Module):
    """The encoder-decoder Transformer of Vaswani et al. (2017); mirrors ``torch.nn.Transformer``.

    Same constructor (plus ``window=`` for truncated self-attention in every layer), parameters
    (``encoder.layers.<i>.*``, ``encoder.norm``, ``decoder.layers.<i>.*``, ``decoder.norm``), Xavier-uniform
    initialisation of every matrix, and forward.  Inputs are already-embedded sequences: src (S, B, E),
    tgt (T, B, E) (batch first: (B, S, E), (B, T, E)); output (T, B, E).  ``generate`` decodes greedily with
    the decoder's key/value cache.
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = F.relu, custom_encoder: nn.Module | None = None,
                 custom_decoder: nn.Module | None = None, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, window: tuple[int, int] | None = None) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            batch_first, norm_first, bias, window=window, **f)
            self.encoder = TransformerEncoder(layer, num_encoder_layers,
                                              nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **f))
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps,
                                            batch_first, norm_first, bias, window=window, **f)
            self.decoder = TransformerDecoder(layer, num_decoder_layers,
                                              nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **f))
        self._reset_parameters()
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        """The (sz, sz) causal mask: -inf above the diagonal (future positions), 0 elsewhere."""
        return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype or torch.float32, device=device),
                          diagonal=1)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        for name, t in (("src", src), ("tgt", tgt)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3) or t.shape[-1] != self.d_model:
                raise ValueError(f"{name} must have feature size d_model={self.d_model}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if src.dim() != tgt.dim():
            raise ValueError("src and tgt must both be batched or both unbatched")
        if src.dim() == 3:
            bdim = 0 if self.batch_first else 1
            if src.shape[bdim] != tgt.shape[bdim]:
                raise ValueError(f"the batch size of src ({src.shape[bdim]}) and tgt ({tgt.shape[bdim]}) must match")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    @torch.no_grad()
    def generate(self, src: Tensor, start: int | Tensor, max_len: int, *,
                 embed: Callable[[Tensor, int], Tensor], head: Callable[[Tensor], Tensor],
                 src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                 src_is_causal: bool | None = None, end: int | None = None) -> Tensor:
        """Greedy sequence-to-sequence decoding with the key/value cache.

        * ``src``: the embedded source, laid out as ``forward``'s (batched).
        * ``start``: the first decoder input: a start token id (int, or a (batch,) long tensor of ids), or its
          embedding (a float (d_model,) or (batch, d_model) tensor, positional encoding of position 0 included).
        * ``embed(ids, offset)``: maps token ids (batch, n) at positions ``offset .. offset+n-1`` to decoder
          inputs in the model's layout ((batch, n, d_model) if batch_first else (n, batch, d_model)), e.g. a
          token embedding plus ``SinusoidalPositionalEncoding(...)(x, offset=offset)``.
        * ``head(hidden)``: maps decoder outputs (same layout) to logits (..., vocab).
        * ``end``: an end token id; a sequence that has produced it keeps producing it, and decoding stops when
          every sequence has.

        Returns the generated ids (batch, L), L <= max_len, without ``start``.  Runs without autograd; call
        ``eval()`` first to switch dropout off.  ``leedl_fast.nn.Seq2SeqHead`` provides ``embed`` and ``head``.
        """
        max_len = check_int("max_len", max_len, 1)
        if not isinstance(src, torch.Tensor) or src.dim() != 3:
            raise ValueError(f"src must be a batched 3-D tensor, got "
                             f"{tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__}")
        bf = self.batch_first
        batch = src.shape[0 if bf else 1]
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        if isinstance(start, torch.Tensor) and start.is_floating_point():
            if start.shape[-1] != self.d_model or start.dim() not in (1, 2) or (start.dim() == 2
                                                                                 and start.shape[0] not in (1, batch)):
                raise ValueError(f"start embedding must be (d_model,) or (batch, d_model) = ({batch}, {self.d_model}), "
                                 f"got {tuple(start.shape)}")
            x = start.to(memory.dtype).expand(batch, self.d_model).unsqueeze(1 if bf else 0)
        else:
            if isinstance(start, torch.Tensor):
                if start.dtype in (torch.bool,) or start.is_floating_point() or start.numel() not in (1, batch):
                    raise ValueError(f"start ids must be an int or a (batch,) integer tensor, got {tuple(start.shape)}")
                ids = start.reshape(-1, 1).expand(batch, 1).to(device=memory.device, dtype=torch.long)
            elif isinstance(start, int) and not isinstance(start, bool):
                ids = torch.full((batch, 1), start, dtype=torch.long, device=memory.device)
            else:
                raise ValueError(f"start must be a token id, a tensor of ids or an embedding, got {type(start).__name__}")
            x = embed(ids, 0)
        cache = self.decoder.new_cache()
        finished = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        out = []
        for step in range(max_len):
            h = self.decoder(x, memory, memory_key_padding_mask=src_key_padding_mask, cache=cache)
            nxt = head(h).argmax(-1).reshape(batch)
            if end is not None:
                nxt = nxt.masked_fill(finished, end)
                finished |= nxt == end
            out.append(nxt)
            if step + 1 == max_len or (end is not None and bool(finished.all())):
                break
            x = embed(nxt.view(batch, 1), cache.length)
        return torch.stack(out, dim=1)
