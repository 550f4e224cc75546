"""Softmax along one dimension: reference, torch path, Triton path, autograd.

    softmax(z)_i = exp(z_i) / sum_j exp(z_j)

The template every op of the library follows:

* ``softmax_reference`` is the spec: plain PyTorch, written for clarity.
* ``_softmax_torch`` / ``_softmax_backward_torch`` are the CPU fallback:
  torch's native kernels with fp32 math whatever the storage dtype, the same
  function as the Triton kernel.  Every path returns a contiguous tensor.
* ``leedl_fast.kernels.softmax`` holds the Triton kernels, imported only when
  the Triton path runs.
* ``leedl_fast::softmax`` and ``leedl_fast::softmax_backward`` are torch
  custom ops with fake (meta) implementations and a registered autograd
  formula, so ``torch.compile(fullgraph=True)`` traces through them and
  ``torch.library.opcheck`` passes.
* ``softmax`` checks its arguments, raising ValueError before anything runs.
"""
from __future__ import annotations

import torch

from .. import backend
from ._common import as_rows, check_dim, check_tensor

__all__ = ["softmax", "softmax_reference"]


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The definition, in the input's dtype (use float64 inputs for a reference)."""
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def _as_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with ``dim`` moved last, as the (rows, n) tensor ``as_rows`` gives the kernels."""
    return as_rows(x.movedim(dim, -1) if x.dim() > 0 else x)


def _empty_result(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layout every implementation returns: contiguous, like ``torch.softmax`` of a contiguous input."""
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _softmax_torch(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64):
        return torch.softmax(x, dim=dim).contiguous()
    return torch.softmax(x, dim=dim, dtype=torch.float32).to(x.dtype).contiguous()


def _softmax_backward_torch(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    # dx = y * (dy - sum(y * dy)), torch's native kernel, in fp32 for half inputs.
    if y.dtype in (torch.float32, torch.float64):
        return torch._softmax_backward_data(dy, y, dim, y.dtype).contiguous()
    dx = torch._softmax_backward_data(dy.float(), y.float(), dim, torch.float32)
    return dx.to(y.dtype).contiguous()


def _rows_to(out: torch.Tensor, dim: int, rows_fn) -> torch.Tensor:
    """Run a row kernel on ``out``'s layout: in place when ``dim`` is last, via a moved copy otherwise."""
    if dim == out.dim() - 1:
        rows_fn(out.view(-1, out.shape[-1]))
    else:
        moved = torch.empty(out.movedim(dim, -1).shape, dtype=out.dtype, device=out.device)
        rows_fn(moved.view(-1, moved.shape[-1]))
        out.copy_(moved.movedim(-1, dim))
    return out


def _use_triton(x: torch.Tensor) -> bool:
    return x.dtype != torch.float64 and backend.select("softmax", x) == "triton"


@torch.library.custom_op("leedl_fast::softmax", mutates_args=())
def _softmax_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.numel() == 0 or not _use_triton(x):
        return _softmax_torch(x, dim)
    from leedl_fast.kernels.softmax import softmax_fwd

    rows = _as_rows(x, dim)
    return _rows_to(_empty_result(x, x.dtype), dim, lambda out: softmax_fwd(rows, out=out))


@_softmax_op.register_fake
def _(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _empty_result(x, x.dtype)


@torch.library.custom_op("leedl_fast::softmax_backward", mutates_args=())
def _softmax_backward_op(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    if y.numel() == 0 or not _use_triton(y):
        return _softmax_backward_torch(y, dy, dim)
    from leedl_fast.kernels.softmax import softmax_bwd

    y_rows, dy_rows = _as_rows(y, dim), _as_rows(dy, dim)
    return _rows_to(_empty_result(y, y.dtype), dim, lambda out: softmax_bwd(y_rows, dy_rows, out=out))


@_softmax_backward_op.register_fake
def _(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    return _empty_result(y, y.dtype)


def _setup_context(ctx, inputs, output):
    _, dim = inputs
    ctx.save_for_backward(output)
    ctx.dim = dim


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_backward_op(y, dy.to(y.dtype), ctx.dim), None


torch.library.register_autograd("leedl_fast::softmax", _backward, setup_context=_setup_context)


def _setup_context_bwd(ctx, inputs, output):
    y, dy, dim = inputs
    ctx.save_for_backward(y, dy)
    ctx.dim = dim


def _double_backward(ctx, ddx):
    # dx = y*(dy - s), s = sum(y*dy).  Differentiating gives, with g = ddx:
    #   d/ddy = y*(g - sum(y*g));   d/dy = g*(dy - s) - dy*sum(y*g)
    y, dy = ctx.saved_tensors
    dim = ctx.dim
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf, dyf, g = y.to(acc), dy.to(acc), ddx.to(acc)
    s = (yf * dyf).sum(dim, keepdim=True)
    sg = (yf * g).sum(dim, keepdim=True)
    return (g * (dyf - s) - dyf * sg).to(y.dtype), (yf * (g - sg)).to(dy.dtype), None


torch.library.register_autograd("leedl_fast::softmax_backward", _double_backward, setup_context=_setup_context_bwd)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``x`` along ``dim``: ``exp(x_i) / sum_j exp(x_j)``, as ``torch.softmax``.

    Any shape, any ``dim``, non-contiguous inputs; float16, bfloat16 and float32
    are computed in float32 and returned in the input's dtype (float64 stays
    float64 and always takes the torch path).  Differentiable (twice).  Runs the
    Triton kernel for CUDA tensors (see ``leedl_fast.backend``), PyTorch
    otherwise.  A row that is all ``-inf`` gives NaN, as ``torch.softmax`` does.
    """
    check_tensor("x", x)
    dim = check_dim("dim", dim, x.dim())
    if x.dim() == 0:   # a row of one: 1, or NaN for an infinite or NaN x, differentiable, as torch.softmax
        return softmax(x.reshape(1), 0).reshape(())
    if not torch.compiler.is_compiling() and not _use_triton(x):
        # The PyTorch path in eager mode: torch's own kernels and autograd, the same function
        # as the custom op's torch implementation, without the custom-op dispatch (tens of
        # microseconds a call, which is most of the time for small rows on a CPU).
        if x.dtype in (torch.float32, torch.float64):
            return torch.softmax(x, dim)
        return torch.softmax(x, dim, dtype=torch.float32).to(x.dtype)
    return _softmax_op(x, dim)
