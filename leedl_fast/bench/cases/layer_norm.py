"""Fused dropout + residual add + LayerNorm against torch's three ops (and torch.compile of them).

GPU: rows = 16384, C in {1024, 4096}, dropout 0.1, bf16 and fp32, forward and forward+backward.
Peers: ``torch`` = ``F.layer_norm(residual + F.dropout(x, p), (C,), w, b)`` (three kernels, a
stored mask) and ``torch.compile`` of the same expression.  On the CPU, ``cases("cpu", quick)``
times a small problem on the torch path (seconds).

Memory-bound; bytes counted are those of ours (weight and bias are negligible):
forward without autograd reads x and residual and writes y (3 tensors); forward+backward
also writes h in the forward, and the backward reads dy and h and writes dx and dresidual
(8 tensors in all).

``check(device)`` compares the Triton path (outputs and every gradient) with the float64
reference on the same Philox mask, in fp16, bf16 and fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from leedl_fast.bench.common import Case, CheckResult
from leedl_fast.ops.layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference

OPS = ("dropout_add_layer_norm",)

_P = 0.1
_GPU_SHAPES = [(16384, 1024), (16384, 4096)]
_CPU_SHAPES = [(64, 512), (16, 4096)]  # the torch path draws Philox in plain torch: keep CPU cases small


def _unfused(x, r, w, b):
    return F.layer_norm(r + F.dropout(x, _P, training=True), (x.shape[-1],), w, b)


def cases(device: str, quick: bool):
    gpu = device.startswith("cuda")
    shapes = (_GPU_SHAPES[:1] if quick else _GPU_SHAPES) if gpu else _CPU_SHAPES[: 1 if quick else 2]
    dtypes = [torch.bfloat16, torch.float32] if gpu else [torch.float32]
    compiled = torch.compile(_unfused, dynamic=False) if gpu else None
    for dtype in dtypes:
        for m, n in shapes:
            x = torch.randn(m, n, device=device, dtype=dtype)
            r = torch.randn_like(x)
            w = torch.randn(n, device=device, dtype=dtype)
            b = torch.randn(n, device=device, dtype=dtype)
            elt = x.element_size()
            shape = {"rows": m, "C": n, "p": _P}

            def fwd(x=x, r=r, w=w, b=b):
                with torch.no_grad():
                    return dropout_add_layer_norm(x, r, w, b, dropout_p=_P)

            def peer_fwd(fn, x=x, r=r, w=w, b=b):
                def run():
                    with torch.no_grad():
                        return fn(x, r, w, b)
                return run

            peers = {"torch": peer_fwd(_unfused)}
            if compiled is not None:
                peers["torch.compile"] = peer_fwd(compiled)
            yield Case("dropout_add_layer_norm", "fwd", dtype, shape, fwd, peers, bytes=3 * m * n * elt)

            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            dy = torch.randn_like(x)

            def step(fn, leaves=leaves, dy=dy):
                def run():
                    fn(*leaves).backward(dy)
                    for t in leaves:
                        t.grad = None
                return run

            peers = {"torch": step(_unfused)}
            if compiled is not None:
                peers["torch.compile"] = step(compiled)
            ours = step(lambda x, r, w, b: dropout_add_layer_norm(x, r, w, b, dropout_p=_P))
            yield Case("dropout_add_layer_norm", "fwd+bwd", dtype, shape, ours, peers, bytes=8 * m * n * elt)


def check(device: str):
    out = []
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    # Relative to O(1) values: y and the gradients of unit-variance inputs.
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 8e-2), (torch.float32, 1e-4)):
        for m, n in ((37, 77), (129, 1024), (5, 8192)):
            try:
                g = torch.Generator(device="cpu").manual_seed(m * n)
                x, r, dy = (torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(3))
                w = (1 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).double()
                b = (0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).double()
                ref = [t.clone().requires_grad_() for t in (x, r, w, b)]
                dropout_add_layer_norm_reference(*ref, dropout_p=_P, seed=17).backward(dy)
                ours = [t.to(device, dtype).requires_grad_() for t in (x, r, w, b)]
                y = dropout_add_layer_norm(*ours, dropout_p=_P, seed=17)
                y.backward(dy.to(device, dtype))
                y_ref = dropout_add_layer_norm_reference(x, r, w, b, dropout_p=_P, seed=17)
                # dweight/dbias sum over rows: compare them relative to their own magnitude.
                errs = [(y.double().cpu() - y_ref).abs().max().item()]
                for o, t in zip(ours, ref):
                    d = (o.grad.double().cpu() - t.grad).abs().max().item()
                    errs.append(d / max(1.0, t.grad.abs().max().item()))
                err = max(errs)
                out.append(CheckResult("dropout_add_layer_norm", names[dtype], f"rows={m} C={n} p={_P} fwd+bwd", err,
                                       tol, bool(err <= tol and torch.isfinite(y).all())))
            except Exception as exc:  # recorded, not raised: the suite reports every check
                out.append(CheckResult("dropout_add_layer_norm", names[dtype], f"rows={m} C={n}", float("nan"), tol,
                                       False, error=f"{type(exc).__name__}: {exc}"))
    return out
