"""Row softmax against torch.softmax (and torch.compile of it on CUDA).

Memory-bound: bytes counted are one read and one write of the tensor for the
forward, plus a read of y and dy and a write of dx for the backward.
"""
from __future__ import annotations

import torch

from leedl_fast.bench.common import Case, CheckResult
from leedl_fast.ops import softmax, softmax_reference

OPS = ("softmax",)

_GPU_SHAPES = [(4096, 1024), (4096, 4096), (2048, 16384), (1024, 65536)]
_GPU_QUICK = [(4096, 4096), (1024, 65536)]
_CPU_SHAPES = [(512, 1000), (64, 16384)]


def cases(device: str, quick: bool):
    gpu = device.startswith("cuda")
    shapes = (_GPU_QUICK if quick else _GPU_SHAPES) if gpu else _CPU_SHAPES[: 1 if quick else 2]
    dtypes = [torch.bfloat16, torch.float32] if gpu else [torch.float32]
    for dtype in dtypes:
        for m, n in shapes:
            x = torch.randn(m, n, device=device, dtype=dtype)
            elt = x.element_size()
            peers = {"torch": lambda x=x: torch.softmax(x, -1)}
            if gpu:
                peers["torch_compile"] = torch.compile(lambda x=x: torch.softmax(x, -1), dynamic=False)
            yield Case("softmax", "fwd", dtype, {"M": m, "N": n}, lambda x=x: softmax(x, -1), peers,
                       bytes=2 * m * n * elt)

            xg = x.clone().requires_grad_()
            dy = torch.randn_like(x)

            def ours(xg=xg, dy=dy):
                softmax(xg, -1).backward(dy)
                xg.grad = None

            def peer(xg=xg, dy=dy):
                torch.softmax(xg, -1).backward(dy)
                xg.grad = None

            yield Case("softmax", "fwd+bwd", dtype, {"M": m, "N": n}, ours, {"torch": peer}, bytes=5 * m * n * elt)


def check(device: str):
    out = []
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 2e-5)):
        for m, n in ((37, 77), (5, 4097), (3, 70000)):
            # Inputs rounded to the dtype first: the reference sees what the op sees (errors of the op only).
            x = (torch.randn(m, n, device=device, dtype=torch.float64) * 3).to(dtype).double()
            dy = torch.randn_like(x).to(dtype).double()
            xr = x.clone().requires_grad_()
            softmax_reference(xr).backward(dy)
            xd = x.to(dtype).requires_grad_()
            y = softmax(xd)
            y.backward(dy.to(dtype))
            err = max((y.double() - softmax_reference(x)).abs().max().item(),
                      (xd.grad.double() - xr.grad).abs().max().item())
            # Relative to the magnitudes involved (probabilities and their gradients are O(1) at most).
            out.append(CheckResult("softmax", {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
                                   f"M={m} N={n} fwd+bwd", err, tol, bool(err <= tol and torch.isfinite(y).all())))
    return out
