"""Fused bias + activation + dropout: reference, torch path, Triton path, autograd.

    y = dropout(act(x + bias))        x (..., C), bias (C,) broadcast over the leading dims

The elementwise tail of a Transformer feed-forward layer's first linear map
(``dropout(activation(linear1(x)))`` in ``torch.nn.TransformerEncoderLayer``,
with the GEMM run without its bias): one kernel forward and one backward.

Activations: ``"relu"``, ``"gelu"`` (the erf form, ``F.gelu``'s default),
``"gelu_tanh"`` (``F.gelu(approximate="tanh")``), ``"silu"``, ``"identity"``.

Dropout
-------
x, seen as a (rows, C) matrix with its leading dims flattened, takes the mask
``leedl_fast.random.dropout_mask(seed, x.shape, dropout_p)`` (eight 16-bit decisions per
Philox call: the drop probability applied is dropout_p rounded to a multiple of 2**-16), and
kept values are scaled by ``dropout_scale(dropout_p)``.  The kernel draws the same numbers and
regenerates them in the backward pass: the mask is never stored.  ``seed=None``
draws one from torch's default generator (``torch.manual_seed`` makes runs
reproducible); both paths give the same mask for the same seed.

Autograd
--------
``leedl_fast::bias_act_dropout_fwd(x, bias, seed, activation, dropout_p) -> y`` and
``leedl_fast::bias_act_dropout_bwd(dy, x, bias, seed, activation, dropout_p) ->
(dx, dbias)`` are torch custom ops with fake implementations, tied by
``register_autograd``, so ``torch.compile(fullgraph=True)`` sees one node each.
The forward saves x (the pre-bias input, not y) and bias; the backward recomputes
``z = x + bias`` and ``act'(z)``: ``dx = dy * keep * scale * act'(z)`` and
``dbias = sum of dx over the leading dims`` (float32 partial sums per tile, reduced
with one torch sum; deterministic).  When no bias is given the backward op's
dbias is an empty (0,) tensor.  All outputs are contiguous.

In eager mode on the torch path the function runs on torch's own differentiable
ops (no custom-op dispatch), the same function as the custom op's torch
implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend
from ..random import dropout_mask, dropout_scale
from ._common import as_rows, as_vector, check_dropout, check_tensor, dropout_seed, row_dropout, seed_int

__all__ = ["bias_act_dropout", "bias_act_dropout_reference", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "identity")



# ----------------------------------------------------------------------------- reference

def bias_act_dropout_reference(x: torch.Tensor, bias: Optional[torch.Tensor] = None, *, activation: str = "relu",
                               dropout_p: float = 0.0, seed: Optional[int] = None) -> torch.Tensor:
    """The definition, in the input's dtype (use float64 inputs for a reference).

    ``seed`` is required when ``dropout_p > 0`` (so the reference never draws)."""
    z = x if bias is None else x + bias
    if activation == "relu":
        a = torch.where(z <= 0, torch.zeros_like(z), z)          # F.relu: NaN stays NaN
    elif activation == "gelu":
        a = 0.5 * z * (1.0 + torch.erf(z / 2.0 ** 0.5))
    elif activation == "gelu_tanh":
        a = 0.5 * z * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)))
    elif activation == "silu":
        a = z * torch.sigmoid(z)
    elif activation == "identity":
        a = z
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if dropout_p > 0:
        if seed is None:
            raise ValueError("bias_act_dropout_reference needs an explicit seed when dropout_p > 0")
        a = a * dropout_mask(int(seed), x.shape, float(dropout_p), x.device) * dropout_scale(dropout_p)
    return a


# ----------------------------------------------------------------------------- torch path

def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _act_torch(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    return z


def _bias_act_dropout_torch(x: torch.Tensor, bias: Optional[torch.Tensor], activation: str, dropout_p: float,
                            seed: int) -> torch.Tensor:
    """The same function with torch's ops, in float32 (float64 for float64 inputs); differentiable.
    Returns a new contiguous tensor in x's dtype."""
    acc = _acc_dtype(x)
    z = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    a = _act_torch(z, activation)
    if dropout_p > 0.0:
        a = row_dropout(a, seed, dropout_p)
    y = a.to(x.dtype).contiguous()
    if y.data_ptr() == x.data_ptr():  # identity of a float32 input: never alias the input (an empty one too)
        y = y.clone()
    return y


def _act_backward_torch(g: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    # torch's own activation backward kernels: the derivative at z times g.
    if activation == "relu":
        return torch.ops.aten.threshold_backward(g, z, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(g, z)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g, z, approximate="tanh")
    if activation == "silu":
        return torch.ops.aten.silu_backward(g, z)
    return g


def _bias_act_dropout_backward_torch(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                                     activation: str, dropout_p: float, seed: int):
    acc = _acc_dtype(x)
    z = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    g = dy.to(acc)
    if dropout_p > 0.0:
        g = row_dropout(g, seed, dropout_p)
    dz = _act_backward_torch(g, z, activation)
    dx = dz.to(x.dtype).contiguous()
    if dx.data_ptr() == dy.data_ptr():  # never alias dy (an empty one too: torch.library refuses it)
        dx = dx.clone()
    if bias is None:
        return dx, x.new_empty((0,))
    if dz.dim() == 1:  # no leading dims (sum(dim=()) would sum everything); a copy, so as not to alias dx
        return dx, dz.to(bias.dtype, copy=True)
    return dx, dz.sum(dim=tuple(range(dz.dim() - 1))).to(bias.dtype)


# ----------------------------------------------------------------------------- Triton path and custom ops

def _use_triton(x: torch.Tensor) -> bool:
    return x.dtype != torch.float64 and backend.select("bias_act", x) == "triton"


@torch.library.custom_op("leedl_fast::bias_act_dropout_fwd", mutates_args=())
def _bias_act_fwd_op(x: torch.Tensor, bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], activation: str,
                     dropout_p: float) -> torch.Tensor:
    if x.numel() == 0 or not _use_triton(x):
        return _bias_act_dropout_torch(x, bias, activation, dropout_p, seed_int(seed))
    from leedl_fast.kernels.bias_act import ACTIVATIONS as codes, bias_act_fwd

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    bias_act_fwd(as_rows(x), as_vector(bias), y.view(-1, x.shape[-1]),
                 activation=codes[activation], dropout_p=dropout_p, seed=seed_int(seed))
    return y


@_bias_act_fwd_op.register_fake
def _(x, bias, seed, activation, dropout_p):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("leedl_fast::bias_act_dropout_bwd", mutates_args=())
def _bias_act_bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                     activation: str, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() == 0 or not _use_triton(x):
        return _bias_act_dropout_backward_torch(dy, x, bias, activation, dropout_p, seed_int(seed))
    from leedl_fast.kernels.bias_act import ACTIVATIONS as codes, bias_act_bwd

    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dbias = bias_act_bwd(as_rows(dy), as_rows(x), as_vector(bias),
                         dx.view(-1, x.shape[-1]), activation=codes[activation], dropout_p=dropout_p,
                         seed=seed_int(seed))
    return dx, (x.new_empty((0,)) if bias is None else dbias.to(bias.dtype))


@_bias_act_bwd_op.register_fake
def _(dy, x, bias, seed, activation, dropout_p):
    dbias = x.new_empty((0,)) if bias is None else torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), dbias


def _setup_context(ctx, inputs, output):
    x, bias, seed, activation, dropout_p = inputs
    ctx.save_for_backward(x, bias, seed)
    ctx.args = (activation, dropout_p)


def _backward(ctx, dy):
    x, bias, seed = ctx.saved_tensors
    activation, dropout_p = ctx.args
    dx, dbias = _bias_act_bwd_op(dy.to(x.dtype), x, bias, seed, activation, dropout_p)
    return dx, (dbias if bias is not None else None), None, None, None


torch.library.register_autograd("leedl_fast::bias_act_dropout_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def _check_args(x, bias, activation, dropout_p, seed) -> None:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., C), got a 0-d tensor")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be None or a torch.Tensor, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
            raise ValueError(f"bias must have shape (C,) = ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but x has {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    check_dropout(dropout_p, seed)


def bias_act_dropout(x: torch.Tensor, bias: Optional[torch.Tensor] = None, *, activation: str = "relu",
                     dropout_p: float = 0.0, seed: Optional[int] = None) -> torch.Tensor:
    """``dropout(act(x + bias))`` in one pass; the backward regenerates the dropout mask.

    Args:
        x: (..., C), float16, bfloat16 or float32 (float64 on the torch path); any strides.
        bias: None or (C,), x's dtype and device, added to every row.
        activation: "relu", "gelu" (erf), "gelu_tanh", "silu" or "identity".
        dropout_p: probability of zeroing an element, in [0, 1) (applied in steps of 2**-16); kept
            elements are scaled by ``leedl_fast.random.dropout_scale(dropout_p)`` (see Dropout above).
        seed: Philox seed for the mask; None draws one from torch's default generator.

    Returns a contiguous tensor of x's shape and dtype, computed in float32.  Differentiable in x
    and bias (once).  Runs the Triton kernels for CUDA tensors (``leedl_fast.backend``), torch's
    ops otherwise.  Deterministic: the same inputs and seed give the same bits.
    """
    _check_args(x, bias, activation, dropout_p, seed)
    dropout_p = float(dropout_p)
    if not torch.compiler.is_compiling() and not _use_triton(x):
        # Eager torch path: torch's differentiable ops without the custom-op dispatch; the seed is
        # drawn exactly as below, so both give the same mask from the same generator state.
        return _bias_act_dropout_torch(x, bias, activation, dropout_p, seed_int(dropout_seed(seed, dropout_p)))
    return _bias_act_fwd_op(x, bias, dropout_seed(seed, dropout_p), activation, dropout_p)
