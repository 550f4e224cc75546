"""Fused bias + activation + dropout against the unfused torch expression ``F.dropout(act(x + bias))``
(and torch.compile of it on CUDA): the Transformer feed-forward block's elementwise tail, at the
shape of a 16 x 1024-token batch through a 4096-wide hidden layer.

Memory-bound; bytes counted per call of ours (n elements of e bytes):
* forward: read x, write y: 2 n e (the bias is C elements);
* forward + backward: the forward (2 n e), then read dy and x, write dx (3 n e), plus the float32
  per-tile partial sums of dbias written and read once (2 * 4 * C * cdiv(M, BLOCK_M)).
The unfused peer moves more: x + bias, the activation and dropout are three passes, and dropout
writes its mask for the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leedl_fast.bench.common import Case, CheckResult
from leedl_fast.ops.bias_act import ACTIVATIONS, bias_act_dropout, bias_act_dropout_reference

OPS = ("bias_act",)

_GPU_SHAPE = (16384, 4096)
_CPU_SHAPES = {True: (64, 1024), False: (512, 1024)}
_P = 0.1
_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TORCH_ACT = {"relu": F.relu, "gelu": F.gelu}


def _unfused(x, bias, activation: str, p: float):
    return F.dropout(_TORCH_ACT[activation](x + bias), p, training=True)


def _partial_bytes(m: int, c: int) -> int:
    from leedl_fast.kernels.bias_act import launch_config

    block_m = launch_config(c)["BLOCK_M"]
    return 2 * 4 * c * (-(-m // block_m))


def cases(device: str, quick: bool):
    gpu = device.startswith("cuda")
    m, c = _GPU_SHAPE if gpu else _CPU_SHAPES[quick]
    dtypes = [torch.bfloat16, torch.float32] if gpu else [torch.float32]
    activations = ("relu", "gelu") if gpu or not quick else ("relu",)
    n = m * c
    for dtype in dtypes:
        elt = torch.empty((), dtype=dtype).element_size()
        x = torch.randn(m, c, device=device, dtype=dtype)
        bias = torch.randn(c, device=device, dtype=dtype)
        dy = torch.randn(m, c, device=device, dtype=dtype)
        for act in activations:
            shape = {"M": m, "C": c, "act": act, "p": _P}
            peers = {"torch": lambda x=x, b=bias, a=act: _unfused(x, b, a, _P)}
            if gpu:
                fn = torch.compile(_unfused, dynamic=False)
                peers["torch_compile"] = lambda f=fn, x=x, b=bias, a=act: f(x, b, a, _P)
            yield Case("bias_act", "fwd", dtype, shape,
                       lambda x=x, b=bias, a=act: bias_act_dropout(x, b, activation=a, dropout_p=_P, seed=1234),
                       peers, bytes=2 * n * elt)

            xg = x.clone().requires_grad_()
            bg = bias.clone().requires_grad_()

            def ours(xg=xg, bg=bg, dy=dy, a=act):
                bias_act_dropout(xg, bg, activation=a, dropout_p=_P, seed=1234).backward(dy)
                xg.grad = bg.grad = None

            def peer(f, xg=xg, bg=bg, dy=dy, a=act):
                f(xg, bg, a, _P).backward(dy)
                xg.grad = bg.grad = None

            peers = {"torch": lambda p=peer: p(_unfused)}
            if gpu:
                fn = torch.compile(_unfused, dynamic=False)
                peers["torch_compile"] = lambda p=peer, f=fn: p(f)
            yield Case("bias_act", "fwd+bwd", dtype, shape, ours, peers,
                       bytes=5 * n * elt + _partial_bytes(m, c))


def _err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max of |a - e| / (1 + |e|): absolute near zero, relative for large values (dbias sums M rows)."""
    return ((actual.double() - expected).abs() / (1.0 + expected.abs())).max().item()


def check(device: str):
    out = []
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 2e-5)):
        for (m, c), p in (((37, 77), 0.0), ((300, 4097), 0.1)):
            for act in ACTIVATIONS:
                x = torch.randn(m, c, device=device, dtype=torch.float64).to(dtype)
                b = torch.randn(c, device=device, dtype=torch.float64).to(dtype)
                dy = torch.randn(m, c, device=device, dtype=torch.float64).to(dtype)
                xr = x.double().requires_grad_()
                br = b.double().requires_grad_()
                yr = bias_act_dropout_reference(xr, br, activation=act, dropout_p=p, seed=4321)
                yr.backward(dy.double())
                xd = x.clone().requires_grad_()
                bd = b.clone().requires_grad_()
                y = bias_act_dropout(xd, bd, activation=act, dropout_p=p, seed=4321)
                y.backward(dy)
                err = max(_err(y, yr.detach()), _err(xd.grad, xr.grad), _err(bd.grad, br.grad))
                ok = bool(err <= tol and torch.isfinite(y).all())
                out.append(CheckResult("bias_act", _NAMES[dtype], f"M={m} C={c} {act} p={p} fwd+bwd", err, tol, ok))
    return out
