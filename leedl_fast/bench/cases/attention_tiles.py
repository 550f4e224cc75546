"""Tile sweep of the attention kernels: the shipped tiles against alternatives (opt-in).

The shipped tiles (``kernels/attention.py``, ``_CONFIGS``) were chosen without a GPU to time them:
tile shapes of the Triton tutorial and FlashAttention-2, shrunk until they compiled with no spills.
This module times them ("ours") against alternative tiles ("peers", named ``M<BLOCK_M> N<BLOCK_N>
w<warps> s<stages>``) on the suite's main attention problem (bf16, B*N = 16k tokens, H*D = 2048,
N = 4096): the forward at D = 64 and 128, causal and not; forward+backward at D = 128 with the
dK/dV tile or the dQ tile varied (the other kernels keep their shipped tile); forward+backward at
the padded head dim 160 (``_padded_case``: the padded tiles against the full-width ones and against
zero-padded copies); and the banded forward at D = 128, N = 16k, window (256, 256) (B*N = 64k
tokens, as the suite's banded cases).  In the report a
speedup below 1 is an alternative that beats the shipped tile; one that does not compile, spills
or does not launch (shared memory) is recorded with its error.  A winner is adopted into
``_CONFIGS`` only after the AOT compile check passes for it (tests/kernels/test_attention_compile.py).

Not part of a default run: every alternative is a Triton compile.  Run it as
``python bench/gpu_suite.py --ops attention_tiles``.  On the CPU under TRITON_INTERPRET=1 it times
tiny problems with a few alternatives through the interpreter (the plumbing only; never a speed).
"""
from __future__ import annotations

import torch

from leedl_fast.bench.common import Case
from leedl_fast.kernels import attention as A

OPS = ("attention_tiles",)
OPT_IN = True  # only with --ops attention_tiles

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim.  Every alternative compiles for sm_90 in the
# dense variant with no register spills (AOT with triton 3.6, bf16, checked when this list was made;
# dropped for spilling: forward 128 x 128 w8, 128 x 64 w4 and 64 x 128 w4 at D = 128, dK/dV 64 x 64
# and 64 x 128).  The shipped tile of each kernel is "ours" and left out of its alternatives.
_FWD = {
    64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3),
         (64, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)],
}
_DKDV = [(16, 128, 8, 1), (16, 128, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2)]
_DQ = [(64, 16, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 16, 8, 2)]


def _meta(tile) -> dict:
    bm, bn, w, s = tile
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}


def _name(meta: dict) -> str:
    return f"M{meta['BLOCK_M']} N{meta['BLOCK_N']} w{meta.get('num_warps', '-')} s{meta.get('num_stages', '-')}"


_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")


def _shipped(kernel: str, q: torch.Tensor) -> dict:
    meta = A._config(kernel, q, A.block_d_for(q.shape[-1]), None)
    return {k: meta[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg") if k in meta}


def _fwd(q, k, v, window, meta):
    scale = q.shape[-1] ** -0.5

    def run():
        return A.attention_fwd(q, k, v, scale=scale, left=window[0], right=window[1], key_padding_mask=None,
                               dropout_p=0.0, seed=0, _blocks=meta)
    return run


def _fwd_bwd(q, k, v, do, causal, fwd_meta, dkdv_meta, dq_meta):
    scale = q.shape[-1] ** -0.5
    right = 0 if causal else -1

    def run():
        o, lse = A.attention_fwd(q, k, v, scale=scale, left=-1, right=right, key_padding_mask=None, dropout_p=0.0,
                                 seed=0, _blocks=fwd_meta)
        return A.attention_bwd(do, q, k, v, o, lse, scale=scale, left=-1, right=right, key_padding_mask=None,
                               dropout_p=0.0, seed=0, _blocks=(dkdv_meta, dq_meta))
    return run


def _problem(n: int, d: int, dtype, device, tokens: int, width: int):
    b, h = max(1, tokens // n), width // d
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for _ in range(4))
    return q, k, v, do, {"B": b, "H": h, "N": n, "D": d}


def _cases(device: str, n: int, dims, dtype, fwd_tiles, dkdv_tiles, dq_tiles, causals, tokens=16384, width=2048):
    for d in dims:
        q, k, v, do, shape = _problem(n, d, dtype, device, tokens, width)
        shipped = {kern: _shipped(kern, q) for kern in _KERNELS}
        for causal in causals:
            flops = 4 * shape["B"] * shape["H"] * n * n * d / (2 if causal else 1)
            mine = shipped["_attention_fwd_kernel"]
            alts = [m for m in map(_meta, fwd_tiles[d]) if m != mine]
            window = (-1, 0 if causal else -1)
            yield Case("attention_tiles", "fwd", dtype, shape, _fwd(q, k, v, window, mine),
                       {_name(m): _fwd(q, k, v, window, m) for m in alts}, flops=flops, causal=causal,
                       extra={"ours_tile": _name(mine), "varied": "fwd"})
            if d != dims[-1]:
                continue
            for varied, tiles in (("dkdv", dkdv_tiles), ("dq", dq_tiles)):
                kern = f"_attention_bwd_{varied}_kernel"
                mine = shipped[kern]
                alts = [m for m in map(_meta, tiles) if m != mine]

                def with_tile(m, varied=varied):
                    dkdv = m if varied == "dkdv" else shipped["_attention_bwd_dkdv_kernel"]
                    dq = m if varied == "dq" else shipped["_attention_bwd_dq_kernel"]
                    return _fwd_bwd(q, k, v, do, causal, shipped["_attention_fwd_kernel"], dkdv, dq)

                yield Case("attention_tiles", "fwd+bwd", dtype, shape, with_tile(mine),
                           {_name(m): with_tile(m) for m in alts}, flops=3.5 * flops, causal=causal,
                           extra={"ours_tile": _name(mine), "varied": varied})


def _banded_case(device: str, n: int, d: int, window, dtype, fwd_tiles, tokens: int, width: int):
    """The forward of banded attention (the band as loop bounds: other masked edges than dense)."""
    from leedl_fast.bench.cases.attention import band_pairs

    q, k, v, _, shape = _problem(n, d, dtype, device, tokens, width)
    mine = _shipped("_attention_fwd_kernel", q)
    alts = [m for m in map(_meta, fwd_tiles[d]) if m != mine]
    flops = 4 * shape["B"] * shape["H"] * d * band_pairs(n, n, *window)
    yield Case("attention_tiles", "fwd", dtype, shape, _fwd(q, k, v, window, mine),
               {_name(m): _fwd(q, k, v, window, m) for m in alts}, flops=flops, causal=window[1] == 0,
               window=window, extra={"ours_tile": _name(mine), "varied": "fwd"})


# Padded head dims (kernel_head_dim(D) < BLOCK_D) take _CONFIGS_PADDED's tiles where the full-width
# tile spilled.  At D = 160 on sm_90 the dK/dV tile had to give up HGMMA to stop spilling, which no
# GPU has timed.  The alternatives: the full-width tiles, spills and HGMMA included (dK/dV 16 x 64 w8
# s2: 8 LDL/STL; dQ 128 x 32 w8 s2: 8), and the whole forward and backward on a copy of q, k, v and
# dO zero-padded to BLOCK_D (the copies and the slicing timed with it), where the kernels run the
# full-width tiles unspilled.
_PADDED_DKDV = [(16, 64, 8, 2)]
_PADDED_DQ = [(128, 32, 8, 2)]
_ZERO_PAD = "zero-pad to BLOCK_D"


def _fwd_bwd_zero_padded(q, k, v, do, causal):
    """``_fwd_bwd`` with the shipped tiles on copies of q, k, v, dO zero-padded to BLOCK_D; the outputs
    sliced back to D (the scale stays 1/sqrt(D))."""
    d = q.shape[-1]
    scale, right, pad = d ** -0.5, 0 if causal else -1, A.block_d_for(d) - d

    def run():
        qp, kp, vp, dop = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v, do))
        o, lse = A.attention_fwd(qp, kp, vp, scale=scale, left=-1, right=right, key_padding_mask=None,
                                 dropout_p=0.0, seed=0)
        grads = A.attention_bwd(dop, qp, kp, vp, o, lse, scale=scale, left=-1, right=right,
                                key_padding_mask=None, dropout_p=0.0, seed=0)
        return tuple(g[..., :d] for g in grads)
    return run


def _padded_case(device: str, n: int, d: int, dtype, dkdv_tiles, dq_tiles, causals, tokens=16384, width=2048):
    """Forward+backward at a padded head dim: the shipped tiles against the full-width dK/dV and dQ tiles
    and against running on zero-padded copies (``_fwd_bwd_zero_padded``)."""
    q, k, v, do, shape = _problem(n, d, dtype, device, tokens, width)
    fwd, dkdv, dq = (_shipped(kern, q) for kern in _KERNELS)
    for causal in causals:
        flops = 4 * shape["B"] * shape["H"] * n * n * d / (2 if causal else 1)
        peers = {f"dkdv {_name(m)}": _fwd_bwd(q, k, v, do, causal, fwd, m, dq)
                 for m in map(_meta, dkdv_tiles) if m != dkdv}
        peers.update({f"dq {_name(m)}": _fwd_bwd(q, k, v, do, causal, fwd, dkdv, m)
                      for m in map(_meta, dq_tiles) if m != dq})
        peers[_ZERO_PAD] = _fwd_bwd_zero_padded(q, k, v, do, causal)
        yield Case("attention_tiles", "fwd+bwd", dtype, shape, _fwd_bwd(q, k, v, do, causal, fwd, dkdv, dq), peers,
                   flops=3.5 * flops, causal=causal,
                   extra={"ours_tile": f"dkdv {_name(dkdv)}, dq {_name(dq)}", "varied": "padded"})


def cases(device: str, quick: bool):
    if device.startswith("cuda"):
        yield from _cases(device, 4096, (64, 128), torch.bfloat16, _FWD, _DKDV, _DQ,
                          (False,) if quick else (False, True))
        yield from _padded_case(device, 4096, 160, torch.bfloat16, _PADDED_DKDV, _PADDED_DQ,
                                (False,) if quick else (False, True))
        if not quick:
            yield from _banded_case(device, 16384, 128, (256, 256), torch.bfloat16, _FWD, 65536, 2048)
    else:
        from leedl_fast import backend

        if backend.interpreting():  # the plumbing, through the interpreter: a tiny problem, two tiles each
            yield from _cases(device, 64, (16,), torch.float32, {16: [(32, 16, 4, 1), (16, 32, 4, 1)]},
                              [(16, 32, 4, 1), (32, 16, 4, 1)], [(16, 16, 4, 1), (32, 16, 4, 1)], (False,),
                              tokens=64, width=32)
            yield from _padded_case(device, 48, 20, torch.float32, [(32, 16, 4, 1)], [(32, 16, 4, 1)], (False,),
                                    tokens=48, width=40)
