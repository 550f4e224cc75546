"""Argument checks shared by the ops: each raises ValueError naming the argument."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_int, check_number, check_seed
from ..random import MAX_SEED, dropout_mask, dropout_scale

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, x, *, floating: bool = True, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *, dtype: bool = True) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if dtype and t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def check_dim(name: str, dim, ndim: int) -> int:
    dim = check_int(name, dim)
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-D tensor")
    return dim % max(ndim, 1)


# ----------------------------------------------------------------------------- dropout seeds

def check_dropout(dropout_p, seed) -> None:
    """``dropout_p`` a probability in [0, 1); ``seed`` None or an int in [0, 2**63 - 1]."""
    check_number("dropout_p", dropout_p, 0, 1, hi_open=True)
    check_seed(seed, optional=True)


def dropout_seed(seed: Optional[int], dropout_p: float) -> Optional[torch.Tensor]:
    """The Philox seed a dropout op passes to its custom op: a 0-dim int64 CPU tensor (``seed``, or one drawn
    from torch's default generator when None), or None when nothing is dropped (the generator is untouched)."""
    if dropout_p <= 0.0:
        return None
    if seed is None:
        return torch.randint(0, MAX_SEED, (), dtype=torch.int64)
    return torch.tensor(seed, dtype=torch.int64)


def seed_int(seed: Optional[torch.Tensor]) -> int:
    """The custom ops' seed tensor as the int the kernels and ``leedl_fast.random`` take (0 when None)."""
    return 0 if seed is None else int(seed.item())


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, C) view of ``t`` over its last dim, as the row kernels take it (they are passed its row
    stride): unit column stride, a 16-byte aligned start, and a row stride that is a multiple of 16
    exactly when C is, as in the fresh contiguous outputs the kernels write.  Triton compiles one
    variant per alignment of pointers and strides; with this rule a launch is one of the two the
    compile checks cover (everything aligned, or aligned pointers and odd strides).  Rows of width 1
    are contiguous, row stride 1, like the outputs: Triton makes an int equal to 1 a constant, a third
    variant, compiled as such.  Anything else, such as a view at an odd offset into wider rows, is copied
    into a contiguous tensor."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)
    n_cols = rows.shape[1]
    if n_cols > 1 and rows.stride(1) != 1:
        return rows.contiguous()
    if (rows.data_ptr() % 16 or (rows.stride(0) % 16 == 0) != (n_cols % 16 == 0)
            or (n_cols == 1 and rows.stride(0) != 1)):
        return rows.clone(memory_format=torch.contiguous_format)  # also when already contiguous
    return rows


def as_dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` contiguous with a 16-byte aligned start, the flat layout the elementwise kernels take in
    the variant their compile checks cover (a copy otherwise); None stays None."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def as_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-column parameter (C,) as the row kernels take it: contiguous, 16-byte aligned start
    (a copy otherwise, as ``as_rows``); None stays None."""
    return None if t is None else as_rows(t)[0]


def row_dropout(v: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The row kernels' dropout of ``v`` (..., C) on the torch path, in v's dtype: ``dropout_mask``'s
    kept elements times ``dropout_scale(p)`` (a float scalar, applied in v's dtype as the kernel's
    float32 scale is), the others 0."""
    keep = dropout_mask(seed, v.shape, p, v.device)
    return torch.where(keep, v * dropout_scale(p), torch.zeros((), dtype=v.dtype, device=v.device))
