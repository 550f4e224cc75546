"""ops.attention / banded_attention on both paths against the float64 dense reference.

The torch path (ATen's fused CPU kernels, blocked for a band, plain math with dropout) is
tested broadly; the Triton path runs under the interpreter here on a few small cases that
exercise the op's plumbing (A1's kernel tests cover the kernels in depth), and on a GPU in full.
"""
import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leedl_fast.ops import (attention, attention_reference, banded_attention, normalize_window,
                            window_from_flash_attn, window_from_flex_sliding, window_from_num_keys)
from leedl_fast.training import torch_threads
from tests.harness import assert_close

attn_mod = importlib.import_module("leedl_fast.ops.attention")  # the package attribute is the function

F64 = torch.float64


def _inputs(b, hq, hkv, nq, nk, d, *, layout="contiguous", pad=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(h, n):
        if layout == "bnhd":       # (B, N, H, D) storage seen as (B, H, N, D), as MultiheadAttention makes it
            return torch.randn(b, n, h, d, dtype=F64, generator=g).transpose(1, 2)
        if layout == "packed":     # a slice of a packed projection: not dense
            return torch.randn(b, n, 3, h, d, dtype=F64, generator=g)[:, :, 1].transpose(1, 2)
        return torch.randn(b, h, n, d, dtype=F64, generator=g)

    q, k, v = make(hq, nq), make(hkv, nk), make(hkv, nk)
    do = torch.randn(b, hq, nq, d, dtype=F64, generator=g)
    kpm = None
    if pad == "random":
        kpm = torch.rand(b, nk, generator=g) < 0.3
        if b > 1:
            kpm[-1] = True            # a fully padded batch row: zeros, zero gradients
    return q, k, v, do, kpm


def _check(device, q, k, v, do, dtype, scale=1.0, **kw):
    """Output and dq, dk, dv of ``attention`` in ``dtype`` on ``device`` vs the float64 reference."""
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qr, kr, vr, **kw)
    ref.backward(do)
    qa, ka, va = (t.to(device=device, dtype=dtype).detach().requires_grad_() for t in (q, k, v))
    kw = dict(kw)
    if kw.get("key_padding_mask") is not None:
        kw["key_padding_mask"] = kw["key_padding_mask"].to(device)
    out = attention(qa, ka, va, **kw)
    out.backward(do.to(device=device, dtype=dtype))
    assert out.dtype == dtype and out.shape == q.shape
    # The gradients sum Nq or Nk rounded products: in half precision they get a wider bound.
    gscale = scale * (1.0 if dtype == torch.float32 else 2.0)
    assert_close(out, ref, dtype=dtype, name="o", scale=scale)
    assert_close(qa.grad, qr.grad, dtype=dtype, name="dq", scale=gscale)
    assert_close(ka.grad, kr.grad, dtype=dtype, name="dk", scale=gscale)
    assert_close(va.grad, vr.grad, dtype=dtype, name="dv", scale=gscale)
    return out, qa.grad, ka.grad, va.grad


# ------------------------------------------------------------------------------ torch path, broad

# (B, Hq, Hkv, Nq, Nk, D)
SHAPES = [
    (1, 2, 2, 1, 1, 16), (2, 2, 1, 17, 17, 40), (2, 4, 2, 63, 63, 64), (1, 2, 2, 128, 128, 128),
    (2, 3, 3, 257, 257, 16), (2, 4, 1, 17, 63, 16), (2, 4, 2, 63, 17, 40), (1, 2, 2, 1, 77, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [None, "random"])
def test_dense_causal_padding_gqa_torch(torch_path, shape, causal, pad):
    b, hq, hkv, nq, nk, d = shape
    q, k, v, do, kpm = _inputs(b, hq, hkv, nq, nk, d, pad=pad)
    _check(torch_path, q, k, v, do, torch.float32, causal=causal, key_padding_mask=kpm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes_torch(torch_path, dtype, causal):
    q, k, v, do, kpm = _inputs(2, 4, 2, 63, 77, 40, pad="random")
    _check(torch_path, q, k, v, do, dtype, causal=causal, key_padding_mask=kpm)
    _check(torch_path, q, k, v, do, dtype, window=(5, 9), key_padding_mask=kpm)


WINDOWS = [(0, 0), (1, 1), (3, 0), (0, 5), (64, 64), (300, 300), (2, 9), (9, 2), (7, -1), (-1, 7)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("n", [(257, 257), (200, 257), (257, 130)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_windows_torch(torch_path, window, n):
    nq, nk = n
    q, k, v, do, kpm = _inputs(2, 4, 2, nq, nk, 16, pad="random")
    _check(torch_path, q, k, v, do, torch.float32, window=window, key_padding_mask=kpm)
    _check(torch_path, q, k, v, do, torch.float32, window=window, causal=True)


@st.composite
def _problems(draw, max_len):
    """Every option of the op at once: GQA, lengths (Nq != Nk), head dim, causal, a band (either side
    unbounded or wider than the sequence), key padding, dropout, scale and the inputs' layout."""
    hkv, groups = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 2)), hkv * groups, hkv, draw(st.integers(1, max_len)),
             draw(st.integers(1, max_len)), draw(st.sampled_from([16, 24, 40, 64])))
    side = st.one_of(st.just(-1), st.integers(0, max_len + 8))
    kw = {"causal": draw(st.booleans()), "window": draw(st.one_of(st.none(), st.tuples(side, side))),
          "scale": draw(st.sampled_from([None, 0.3])), "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.2]))}
    if kw["scale"] is None:
        del kw["scale"]
    if kw["dropout_p"]:
        kw["seed"] = draw(st.integers(0, 2**40))
    layout = draw(st.sampled_from(["contiguous", "bnhd", "packed"]))
    return shape, draw(st.sampled_from([None, "random"])), layout, draw(st.integers(0, 2**16)), kw


def _check_problem(device, problem):
    shape, pad, layout, seed, kw = problem
    q, k, v, do, kpm = _inputs(*shape, layout=layout, pad=pad, seed=seed)
    _check(device, q, k, v, do, torch.float32, key_padding_mask=kpm, **kw)


_RANDOM = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=40, **_RANDOM)
@given(problem=_problems(max_len=90))
def test_random_problems_torch(torch_path, problem):
    """Random problems over all options together against the float64 reference: output and gradients."""
    _check_problem(torch_path, problem)


@settings(max_examples=12, **_RANDOM)
@given(problem=_problems(max_len=40))
def test_random_problems_triton(triton_path, problem):
    """The same on the Triton path (the kernel under the interpreter here), on shorter sequences."""
    _check_problem(triton_path, problem)


@pytest.mark.parametrize("layout", ["bnhd", "packed"])
@pytest.mark.parametrize("window", [None, (20, 3)])
def test_non_contiguous_torch(torch_path, layout, window):
    q, k, v, do, kpm = _inputs(2, 4, 2, 257, 200, 64, layout=layout, pad="random")
    _check(torch_path, q, k, v, do, torch.float32, window=window, key_padding_mask=kpm)
    q, k, v, do, _ = _inputs(1, 2, 2, 300, 300, 32, layout=layout)
    _check(torch_path, q, k, v, do, torch.float32, window=window, causal=True)


@pytest.mark.parametrize("pad", [None, "random"])
def test_banded_chunked_interior_torch(torch_path, monkeypatch, pad):
    """The banded path's tiled interior split into many kernel calls gives the same result."""
    monkeypatch.setattr(attn_mod, "_CHUNK_ELEMS", 1)      # one block per kernel call
    q, k, v, do, kpm = _inputs(2, 4, 2, 700, 640, 16, pad=pad)
    _check(torch_path, q, k, v, do, torch.float32, window=(30, 50), key_padding_mask=kpm)


def test_scale_and_banded_alias(torch_path):
    q, k, v, do, _ = _inputs(1, 2, 2, 40, 40, 16)
    _check(torch_path, q, k, v, do, torch.float32, window=(4, 4))
    a = banded_attention(q.float(), k.float(), v.float(), (4, 4), scale=0.3)
    assert_close(a, attention_reference(q, k, v, window=(4, 4), scale=0.3), dtype=torch.float32)
    with pytest.raises(ValueError, match="window"):
        banded_attention(q, k, v, None)


@pytest.mark.parametrize("window,causal", [(None, False), (None, True), ((6, 2), False), ((-1, 3), True)])
def test_dropout_matches_reference_torch(torch_path, window, causal):
    q, k, v, do, kpm = _inputs(2, 4, 2, 63, 70, 16, pad="random")
    _check(torch_path, q, k, v, do, torch.float32, window=window, causal=causal, key_padding_mask=kpm,
           dropout_p=0.3, seed=1234)


def test_dropout_seed_semantics(torch_path):
    q, k, v, _, _ = _inputs(1, 2, 2, 64, 64, 16)
    q, k, v = q.float(), k.float(), v.float()
    a = attention(q, k, v, dropout_p=0.5, seed=7)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=7))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=8))
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.5))
    # About half the probabilities are dropped: with v = identity, o holds P * keep * scale.
    eye = torch.eye(16).expand(1, 2, 16, 16)
    p = attention(q, k[:, :, :16], eye, dropout_p=0.5, seed=11)
    frac = (p == 0).float().mean().item()
    assert 0.4 < frac < 0.6
    assert_close(p.sum(-1).mean(), torch.tensor(1.0), dtype=torch.float32, atol=0.1)


def test_lse_and_empty_rows(torch_path):
    """The op's lse equals the reference's; rows with no visible key give o = 0, lse = -inf, zero grads."""
    b, h, nq, nk, d = 2, 2, 9, 5, 16
    q, k, v, do, _ = _inputs(b, h, h, nq, nk, d)
    kpm = torch.zeros(b, nk, dtype=torch.bool)
    kpm[0, :2] = True                      # with causal, row 4 of batch 0 sees only keys 0..0: padded
    kpm[1] = True
    for kw in ({"causal": True}, {"window": (1, 0)}, {}):
        left, right = normalize_window(kw.get("causal", False), kw.get("window"))
        o, lse = torch.ops.leedl_fast.attention_fwd(q.float(), k.float(), v.float(), kpm, None, 1 / math.sqrt(d),
                                                    left, right, 0.0)
        ref_o, ref_lse = attention_reference(q, k, v, key_padding_mask=kpm, return_lse=True, **kw)
        assert_close(o, ref_o, dtype=torch.float32, name="o")
        assert_close(lse, ref_lse, dtype=torch.float32, name="lse")
        empty = torch.isneginf(ref_lse)
        assert empty[1].all() and bool(empty[0].any()) == bool(kw)
        qa, ka, va = (t.float().requires_grad_() for t in (q, k, v))
        out = attention(qa, ka, va, key_padding_mask=kpm, **kw)
        out.backward(do.float())
        assert (out[empty] == 0).all()
        assert (qa.grad[empty] == 0).all() and (ka.grad[1] == 0).all() and (va.grad[1] == 0).all()
        for t in (out, qa.grad, ka.grad, va.grad):
            assert not torch.isnan(t).any()


@pytest.mark.parametrize("kw", [{"window": (10, 20), "dropout_p": 0.2, "seed": 5}, {"causal": True}, {}], ids=str)
def test_deterministic_torch(torch_path, kw):
    """Bit-identical reruns: the dropout path, the causal split (Nq < Nk) and grouped-query
    attention in ATen's kernels (key gradients summed over the group inside them), two threads."""
    q, k, v, do, kpm = _inputs(2, 4, 1, 70, 90, 32, pad="random")
    runs = []
    with torch_threads(2):
        for _ in range(2):
            qa, ka, va = (t.float().requires_grad_() for t in (q, k, v))
            o = attention(qa, ka, va, key_padding_mask=kpm, **kw)
            o.backward(do.float())
            runs.append((o, qa.grad, ka.grad, va.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ no N x N on the banded path

def test_banded_torch_path_never_allocates_n_by_n(torch_path):
    """Every tensor the banded torch path creates, forward and backward, is O(N * w), far below N^2."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Biggest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    Biggest.largest = max(Biggest.largest, t.numel())
            return out

    n, d, w = 4096, 16, (8, 8)
    q, k, v, do = (torch.randn(1, 1, n, d) for _ in range(4))
    kpm = torch.rand(1, n) < 0.1
    scale = 1 / math.sqrt(d)
    with Biggest():
        o, lse, _ = attn_mod._attention_fwd_torch(q, k, v, kpm, scale, *w, 0.0, 0)
        attn_mod._attention_bwd_torch(do, q, k, v, o, lse, kpm, scale, *w, 0.0, 0)
        # dropout takes the plain-math path (Philox is slow: a quarter of the length)
        m = n // 4
        o2, lse2, _ = attn_mod._attention_fwd_torch(q[:, :, :m], k[:, :, :m], v[:, :, :m], kpm[:, :m], scale, *w, 0.1, 3)
        attn_mod._attention_bwd_torch(do[:, :, :m], q[:, :, :m], k[:, :, :m], v[:, :, :m], o2, lse2, kpm[:, :m],
                                      scale, *w, 0.1, 3)
    assert Biggest.largest <= 64 * n * d, f"largest tensor {Biggest.largest} elements vs N^2 = {n * n}"
    # and it computed the right thing: rows 0..291 see only keys 0..299
    ref = attention_reference(q[:, :, :300].double(), k[:, :, :300].double(), v[:, :, :300].double(),
                              window=w, key_padding_mask=kpm[:, :300])
    assert_close(o[:, :, :292], ref[:, :, :292], dtype=torch.float32)


# ------------------------------------------------------------------------------ Triton path (interpreter) plumbing

TRITON_CASES = [
    # (B, Hq, Hkv, Nq, Nk, D, kwargs)
    (2, 2, 1, 17, 33, 16, {"causal": True, "pad": True}),
    (1, 2, 2, 40, 40, 40, {"window": (3, 5), "pad": True, "dropout_p": 0.25, "seed": 9}),
    (1, 2, 2, 33, 20, 16, {"window": (-1, 4)}),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: str(c[-1]))
def test_triton_path_plumbing(triton_path, case):
    b, hq, hkv, nq, nk, d, kw = case
    kw = dict(kw)
    pad = kw.pop("pad", False)
    q, k, v, do, kpm = _inputs(b, hq, hkv, nq, nk, d, pad="random" if pad else None, layout="bnhd")
    dtypes = [torch.float32] if kw.get("dropout_p") else [torch.float32, torch.float16]
    for dtype in dtypes:
        _check(triton_path, q, k, v, do, dtype, key_padding_mask=kpm, **kw)


def test_triton_and_torch_paths_agree_with_dropout(monkeypatch):
    """Same seed, same Philox mask on both paths: the same function."""
    pytest.importorskip("triton")
    q, k, v, _, kpm = _inputs(2, 2, 1, 24, 40, 16, pad="random")
    q, k, v = q.float(), k.float(), v.float()
    outs = []
    for path in ("torch", "triton"):
        monkeypatch.setenv("LEEDL_FAST_BACKEND", path)
        outs.append(attention(q, k, v, window=(6, 1), key_padding_mask=kpm, dropout_p=0.4, seed=321))
    assert_close(outs[1], outs[0], dtype=torch.float32)


# ------------------------------------------------------------------------------ errors

def _ok():
    return torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q.numpy(), k, v, {}), "q must be"),
    (lambda q, k, v: (q[0], k, v, {}), "q must be 4-D"),
    (lambda q, k, v: (q, k.double(), v, {}), "dtype"),
    (lambda q, k, v: (q, k, v[:, :, :5], {}), "v must have k's shape"),
    (lambda q, k, v: (q, k[:1], v[:1], {}), "batch"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8], {}), "head dim"),
    (lambda q, k, v: (q[:, :3], k, v, {}), "multiple"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8], {}), "head dim must be in"),
    (lambda q, k, v: (torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300), {}),
     "head dim must be in"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.zeros(2, 8)}), "key_padding_mask must be a bool"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.zeros(2, 7, dtype=torch.bool)}), "key_padding_mask must have shape"),
    (lambda q, k, v: (q, k, v, {"dropout_p": 1.0}), "dropout_p"),
    (lambda q, k, v: (q, k, v, {"dropout_p": -0.1}), "dropout_p"),
    (lambda q, k, v: (q, k, v, {"window": (1, -2)}), "window"),
    (lambda q, k, v: (q, k, v, {"window": 3}), "window"),
    (lambda q, k, v: (q, k, v, {"window": (1.0, 2)}), "window"),
    (lambda q, k, v: (q, k, v, {"window": (1, 2, 3)}), "window"),
    (lambda q, k, v: (q, k, v, {"causal": 1}), "causal"),
    (lambda q, k, v: (q, k, v, {"seed": -1}), "seed"),
    (lambda q, k, v: (q, k, v, {"scale": float("nan")}), "scale"),
])
def test_errors(change, match):
    q, k, v, kw = change(*_ok())
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kw)


@pytest.mark.parametrize("nq,nk", [(0, 8), (5, 0), (0, 0)])
def test_zero_lengths(any_path, nq, nk):
    """No queries: an empty result; no keys: every row sees nothing, so zeros (as any such row).  Gradients are
    zeros of each input's shape, as SDPA's; no kernel runs."""
    q = torch.randn(2, 4, nq, 16, device=any_path, requires_grad=True)
    k = torch.randn(2, 2, nk, 16, device=any_path, requires_grad=True)
    v = torch.randn(2, 2, nk, 16, device=any_path, requires_grad=True)
    kpm = torch.zeros(2, nk, dtype=torch.bool, device=any_path)
    o = attention(q, k, v, causal=True, key_padding_mask=kpm, dropout_p=0.3)
    assert o.shape == q.shape and o.dtype == q.dtype and torch.equal(o, torch.zeros_like(q))
    o.backward(torch.randn_like(o))
    for t in (q, k, v):
        assert t.grad.shape == t.shape and not t.grad.any()


def test_errors_before_any_kernel(monkeypatch):
    """Validation happens before the custom op (and so before any kernel) is reached."""
    def boom(*a, **k):
        raise AssertionError("kernel reached")
    monkeypatch.setattr(attn_mod, "_attention_fwd_op", boom)
    q, k, v = _ok()
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=(-5, 0))


# ------------------------------------------------------------------------------ window converters

def test_window_converters():
    n = 40
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]

    def ours(window, causal=False, nq=n, nk=n):
        left, right = normalize_window(causal, window)
        return attn_mod._visible_mask(nq, nk, left, right, None, "cpu")[0, 0]

    for w in (0, 1, 5, 100):
        # FlexAttention: causal (q_idx >= kv_idx) and sliding window (q_idx - kv_idx <= W)
        flex = (i >= j) & (i - j <= w)
        assert torch.equal(ours(window_from_flex_sliding(w)), flex)
        assert torch.equal(ours(window_from_flex_sliding(w, causal=False)), i - j <= w)
        assert torch.equal(ours((w, -1), causal=True), flex)
    for nq, nk in ((n, n), (17, n), (n, 23)):
        ii = torch.arange(nq)[:, None]
        jj = torch.arange(nk)[None, :]
        for left, right in ((3, 0), (0, 4), (2, 7), (-1, 2), (5, -1), (-1, -1)):
            # FlashAttention window_size=(left, right): keys [i + Nk - Nq - left, i + Nk - Nq + right], -1 = inf
            lo = ii + nk - nq - (left if left >= 0 else 10**9)
            hi = ii + nk - nq + (right if right >= 0 else 10**9)
            fa = (jj >= lo) & (jj <= hi)
            assert torch.equal(ours(window_from_flash_attn((left, right)), nq=nq, nk=nk), fa)
    for num in (1, 2, 7):
        vis = ours(window_from_num_keys(num))
        assert (vis.sum(1)[num:] == num).all() and torch.equal(vis, vis & (i >= j))
    vis = ours(window_from_num_keys(5, causal=False))
    assert (vis.sum(1)[2:-2] == 5).all() and torch.equal(vis, vis.T)
    with pytest.raises(ValueError):
        window_from_num_keys(4, causal=False)
    with pytest.raises(ValueError):
        window_from_flex_sliding(-1)
    assert normalize_window(True, (4, 9)) == (4, 0) and normalize_window(True, None) == (-1, 0)
    assert normalize_window(False, None) == (-1, -1)


# ------------------------------------------------------------------------------ custom op registration

@pytest.mark.parametrize("layout", ["contiguous", "bnhd"])
@pytest.mark.parametrize("kw", [dict(left=-1, right=-1), dict(left=-1, right=0), dict(left=2, right=3, pad=True),
                                dict(left=-1, right=-1, p=0.3)], ids=str)
def test_opcheck(torch_path, layout, kw):
    kw = dict(kw)
    q, k, v, _, kpm = _inputs(2, 4, 2, 33, 33, 16, layout=layout, pad="random" if kw.pop("pad", False) else None)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    p = kw.pop("p", 0.0)
    seed = torch.tensor(77) if p > 0 else None
    torch.library.opcheck(torch.ops.leedl_fast.attention_fwd.default, (q, k, v, kpm, seed, 0.25, kw["left"],
                                                                        kw["right"], p))
    o, lse = torch.ops.leedl_fast.attention_fwd(q, k, v, kpm, seed, 0.25, kw["left"], kw["right"], p)
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.leedl_fast.attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, kpm, seed, 0.25, kw["left"],
                           kw["right"], p))


@pytest.mark.parametrize("layout", ["contiguous", "bnhd", "packed"])
@pytest.mark.parametrize("nq, nk, left, right, p", [
    (33, 33, -1, -1, 0.0),        # dense: ATen's results passed on
    (33, 33, -1, 0, 0.0),         # square causal: one call, passed on
    (40, 33, -1, 0, 0.0),         # causal with Nq > Nk: leading rows see nothing, written into a buffer
    (20, 33, -1, 0, 0.0),         # causal with Nq < Nk: two calls merged
    (33, 33, 2, 3, 0.0),          # band: blocks written into buffers
    (33, 30, -1, -1, 0.3),        # dropout: the math blocks
], ids=str)
def test_result_layouts_are_the_fake_ones(torch_path, layout, nq, nk, left, right, p):
    """Every torch-path branch returns o and the gradients in the layouts the fake implementations
    promise (a compiled graph relies on them), whether it passes a kernel's result on or writes a buffer."""
    q, k, v, do, _ = _inputs(2, 4, 2, nq, nk, 16, layout=layout)
    seed = torch.tensor(5) if p > 0 else None
    o, lse = torch.ops.leedl_fast.attention_fwd(q, k, v, None, seed, 0.25, left, right, p)
    grads = torch.ops.leedl_fast.attention_bwd(do, q, k, v, o, lse, None, seed, 0.25, left, right, p)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv, fdo = (mode.from_tensor(t) for t in (q, k, v, do))
        fseed = None if seed is None else mode.from_tensor(seed)
        fo, flse = torch.ops.leedl_fast.attention_fwd(fq, fk, fv, None, fseed, 0.25, left, right, p)
        fgrads = torch.ops.leedl_fast.attention_bwd(fdo, fq, fk, fv, fo, flse, None, fseed, 0.25, left, right, p)
    for name, real, fake in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (fo, flse, *fgrads)):
        assert real.shape == fake.shape and attn_mod._same_layout(real, fake), (name, real.stride(), fake.stride())
        assert real.storage_offset() == fake.storage_offset() == 0, name


def test_torch_compile_fullgraph(torch_path):
    lin = torch.nn.Linear(32, 3 * 32)

    def f(x, kpm):
        qkv = lin(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)                 # [3, B, H, N, 16]
        o = attention(qkv[0], qkv[1], qkv[2], causal=True, key_padding_mask=kpm)
        o = o + banded_attention(qkv[0], qkv[1], qkv[2], (3, 3), dropout_p=0.1, seed=4)
        return o.sum(1)

    x = torch.randn(2, 37, 32, requires_grad=True)
    kpm = torch.rand(2, 37) < 0.2
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, kpm)
    out.square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref = f(x, kpm)
    ref.square().sum().backward()
    assert_close(out, ref, dtype=torch.float32)
    assert_close(gx, x.grad, dtype=torch.float32)


def test_torch_compile_draws_seed_in_graph(torch_path):
    """dropout with seed=None inside a fullgraph-compiled function: the seed comes from torch's generator."""
    def f(q):
        return attention(q, q, q, dropout_p=0.5)

    q = torch.randn(1, 2, 20, 16)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    a = compiled(q)
    torch.manual_seed(1)
    b = compiled(q)
    torch.manual_seed(2)
    c = compiled(q)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, attention(q, q, q))


@pytest.mark.parametrize("save_probs", [False, True], ids=["recomputed", "saved_probs"])
@pytest.mark.parametrize("block_scores", [None, 300], ids=["one_block", "many_blocks"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (3, 5)], ids=str)
def test_plain_math_path(window, p, block_scores, save_probs, monkeypatch):
    """The math blocks (the torch path off the CPU, and with dropout), with and without dropout, in one
    block and split into many (query blocks of one or a few rows, ragged last block); the backward from
    the forward's saved +-probabilities (one block only) or recomputing them."""
    if block_scores is not None:
        monkeypatch.setattr(attn_mod, "_MATH_BLOCK_SCORES", block_scores)
        assert len(list(attn_mod._math_blocks(45, 50, *window, 2, 4))) > 4
    q, k, v, do, kpm = _inputs(2, 4, 2, 45, 50, 16, pad="random")
    kpm[1] = True                                                    # a batch row that sees no key at all
    left, right = window
    o = torch.empty(q.shape, dtype=F64)
    lse = torch.empty(q.shape[:3], dtype=F64)
    _, probs = attn_mod._fwd_math(q, k, v, kpm, 0.25, left, right, p, 7, o, lse, save_probs)
    one_block = len(list(attn_mod._math_blocks(45, 50, *attn_mod._effective_band(45, 50, left, right), 2, 4))) == 1
    assert (probs is not None) == (save_probs and one_block)
    if probs is not None and p > 0:              # the sign marks exactly the drops of the Philox mask
        keep = attn_mod._dropout_keep(7, q, 50, 0, 45, *attn_mod._key_range(0, 45, 45, 50, left, right), p)
        assert torch.equal(probs.reshape(keep.shape) > 0, keep & (probs.reshape(keep.shape) != 0))
        assert bool((probs.reshape(keep.shape)[~keep] <= 0).all())
    dq, dk, dv = (torch.empty(t.shape, dtype=F64) for t in (q, k, v))
    attn_mod._bwd_math(do, q, k, v, o, lse, kpm, 0.25, left, right, p, 7, dq, dk, dv, probs=probs)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(qr, kr, vr, window=window, key_padding_mask=kpm, scale=0.25, return_lse=True,
                                       dropout_p=p, seed=7)
    ref.backward(do)
    for got, want, name in ((o, ref, "o"), (lse, ref_lse, "lse"), (dq, qr.grad, "dq"), (dk, kr.grad, "dk"),
                            (dv, vr.grad, "dv")):
        assert_close(got, want, dtype=F64, name=name, scale=100)   # float64 sums of ~50 terms


# ------------------------------------------------------------------------------ torch path: kernel-call variants

@pytest.mark.parametrize("native", [True, False], ids=["native_gqa", "folded_gqa"])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (-1, 5)}, {"window": (6, 3)}], ids=str)
def test_gqa_native_and_folded_torch(torch_path, monkeypatch, native, kw):
    """Grouped-query attention through ATen's own GQA support (newer torch) and through the folded
    fallback (stride-0 k, v heads, key gradients summed here): both against the reference."""
    if native and not attn_mod._native_gqa():
        pytest.skip(f"torch {torch.__version__}: ATen's CPU flash kernels have no grouped-query support")
    monkeypatch.setattr(attn_mod, "_NATIVE_GQA", native)
    for nq, nk in ((70, 90), (90, 70)):
        q, k, v, do, kpm = _inputs(2, 6, 2, nq, nk, 16, pad="random")
        _check(torch_path, q, k, v, do, torch.float32, key_padding_mask=kpm, **kw)
        _check(torch_path, q, k, v, do, torch.float32, **kw)


@pytest.mark.parametrize("nq,nk", [(40, 100), (100, 40), (64, 64), (300, 520)])
@pytest.mark.parametrize("right", [0, 3])
def test_right_bounded_split_with_empty_parts_torch(torch_path, nq, nk, right):
    """Causal / (-1, r) bands run as a plain part (keys every row sees) and a causal part merged by
    log-sum-exp.  Padding that empties a whole part for some rows, or both parts (rows with no key
    at all: zeros, zero gradients), must not leak into the merge."""
    q, k, v, do, _ = _inputs(3, 2, 1, nq, nk, 16)
    s = nk - nq + right
    kpm = torch.zeros(3, nk, dtype=torch.bool)
    kpm[0, :max(s, 0) + 3] = True          # batch 0: the plain part all padded, and the first causal keys
    kpm[1, max(s, 0):] = True              # batch 1: the causal part all padded
    kpm[2, ::2] = True
    out, dq, dk, dv = _check(torch_path, q, k, v, do, torch.float32, window=(-1, right), key_padding_mask=kpm)
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()


# ------------------------------------------------------------------------------ second derivatives

SECOND_ORDER = [
    dict(),                                          # one call of ATen's kernel in the first backward
    dict(causal=True),
    dict(window=(2, 1)),                             # the blocked band
    dict(window=(-1, 1)),                            # right-bounded split
    dict(dropout_p=0.3, seed=5),                     # plain math with the Philox mask
    dict(causal=True, dropout_p=0.2, seed=9),
]


@pytest.mark.parametrize("pad", [None, "random"])
@pytest.mark.parametrize("kw", SECOND_ORDER, ids=str)
def test_double_backward_torch(torch_path, kw, pad):
    """gradgradcheck (float64 finite differences of the first backward): gradient penalties and
    Hessian-vector products through the op; GQA, Nq != Nk, a fully padded batch row."""
    q, k, v, _, kpm = _inputs(2, 2, 1, 5, 6, 16, pad=pad, seed=1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradgradcheck(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, **kw), (q, k, v))


@pytest.mark.parametrize("kw", [dict(left=-1, right=-1, p=0.0), dict(left=2, right=0, p=0.25)], ids=str)
def test_double_backward_custom_op(torch_path, kw):
    """The registered autograd formula (what torch.compile and the Triton path use) is differentiable too."""
    q, k, v, _, kpm = _inputs(1, 2, 2, 4, 6, 16, pad="random", seed=2)
    seed = attn_mod.dropout_seed(11, kw["p"])

    def f(q, k, v):
        return attn_mod._attention_fwd_op(q, k, v, kpm, seed, 0.25, kw["left"], kw["right"], kw["p"])[0]

    assert torch.autograd.gradgradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)))


def _second_order(fn, q, k, v, do, w):
    """d/d(q, k, v) of <w, dq> with dq = d<do, fn(q, k, v)>/dq: one Hessian-vector product."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    (dq,) = torch.autograd.grad(fn(q, k, v), q, do, create_graph=True)
    return torch.autograd.grad((dq * w).sum(), (q, k, v))


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(3, 2), dropout_p=0.2, seed=4)], ids=str)
def test_double_backward_triton(triton_path, kw):
    """The Triton path's first backward with the dense second derivative, in float32, vs the float64 reference."""
    device = triton_path
    q, k, v, do, _ = _inputs(1, 2, 1, 9, 11, 16, seed=3)
    w = torch.randn(q.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    want = _second_order(lambda q, k, v: attention_reference(q, k, v, **kw), q, k, v, do, w)
    f32 = [t.to(device, torch.float32) for t in (q, k, v, do, w)]
    got = _second_order(lambda q, k, v: attention(q, k, v, **kw), *f32)
    for g, r, name in zip(got, want, ("q", "k", "v")):
        assert_close(g, r, dtype=torch.float32, name=name)


@pytest.mark.parametrize("kw", [dict(), dict(window=(1, 2), dropout_p=0.3, seed=2)], ids=str)
def test_third_derivative_torch(torch_path, kw):
    """The second derivative's own backward is differentiable: a third derivative against the reference's."""
    q, k, v, do, _ = _inputs(1, 2, 1, 4, 5, 16, seed=6)

    def third(fn):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (dq,) = torch.autograd.grad(fn(qq, kk, vv), qq, do, create_graph=True)
        (dk,) = torch.autograd.grad(dq.square().sum(), kk, create_graph=True)
        return torch.autograd.grad(dk.sum(), (qq, vv))

    got = third(lambda q, k, v: attention(q, k, v, **kw))
    want = third(lambda q, k, v: attention_reference(q, k, v, **kw))
    for g, r, name in zip(got, want, ("q", "v")):
        assert r.abs().max() > 0
        assert_close(g, r, dtype=F64, name=name)


def test_first_backward_never_builds_dense_scores(torch_path, monkeypatch):
    """Only a backward with create_graph=True reaches the dense second-derivative math."""
    def dense(*args):
        raise AssertionError("dense second-derivative path used by a first-order backward")

    monkeypatch.setattr(attn_mod, "_grads_dense", dense)
    q, k, v, do, kpm = _inputs(2, 2, 1, 7, 9, 16, pad="random")
    for kw in (dict(), dict(window=(2, 3), dropout_p=0.1, seed=1)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        attention(qq, kk, vv, key_padding_mask=kpm, **kw).backward(do)
        o, _ = attn_mod._attention_fwd_op(qq, kk, vv, kpm, None, 0.25, -1, 0, 0.0)
        o.backward(do)
    (dq,) = torch.autograd.grad(attention(qq, kk, vv), qq, do, create_graph=True)   # the fused first backward
    with pytest.raises(AssertionError, match="dense"):
        dq.sum().backward()
