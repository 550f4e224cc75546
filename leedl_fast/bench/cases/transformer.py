"""A Transformer encoder layer's training step against torch.nn.TransformerEncoderLayer.

GPU (``bench/gpu_suite.py``): bf16, d_model 1024, 16 heads (head dim 64), dim_feedforward 4096,
dropout 0.1, N 4096, batch 4, (batch, seq, d_model) layout, train mode; forward + backward of
``leedl_fast.nn.TransformerEncoderLayer`` against ``torch.nn.TransformerEncoderLayer`` with the same weights
(torch's runs SDPA's flash backend with dropout).  Plain and causal.  On the CPU, ``cases("cpu", quick)``
times a small layer on the torch path.

FLOPs of one training step: 3x the forward's (backward = 2x), the forward being
2*B*N*(4*E^2 + 2*E*FF) in the linear layers plus 4*B*N^2*E in attention (halved when causal).

``check(device)`` compares the layer's output and input gradient with float64 torch.nn's (dropout 0,
same weights) in fp16, bf16 and fp32, within twice torch.nn's own error in that dtype.
"""
from __future__ import annotations

import torch

from leedl_fast.bench.common import Case, CheckResult
from leedl_fast.nn.transformer import TransformerEncoderLayer

OPS = ("transformer",)

_GPU = {"B": 4, "N": 4096, "E": 1024, "H": 16, "FF": 4096}
_CPU = {"B": 2, "N": 128, "E": 128, "H": 2, "FF": 256}


def encoder_layer_flops(b: int, n: int, e: int, ff: int, causal: bool = False) -> float:
    linear = 2.0 * b * n * (4 * e * e + 2 * e * ff)
    attn = 4.0 * b * n * n * e * (0.5 if causal else 1.0)
    return 3.0 * (linear + attn)


def _pair(s, dropout, device, dtype):
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(s["E"], s["H"], s["FF"], dropout, batch_first=True, device=device, dtype=dtype)
    ref = torch.nn.TransformerEncoderLayer(s["E"], s["H"], s["FF"], dropout, batch_first=True, device=device,
                                           dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    return ours.train(), ref.train()


def _step(layer, x, dy, causal):
    mask = (torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
            if causal else None)

    def run():
        layer(x, src_mask=mask, is_causal=causal).backward(dy)
        for p in layer.parameters():
            p.grad = None
        x.grad = None
    return run


def cases(device: str, quick: bool):
    gpu = device.startswith("cuda")
    s = _GPU if gpu else _CPU
    dtype = torch.bfloat16 if gpu else torch.float32
    for causal in ((False,) if quick else (False, True)):
        ours, ref = _pair(s, 0.1, device, dtype)
        x = torch.randn(s["B"], s["N"], s["E"], device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        yield Case("transformer", "fwd+bwd", dtype, dict(s), _step(ours, x, dy, causal),
                   {"torch.nn": _step(ref, x, dy, causal)},
                   flops=encoder_layer_flops(s["B"], s["N"], s["E"], s["FF"], causal), causal=causal,
                   extra={"layer": "TransformerEncoderLayer", "dropout": 0.1})


def check(device: str):
    """The layer (Triton kernels on CUDA) against float64 torch.nn with the same weights, dropout 0:
    output and input gradient, fp16 / bf16 / fp32, plain and causal.

    The float64 reference takes the inputs rounded to the dtype (as every check here does): with the
    unrounded ones, the rounding of x alone, amplified by two LayerNorm backwards in rows with a small
    variance, made torch.nn's own fp16 layer miss by 0.004 to 0.08 depending on the inputs.  The
    bound is also relative to torch.nn's own layer in the same dtype on the same inputs: ours may
    deviate from float64 by at most 2x what torch.nn's deviates, or by the dtype's floor."""
    out = []
    s = {"B": 2, "N": 77, "E": 128, "H": 2, "FF": 256}
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    # fp32 on CUDA: our attention's tl.dot runs TF32 products (torch.nn's fp32 layer does not), ~1e-3 relative
    # error, amplified by two LayerNorm backwards in dx: an emulation of the kernel's TF32 rounding gave 6e-3
    # to 6e-2 on these inputs, so the floor there is bf16-like.
    fp32_floor = 1e-1 if str(device).startswith("cuda") else 2e-3
    for dtype, floor in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1), (torch.float32, fp32_floor)):
        for causal in (False, True):
            try:
                ours, ref = _pair(s, 0.0, device, dtype)
                ref64 = torch.nn.TransformerEncoderLayer(s["E"], s["H"], s["FF"], 0.0, batch_first=True,
                                                         device=device, dtype=torch.float64)
                ref64.load_state_dict(ours.state_dict())
                # Inputs rounded to the dtype first: the reference sees what the layers see.
                x = torch.randn(s["B"], s["N"], s["E"], device=device, dtype=torch.float64).to(dtype).double()
                dy = torch.randn_like(x).to(dtype).double()
                mask = torch.nn.Transformer.generate_square_subsequent_mask(s["N"], device=device) if causal else None
                xr = x.clone().requires_grad_()
                yr = ref64(xr, src_mask=None if mask is None else mask.double(), is_causal=causal)
                yr.backward(dy)
                errs, finite = [], True
                for layer in (ours, ref):
                    xd = x.to(dtype).requires_grad_()
                    y = layer(xd, src_mask=None if mask is None else mask.to(dtype), is_causal=causal)
                    y.backward(dy.to(dtype))
                    errs.append(max((y.double() - yr).abs().max().item(), (xd.grad.double() - xr.grad).abs().max().item()))
                    finite &= bool(torch.isfinite(y).all() and torch.isfinite(xd.grad).all())
                bound = max(floor, 2.0 * errs[1])
                out.append(CheckResult("transformer", names[dtype],
                                       f"encoder layer N={s['N']} causal={causal} (torch.nn's error {errs[1]:.2e})",
                                       errs[0], bound, bool(errs[0] <= bound and finite)))
            except Exception as exc:  # report, don't abort the suite
                out.append(CheckResult("transformer", names[dtype], f"causal={causal}", float("nan"), floor, False,
                                       error=f"{type(exc).__name__}: {exc}"))
    return out
