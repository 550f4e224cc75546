"""Fused dropout + residual add + LayerNorm: reference, torch path, Triton path, autograd.

    h = residual + dropout(x)                       (h = dropout(x) when residual is None)
    y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias      over the last dim, biased variance

The sublayer ending of a Transformer layer: post-norm layers (``torch.nn.TransformerEncoderLayer``
with ``norm_first=False``) compute ``norm(x + dropout(sublayer(x)))``, which is
``dropout_add_layer_norm(sublayer(x), x, norm.weight, norm.bias, dropout_p=p)``; pre-norm layers
need the sum h as the next residual (``return_residual=True``).  torch runs dropout, add and
layer_norm as three kernels and keeps a dropout mask for the backward; the Triton path is one
kernel forward and one backward, and regenerates the mask (FlashAttention's fused
dropout_add_layer_norm and Apex's fused layer norm rest on the same idea).

Dropout
-------
x, seen as a (rows, C) matrix with its leading dims flattened, takes the mask
``leedl_fast.random.dropout_mask(seed, x.shape, dropout_p)`` (eight 16-bit decisions per Philox
call: the drop probability applied is dropout_p rounded to a multiple of 2**-16); kept values are
scaled by ``dropout_scale(dropout_p)``.  The kernel draws the same numbers, so both paths compute
the same function for a seed.  ``seed=None`` draws one from torch's default generator
(``torch.manual_seed`` makes runs reproducible).  The mask is never stored.

Precision
---------
Math in float32 (float64 for float64 inputs, which always take the torch path).  h is rounded to
x's dtype and y is the layer norm of that rounded h: exactly what ``F.dropout``, ``+`` and
``F.layer_norm`` compute one after the other.  y and h come back in x's dtype, contiguous.

How autograd and the custom ops fit
-----------------------------------
``leedl_fast::dropout_add_layer_norm_fwd(x, residual, weight, bias, seed, eps, dropout_p, store_h)
-> (y, h, mean, rstd)`` and ``leedl_fast::dropout_add_layer_norm_bwd(...) -> (dx, dresidual,
dweight, dbias)`` are torch custom ops with fake implementations, tied by ``register_autograd``, so
``torch.compile(fullgraph=True)`` sees one node each way and ``torch.library.opcheck`` runs on
CPU.  Outputs that do not exist (h when it is not stored, dresidual without a residual, ...) are
empty tensors of shape (0,).  h is stored when the caller asks for it or the backward needs it (a
residual or dropout, and grad mode with an input that requires grad); otherwise the backward
normalises x itself.  mean and rstd (float32, shape x.shape[:-1]) are saved for the backward.
The Triton backward sums dweight/dbias from per-program partial sums: deterministic.

In eager mode on the torch path the public function runs the same math with torch's own autograd
(no custom-op dispatch), like ``softmax``.

Limits: the Triton path holds a row in registers, ``C <= leedl_fast.kernels.layer_norm.MAX_COLS``
(8192); a longer row on that path is a ValueError (the torch path takes any C).  Not twice
differentiable through the custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend
from .._checks import check_number
from ..random import dropout_mask, dropout_scale
from ._common import as_rows, as_vector, check_dropout, check_same, check_tensor, dropout_seed, row_dropout, seed_int

__all__ = ["dropout_add_layer_norm", "dropout_add_layer_norm_reference"]

# Mirrors leedl_fast.kernels.layer_norm.MAX_COLS (not imported here: the kernel module imports triton).
MAX_COLS = 8192


# ----------------------------------------------------------------------------- reference

def dropout_add_layer_norm_reference(x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                                     weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                                     *, eps: float = 1e-5, dropout_p: float = 0.0, seed: Optional[int] = None,
                                     return_residual: bool = False):
    """The definition, in the inputs' dtype (use float64 inputs for a reference).

    ``seed`` is required when ``dropout_p > 0`` (the reference never draws one)."""
    if dropout_p > 0:
        if seed is None:
            raise ValueError("dropout_add_layer_norm_reference needs an explicit seed when dropout_p > 0")
        keep = dropout_mask(int(seed), x.shape, float(dropout_p), x.device)
        x = x * keep * dropout_scale(dropout_p)
    h = x if residual is None else residual + x
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return (y, h) if return_residual else y


# ----------------------------------------------------------------------------- torch path

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dropped(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """dropout(x) in the accumulation dtype: x * keep * dropout_scale(p), as the kernel computes it."""
    xa = x.to(_acc(x.dtype))
    return xa if p <= 0.0 else row_dropout(xa, seed, p)


def _residual_sum(x, residual, seed, p) -> torch.Tensor:
    """h in x's dtype (rounded once, from the float32 sum)."""
    h = _dropped(x, seed, p)
    if residual is not None:
        h = h + residual.to(h.dtype)
    return h.to(x.dtype)


def _dropout_add_layer_norm_torch(x, residual, weight, bias, eps, p, seed, return_residual):
    """Eager torch path, differentiable by torch's autograd: the same function as the kernels."""
    h = _residual_sum(x, residual, seed, p)
    c = x.shape[-1]
    if x.dtype in (torch.float32, torch.float64):
        y = F.layer_norm(h, (c,), weight, bias, eps)
    else:
        y = F.layer_norm(h.float(), (c,), None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps).to(x.dtype)
    if not return_residual:
        return y
    # h is x itself without residual and dropout in float32/64: a copy, so that updating h leaves x alone.
    return y, (h.clone(memory_format=torch.contiguous_format) if h is x else h.contiguous())


def _fwd_torch(x, residual, weight, bias, seed, eps, p, store_h):
    h = _residual_sum(x, residual, seed, p)
    acc = _acc(x.dtype)
    ha = h.to(acc)
    var, mean = torch.var_mean(ha, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (ha - mean[..., None]) * rstd[..., None]
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    h_out = x.new_empty(0)
    if store_h:
        h_out = h.contiguous()
        if h_out is x:  # fp32 without residual or dropout: h is x, and outputs may not alias inputs
            h_out = h_out.clone()
    return y.to(x.dtype).contiguous(), h_out, mean.contiguous(), rstd.contiguous()


def _bwd_torch(dy, dh_in, h, weight, mean, rstd, seed, p, has_residual, has_bias):
    acc = _acc(h.dtype)
    c = h.shape[-1]
    xhat = (h.to(acc) - mean[..., None]) * rstd[..., None]
    dya = dy.to(acc)
    g = dya * weight.to(acc) if weight is not None else dya
    dh = (g - (xhat * (g * xhat).sum(-1, keepdim=True) + g.sum(-1, keepdim=True)) / c) * rstd[..., None]
    if dh_in is not None:
        dh = dh + dh_in.to(acc)
    dres = dh.to(h.dtype).contiguous() if has_residual else h.new_empty(0)
    if p > 0.0:
        dh = row_dropout(dh, seed, p)
    dx = dh.to(h.dtype).contiguous()
    if dx is dres:  # without dropout in float32/64 both are dh; a custom op's outputs may not alias
        dx = dx.clone()
    dw = (dya * xhat).reshape(-1, c).sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    db = dya.reshape(-1, c).sum(0).to(h.dtype) if has_bias else h.new_empty(0)
    return dx, dres, dw, db


# ----------------------------------------------------------------------------- custom ops

def _use_triton(x: torch.Tensor) -> bool:
    return x.dtype != torch.float64 and backend.select("layer_norm", x) == "triton"


def _stats_empty(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[:-1], dtype=_acc(x.dtype), device=x.device)


@torch.library.custom_op("leedl_fast::dropout_add_layer_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], eps: float, dropout_p: float,
            store_h: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.numel() == 0 or not _use_triton(x):
        return _fwd_torch(x, residual, weight, bias, seed_int(seed), eps, dropout_p, store_h)
    from leedl_fast.kernels.layer_norm import dropout_add_layer_norm_fwd

    y, h, mean, rstd = dropout_add_layer_norm_fwd(
        as_rows(x), None if residual is None else as_rows(residual), as_vector(weight), as_vector(bias),
        eps=eps, dropout_p=dropout_p, seed=seed_int(seed), store_h=store_h)
    h = h.view(x.shape) if h is not None else x.new_empty(0)
    return y.view(x.shape), h, mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@_fwd_op.register_fake
def _(x, residual, weight, bias, seed, eps, dropout_p, store_h):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if store_h else x.new_empty(0)
    return y, h, _stats_empty(x), _stats_empty(x)


@torch.library.custom_op("leedl_fast::dropout_add_layer_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: Optional[torch.Tensor],
            mean: torch.Tensor, rstd: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float,
            has_residual: bool, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if h.numel() == 0 or not _use_triton(h):
        return _bwd_torch(dy, dh, h, weight, mean, rstd, seed_int(seed), dropout_p, has_residual, has_bias)
    from leedl_fast.kernels.layer_norm import dropout_add_layer_norm_bwd

    dx, dres, dw, db = dropout_add_layer_norm_bwd(
        as_rows(dy), None if dh is None else as_rows(dh), as_rows(h), as_vector(weight), as_vector(mean.reshape(-1)),
        as_vector(rstd.reshape(-1)),
        dropout_p=dropout_p, seed=seed_int(seed), has_residual=has_residual, has_bias=has_bias)
    # Absent outputs are distinct empty tensors (custom-op outputs may not alias one another).
    return (dx.view(h.shape), h.new_empty(0) if dres is None else dres.view(h.shape),
            h.new_empty(0) if dw is None else dw, h.new_empty(0) if db is None else db)


@_bwd_op.register_fake
def _(dy, dh, h, weight, mean, rstd, seed, dropout_p, has_residual, has_bias):
    c = h.shape[-1]
    dx = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    dres = torch.empty(h.shape, dtype=h.dtype, device=h.device) if has_residual else h.new_empty(0)
    dw = torch.empty(c, dtype=weight.dtype, device=h.device) if weight is not None else h.new_empty(0)
    db = torch.empty(c, dtype=h.dtype, device=h.device) if has_bias else h.new_empty(0)
    return dx, dres, dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, seed, eps, dropout_p, store_h = inputs
    _, h, mean, rstd = output
    if not store_h and (residual is not None or dropout_p > 0.0):
        # The public function stores h whenever an input requires grad; a direct call must too.
        raise RuntimeError("dropout_add_layer_norm_fwd: store_h=False with a residual or dropout "
                           "leaves nothing to differentiate from; pass store_h=True")
    # Without a stored h (no residual, no dropout) the normalised input is x itself.
    ctx.save_for_backward(h if store_h else x, weight, mean, rstd, seed)
    ctx.args = (dropout_p, residual is not None, bias is not None, store_h)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd, seed = ctx.saved_tensors
    dropout_p, has_residual, has_bias, store_h = ctx.args
    if dy is None:
        dy = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
    if not store_h:
        dh = None
    dx, dres, dw, db = _bwd_op(dy.to(h.dtype), None if dh is None else dh.to(h.dtype), h, weight, mean, rstd,
                               seed, dropout_p, has_residual, has_bias)
    return (dx, dres if has_residual else None, dw if weight is not None else None,
            db if has_bias else None, None, None, None, None)


torch.library.register_autograd("leedl_fast::dropout_add_layer_norm_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def _check_args(x, residual, weight, bias, eps, dropout_p, seed, return_residual) -> None:
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dim (the normalised one), got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual)
        check_same(("x", "residual"), (x, residual))
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
            check_same(("x", name), (x, t))
            if tuple(t.shape) != (c,):
                raise ValueError(f"{name} must have shape ({c},) (x's last dim), got {tuple(t.shape)}")
    check_number("eps", eps, 0)
    check_dropout(dropout_p, seed)
    if not isinstance(return_residual, bool):
        raise ValueError(f"return_residual must be a bool, got {return_residual!r}")


def dropout_add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                           weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                           eps: float = 1e-5, dropout_p: float = 0.0, seed: Optional[int] = None,
                           return_residual: bool = False):
    """``layer_norm(residual + dropout(x))`` over the last dim, fused; optionally also the sum.

    Args:
        x: (..., C), float16, bfloat16, float32 (float64 on the torch path); any strides.
        residual: None or x's shape, dtype and device.
        weight, bias: None or (C,), x's dtype and device (``nn.LayerNorm``'s parameters).
        eps: added to the biased variance, as ``F.layer_norm``.
        dropout_p: probability of zeroing an element of x, in [0, 1) (applied in steps of 2**-16);
            kept ones are scaled by ``leedl_fast.random.dropout_scale(dropout_p)``.  Pass 0 in eval mode.
        seed: Philox seed of the dropout mask; None draws one from torch's default generator.
        return_residual: also return h = residual + dropout(x) (the next residual of a pre-norm layer).

    Returns y, or (y, h), both x's shape and dtype, contiguous.  Differentiable in x, residual,
    weight and bias.  Runs the Triton kernels for CUDA tensors (``leedl_fast.backend``; C <= 8192
    there), PyTorch otherwise.  Deterministic: the same inputs and seed give the same bits.
    """
    _check_args(x, residual, weight, bias, eps, dropout_p, seed, return_residual)
    dropout_p, eps = float(dropout_p), float(eps)
    triton_path = _use_triton(x)
    if triton_path and x.shape[-1] > MAX_COLS:
        raise ValueError(f"x's last dim must be <= {MAX_COLS} on the Triton path, got {x.shape[-1]}")
    seed_t = dropout_seed(seed, dropout_p)
    if not torch.compiler.is_compiling() and not triton_path:
        # Eager torch path: torch's kernels and autograd, the same function as the custom op's
        # torch implementation, without the custom-op dispatch.
        return _dropout_add_layer_norm_torch(x, residual, weight, bias, eps, dropout_p,
                                             seed_int(seed_t), return_residual)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias))
    store_h = return_residual or (grad and (residual is not None or dropout_p > 0.0))
    y, h, _, _ = _fwd_op(x, residual, weight, bias, seed_t, eps, dropout_p, store_h)
    return (y, h) if return_residual else y
