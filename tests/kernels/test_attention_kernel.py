"""The attention kernels (leedl_fast.kernels.attention) against a dense float64 reference.

Forward output and logsumexp, and dq, dk, dv, for dense, causal and banded attention,
Nq != Nk, grouped-query heads, key padding (including a fully padded batch row),
dropout (the reference draws the same Philox mask through leedl_fast.random), irregular
lengths and head dims, non-contiguous inputs.  Then: the blocks each program visits
are exactly the blocks that intersect the band; two runs are bit-identical.

Under the interpreter fp32 and fp16 run (bf16 is wrong there); on a GPU bf16 too.
"""
from __future__ import annotations

import pytest
import torch

from leedl_fast.random import dropout_keep, dropout_scale
from tests.harness import assert_close

pytest.importorskip("triton")


def _dtypes():
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _with_dtypes(cases):
    """Under the interpreter each case runs in one dtype, alternating fp32 and fp16 so both
    see every feature (the interpreter is slow); on a GPU every case runs in every dtype."""
    if torch.cuda.is_available():
        return [(dt, c) for c in cases for dt in _dtypes()]
    return [((torch.float32, torch.float16)[i % 2], c) for i, c in enumerate(cases)]


# ----------------------------------------------------------------------------------------------
# The float64 reference: every score, the band and padding mask, softmax, the Philox dropout mask.
# ----------------------------------------------------------------------------------------------
def _visible(B, Nq, Nk, left, right, kpm):
    i = torch.arange(Nq)[:, None] + (Nk - Nq)
    j = torch.arange(Nk)[None, :]
    vis = torch.ones(Nq, Nk, dtype=torch.bool)
    if left != -1:
        vis &= j >= i - left
    if right != -1:
        vis &= j <= i + right
    vis = vis.expand(B, 1, Nq, Nk)
    if kpm is not None:
        vis = vis & ~kpm.cpu()[:, None, None, :]
    return vis  # (B, 1, Nq, Nk)


def reference(q, k, v, *, scale, left, right, kpm, dropout_p, seed):
    """(o, lse) in float64; rows without a visible key give o = 0, lse = -inf (finite gradients)."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    vis = _visible(B, Nq, Nk, left, right, kpm)
    s = (scale * q @ k.transpose(-1, -2)).masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    lse = (torch.log(den) + m).squeeze(-1)
    if dropout_p > 0:
        keep = dropout_keep(seed, torch.arange(B * Hq * Nq).view(B, Hq, Nq), Nk, dropout_p)  # rows (b*Hq + h)*Nq + i
        p = p * keep * dropout_scale(dropout_p)
    return p @ v, lse


def _inputs(device, dtype, B, Hq, Hkv, Nq, Nk, D, kpm_mode, layout="contiguous"):
    def make(h, n):
        if layout == "bnhd":  # (B, N, H, D) storage seen as (B, H, N, D): non-contiguous, unit d stride
            return torch.randn(B, n, h, D, dtype=torch.float64).to(dtype).transpose(1, 2)
        if layout == "strided_d":  # every other element along d: stride(-1) == 2
            return torch.randn(B, h, n, 2 * D, dtype=torch.float64).to(dtype)[..., ::2]
        return torch.randn(B, h, n, D, dtype=torch.float64).to(dtype)

    q, k, v = make(Hq, Nq), make(Hkv, Nk), make(Hkv, Nk)
    do = make(Hq, Nq)
    kpm = None
    if kpm_mode:
        kpm = torch.rand(B, Nk) < 0.3
        if kpm_mode == "full_row":
            kpm[-1] = True  # the last batch row sees nothing at all
    dev = [t.to(device) for t in (q, k, v, do)]
    if layout == "bnhd":  # keep the layout on the device
        dev = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in dev]
    elif layout == "strided_d":
        dev = [torch.repeat_interleave(t, 2, dim=-1)[..., ::2] for t in dev]
    elif layout == "wide_nan":  # rows 16-aligned in wider storage whose columns past D hold NaN
        wide = -(-D // 16) * 16 + 16
        dev = [torch.cat([t, t.new_full((*t.shape[:-1], wide - D), float("nan"))], -1)[..., :D] for t in dev]
    return (q, k, v, do, kpm), (*dev, None if kpm is None else kpm.to(device))


def _check(device, dtype, B, Hq, Hkv, Nq, Nk, D, left, right, kpm_mode=None, dropout_p=0.0, layout="contiguous",
           seed=1234, blocks=None, grad_scale=1.0):
    from leedl_fast.kernels.attention import attention_bwd, attention_fwd

    (q, k, v, do, kpm), (qd, kd, vd, dod, kpmd) = _inputs(device, dtype, B, Hq, Hkv, Nq, Nk, D, kpm_mode, layout)
    if layout != "contiguous":
        assert not qd.is_contiguous()
    scale = D ** -0.5
    kw = dict(scale=scale, left=left, right=right, dropout_p=dropout_p, seed=seed)
    fwd_blocks = None if blocks is None else blocks[0]
    bwd_blocks = None if blocks is None else blocks[1:]
    o, lse = attention_fwd(qd, kd, vd, key_padding_mask=kpmd, _blocks=fwd_blocks, **kw)
    dq, dk, dv = attention_bwd(dod, qd, kd, vd, o, lse, key_padding_mask=kpmd, _blocks=bwd_blocks, **kw)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    o_ref, lse_ref = reference(q64, k64, v64, kpm=kpm, **kw)
    o_ref.backward(do.double())

    assert o.dtype == dtype and o.shape == (B, Hq, Nq, D) and o.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Nq)
    assert dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape
    tf32 = device == "cuda"  # fp32 tl.dot runs in TF32 on the GPU
    assert_close(o, o_ref, dtype=dtype, tf32=tf32, name="o")
    # lse is fp32 whatever the input dtype; -inf exactly where no key is visible.
    assert_close(lse, lse_ref, dtype=torch.float32, tf32=tf32 or dtype != torch.float32, name="lse")
    # Gradients sum Nq (dk, dv) or Nk (dq) products of rounded terms (in fp16 the
    # probabilities and dS are rounded to fp16 before the tensor-core products).
    gs = grad_scale * (1.0 if dtype == torch.float32 else 4.0)
    assert_close(dq, q64.grad, dtype=dtype, tf32=tf32, scale=gs, name="dq")
    assert_close(dk, k64.grad, dtype=dtype, tf32=tf32, scale=gs, name="dk")
    assert_close(dv, v64.grad, dtype=dtype, tf32=tf32, scale=gs, name="dv")
    empty = ~_visible(B, Nq, Nk, left, right, kpm).any(-1).expand(B, Hq, Nq)
    assert bool((o[empty.to(o.device)] == 0).all()) and bool((dq[empty.to(o.device)] == 0).all())
    return o, lse, dq, dk, dv


# (B, Hq, Hkv, Nq, Nk, D, left, right, key padding, dropout)
DENSE_CAUSAL = [
    (1, 1, 1, 1, 1, 16, -1, -1, None, 0.0),           # length 1
    (2, 2, 2, 17, 17, 40, -1, -1, None, 0.0),
    (1, 2, 2, 63, 63, 64, -1, 0, None, 0.0),          # causal
    (1, 1, 1, 128, 128, 128, -1, -1, None, 0.0),
    (1, 1, 1, 257, 257, 16, -1, 0, None, 0.0),
    (1, 2, 2, 17, 63, 40, -1, 0, None, 0.0),          # causal, Nq < Nk: bottom-right aligned
    (1, 2, 2, 63, 17, 16, -1, 0, None, 0.0),          # causal, Nq > Nk: the first rows see nothing
    (2, 2, 2, 63, 128, 64, -1, -1, None, 0.0),        # cross-attention
    (1, 4, 2, 63, 63, 16, -1, 0, "random", 0.0),      # GQA + padding
    (1, 4, 1, 17, 33, 40, -1, -1, None, 0.0),         # multi-query
    (3, 2, 2, 63, 63, 40, -1, -1, "full_row", 0.0),   # a fully padded batch row
    (2, 2, 1, 17, 63, 64, -1, 0, "full_row", 0.0),
    (1, 2, 1, 63, 63, 16, -1, -1, None, 0.25),        # dropout, exact Philox mask
    (1, 1, 1, 100, 100, 40, -1, 0, None, 0.5),
]
BANDED = [
    (1, 1, 1, 63, 63, 16, 0, 0, None, 0.0),
    (1, 4, 2, 77, 77, 40, 1, 1, None, 0.0),
    (1, 2, 2, 257, 257, 16, 3, 0, "random", 0.0),     # causal sliding window
    (1, 2, 2, 63, 77, 16, 0, 5, None, 0.0),
    (1, 1, 1, 200, 200, 64, 64, 64, None, 0.0),
    (1, 2, 1, 128, 128, 16, 300, 300, None, 0.0),     # wider than N
    (1, 2, 2, 77, 63, 40, 10, -1, "random", 0.0),     # (w, -1), Nq > Nk
    (2, 2, 2, 63, 63, 16, -1, 7, "full_row", 0.2),    # (-1, w), padding, dropout
    (2, 4, 2, 50, 33, 64, 3, 5, "random", 0.3),       # everything at once
    (1, 2, 2, 17, 1, 16, 0, 0, None, 0.0),            # one key
]


def _ids(cases):
    return ["{}-B{}H{}/{}Nq{}Nk{}D{}w({},{}){}{}".format(str(dt)[6:], *c[:8], f"-kpm:{c[8]}" if c[8] else "",
                                                        f"-p{c[9]}" if c[9] else "") for dt, c in cases]


@pytest.mark.parametrize("dtype,case", _with_dtypes(DENSE_CAUSAL), ids=_ids(_with_dtypes(DENSE_CAUSAL)))
def test_dense_and_causal(triton_path, dtype, case):
    B, Hq, Hkv, Nq, Nk, D, left, right, kpm, p = case
    _check(triton_path, dtype, B, Hq, Hkv, Nq, Nk, D, left, right, kpm, p)


@pytest.mark.parametrize("dtype,case", _with_dtypes(BANDED), ids=_ids(_with_dtypes(BANDED)))
def test_banded(triton_path, dtype, case):
    B, Hq, Hkv, Nq, Nk, D, left, right, kpm, p = case
    _check(triton_path, dtype, B, Hq, Hkv, Nq, Nk, D, left, right, kpm, p)


@pytest.mark.parametrize("layout", ["bnhd", "strided_d"])
def test_non_contiguous(triton_path, layout):
    _check(triton_path, torch.float32, 2, 2, 1, 33, 47, 40, 5, 0, "random", 0.1, layout=layout)


@pytest.mark.parametrize("blocks", [((64, 32), (32, 64), (64, 32)), ((16, 64), (64, 16), (16, 64)),
                                    ((64, 32), (32, 64, True), (64, 32))],
                         ids=["large", "tall-wide", "split-dkdv"])
def test_other_tiles(triton_path, blocks):
    """Other (BLOCK_M, BLOCK_N) pairs (forward; dK/dV; dQ) give the same function, and so does
    the dK/dV kernel's two-pass mode (SPLIT_DKDV) forced at a small head dim."""
    _check(triton_path, torch.float32, 1, 2, 1, 70, 50, 16, 20, 3, "random", 0.1, blocks=blocks)


@pytest.mark.parametrize("left,right", [(2**31 - 2, 2**31 - 2), (2**31 - 1, 0), (-1, 2**31 - 20), (5, 2**40)])
def test_huge_windows(triton_path, left, right):
    """Window bounds near or past the int32 range (2**31 - 1 as "unbounded"): the band's loop bounds
    and masks (row + shift + right, key + left - shift + 1, ...) are int32 in the kernels and used to
    wrap to negative values, so that rows saw no key at all (forward: o = 0) or the wrong keys; the
    launchers clamp a bound wider than the problem to the problem's size, the same band."""
    _check(triton_path, torch.float32, 1, 2, 1, 45, 37, 16, left, right, "random", 0.1)


@pytest.mark.parametrize("D,dtype", [(20, torch.float16), (40, torch.float16), (77, torch.float32)])
def test_padded_head_dims_read_only_the_head(triton_path, D, dtype):
    """Head dims below the tile width: the kernels load the tiles of their loops with wrapped columns
    (column d % HEAD_DIM past the head, _load_tile) and run a head dim that is not a multiple of 8 as
    kernel_head_dim(D) on a copy with zeros in the extra columns (_prep).  Inputs here are views into
    wider, aligned storage whose columns past D are NaN: a load past the head, or a view not copied
    before a rounded-up HEAD_DIM is read, would put NaN in the outputs."""
    from leedl_fast.kernels import attention as A

    assert A.kernel_head_dim(D) == -(-D // 8) * 8 and A.kernel_head_dim(D) < A.block_d_for(D)
    _check(triton_path, dtype, 1, 2, 1, 33, 47, D, 5, 3, "random", 0.1, layout="wide_nan")


@pytest.mark.parametrize("D,left,right,kpm,p", [(160, 9, 2, "random", 0.2), (256, -1, 0, None, 0.0)])
def test_head_dim_256_group(triton_path, D, left, right, kpm, p):
    """Head dims 129..256 in fp16: the configuration the GPU uses there, dK/dV in two passes
    (SPLIT_DKDV, chosen by the launcher as on the GPU), grouped query heads."""
    from leedl_fast.kernels import attention as A

    q = torch.empty(1, 1, 1, D, dtype=torch.float16, device=triton_path)
    assert A._config("_attention_bwd_dkdv_kernel", q, 256, None)["SPLIT_DKDV"]
    _check(triton_path, torch.float16, 1, 4, 2, 33, 47, D, left, right, kpm, p)


# ----------------------------------------------------------------------------------------------
# Loop bounds: the blocks visited are exactly those that intersect the band.
# ----------------------------------------------------------------------------------------------
def _blocks_touching_band(Nq, Nk, left, right, bm, bn, transpose=False):
    """For each block of rows (queries, or keys with transpose=True): how many blocks on the other
    axis hold at least one pair inside the band (padding ignored: it never changes the bounds)."""
    vis = _visible(1, Nq, Nk, left, right, None)[0, 0]
    if transpose:
        vis, bm, bn = vis.t(), bn, bm
    n_r, n_c = -(-vis.shape[0] // bm), -(-vis.shape[1] // bn)
    out = torch.zeros(n_r, dtype=torch.int32)
    for r in range(n_r):
        rows = vis[r * bm:(r + 1) * bm]
        out[r] = sum(bool(rows[:, c * bn:(c + 1) * bn].any()) for c in range(n_c))
    return out


@pytest.mark.parametrize("Nq,Nk,left,right,split", [
    (100, 100, 16, 16, False), (90, 90, 20, 0, False), (60, 100, -1, 0, False), (100, 50, 0, -1, False),
    (64, 64, 0, 0, False), (90, 90, 20, 0, True),
])
def test_visited_blocks_are_the_band(triton_path, Nq, Nk, left, right, split):
    """split: the dK/dV kernel in two passes; its count is that of one pass."""
    from leedl_fast.kernels.attention import attention_bwd, attention_fwd

    B, Hq, Hkv, D = 1, 2, 1, 16
    q = torch.randn(B, Hq, Nq, D, device=triton_path)
    k = torch.randn(B, Hkv, Nk, D, device=triton_path)
    v = torch.randn(B, Hkv, Nk, D, device=triton_path)
    kw = dict(scale=0.25, left=left, right=right, key_padding_mask=None, dropout_p=0.0, seed=0)
    fb, b1, b2 = (32, 16), (16, 32, split), (32, 16)
    o, lse, cnt = attention_fwd(q, k, v, count_blocks=True, _blocks=fb, **kw)
    _, _, _, cnt_dq, cnt_dkdv = attention_bwd(torch.randn_like(o), q, k, v, o, lse, count_blocks=True,
                                              _blocks=(b1, b2), **kw)
    want_fwd = _blocks_touching_band(Nq, Nk, left, right, *fb)
    want_dq = _blocks_touching_band(Nq, Nk, left, right, *b2)
    want_dkdv = _blocks_touching_band(Nq, Nk, left, right, *b1[:2], transpose=True) * (Hq // Hkv)
    assert torch.equal(cnt.cpu(), want_fwd.expand(B, Hq, -1)), (cnt, want_fwd)
    assert torch.equal(cnt_dq.cpu(), want_dq.expand(B, Hq, -1)), (cnt_dq, want_dq)
    assert torch.equal(cnt_dkdv.cpu(), want_dkdv.expand(B, Hkv, -1)), (cnt_dkdv, want_dkdv)
    if (left, right) != (-1, -1):  # a band skips work: fewer blocks than the full grid
        assert int(want_fwd.sum()) < len(want_fwd) * -(-Nk // fb[1])


def test_deterministic(triton_path):
    """The same inputs and seed give bit-identical outputs and gradients (no atomics)."""
    from leedl_fast.kernels.attention import attention_bwd, attention_fwd

    B, Hq, Hkv, N, D = 2, 2, 1, 40, 40
    q = torch.randn(B, Hq, N, D, device=triton_path)
    k = torch.randn(B, Hkv, N, D, device=triton_path)
    v = torch.randn(B, Hkv, N, D, device=triton_path)
    do = torch.randn(B, Hq, N, D, device=triton_path)
    kpm = (torch.rand(B, N) < 0.2).to(triton_path)
    kw = dict(scale=0.15, left=20, right=3, key_padding_mask=kpm, dropout_p=0.3, seed=99)
    runs = []
    for _ in range(2):
        o, lse = attention_fwd(q, k, v, **kw)
        runs.append((o, lse, *attention_bwd(do, q, k, v, o, lse, **kw)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # A different seed changes the dropout mask.
    o2, _ = attention_fwd(q, k, v, **{**kw, "seed": 100})
    assert not torch.equal(o2, runs[0][0])


def test_batch_chunks_launch_the_same_function(triton_path, monkeypatch):
    """A batch launched in chunks (CUDA caps a grid's batch axis at 65535 rows; here chunks of 2 rows)
    gives bit for bit the single launch's outputs, gradients, dropout mask and visited-block counts."""
    from leedl_fast.kernels import attention as A
    from leedl_fast.kernels.attention import attention_bwd, attention_fwd

    B, Hq, Hkv, Nq, Nk, D = 5, 4, 2, 37, 45, 16
    q = torch.randn(B, Hq, Nq, D, device=triton_path)
    k, v = (torch.randn(B, Hkv, Nk, D, device=triton_path) for _ in range(2))
    do = torch.randn(B, Hq, Nq, D, device=triton_path)
    kpm = (torch.rand(B, Nk) < 0.2).to(triton_path)
    kw = dict(scale=0.25, left=9, right=2, key_padding_mask=kpm, dropout_p=0.3, seed=11, count_blocks=True)

    def run():
        o, lse, cnt = attention_fwd(q, k, v, **kw)
        return (o, lse, cnt, *attention_bwd(do, q, k, v, o, lse, **kw))

    whole = run()
    real = A._batch_chunks
    launches = []

    def small_chunks(batch):
        chunks = list(real(batch, limit=2))
        launches.append(chunks)
        return chunks

    monkeypatch.setattr(A, "_batch_chunks", small_chunks)
    chunked = run()
    assert [[(b0, r.start, r.stop) for b0, r in chunks] for chunks in launches] == [[(0, 0, 2), (2, 2, 4), (4, 4, 5)]] * 3
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    assert [(b0, r.stop - r.start) for b0, r in real(200_000)] == [(0, 65535), (65535, 65535), (131070, 65535),
                                                                    (196605, 3395)]


def test_launch_configs_cover_every_case():
    """Every (kernel, target, head-dim group) has a 16-bit entry, every (kernel, target) an fp32 one,
    and every head dim from 16 to 256 maps to a shipped entry on both targets."""
    from leedl_fast.kernels import attention as A

    cfgs = A.launch_configs()
    for kernel in ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"):
        for arch in ("sm80", "sm90"):
            for group in (64, 128, 256):
                assert any(c["kernel"] == kernel and c["arch"] == arch and c["block_d"] == group
                           and c["dtype"] == "16" for c in cfgs)
            assert any(c["kernel"] == kernel and c["arch"] == arch and c["dtype"] == "32" for c in cfgs)
    for d in range(16, 257):
        block_d = max(16, 1 << (d - 1).bit_length())
        assert A._head_dim_group(block_d) in (64, 128, 256) and A._head_dim_group(block_d) >= block_d


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_every_head_dim_launches_a_compiled_entry(monkeypatch, arch):
    """For every head dim 16..256 and 16-bit or fp32 input, the launch parameters a GPU launch takes are
    those of exactly one launch_configs() entry that serves that head dim (full or padded), the entries
    test_attention_compile.py compiles at a full and at a padded head dim."""
    from types import SimpleNamespace

    from leedl_fast.kernels import attention as A

    monkeypatch.setattr(A, "_arch", lambda index: arch)
    cfgs = A.launch_configs()
    for d in range(16, 257):
        block_d = A.block_d_for(d)
        serves = "padded" if A.kernel_head_dim(d) < block_d else "full"
        for dtype, kind in ((torch.float16, "16"), (torch.bfloat16, "16"), (torch.float32, "32")):
            t = SimpleNamespace(dtype=dtype, is_cuda=True, device=SimpleNamespace(index=0), shape=(1, 1, 1, d))
            for kernel in ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"):
                got = A._config(kernel, t, block_d, None)
                match = [c for c in cfgs if c["kernel"] == kernel and c["arch"] == arch and c["dtype"] == kind
                         and (kind == "32" or c["block_d"] == A._head_dim_group(block_d))
                         and c["serves"] in ("both", serves)]
                assert len(match) == 1, (d, dtype, kernel, match)
                c = match[0]
                assert (got["BLOCK_M"], got["BLOCK_N"], got["num_warps"], got["num_stages"]) == \
                    (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]), (d, dtype, kernel)
                assert got.get("SPLIT_DKDV", False) == c["split_dkdv"], (d, dtype, kernel)
                assert got.get("maxnreg") == c["maxnreg"] == (A.MAXNREG_FP32 if kind == "32" else None)


@pytest.mark.parametrize("capability,arch", [((8, 0), "sm80"), ((8, 6), "sm80"), ((8, 9), "sm80"), ((9, 0), "sm90"),
                                             ((10, 0), "sm80"), ((12, 0), "sm80")])
def test_tile_table_by_compute_capability(monkeypatch, capability, arch):
    """The "sm90" tiles (forward 128 x 64 at head dim 64/128: 139 KB of shared memory, dQ up to 200 KB,
    tests/kernels/test_attention_compile.py) fit only Hopper's 227 KB per block; every capability
    >= 9 used to take them, so on consumer Blackwell (sm_120, RTX 50xx: 99 KB per block, as sm_86/sm_89)
    every launch failed with OutOfResources.  Only Hopper takes them; other GPUs the "sm80" tiles,
    which the compile checks keep within 99 KB."""
    from leedl_fast.kernels import attention as A

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    A._arch.cache_clear()
    try:
        assert A._arch(0) == arch
    finally:
        A._arch.cache_clear()
