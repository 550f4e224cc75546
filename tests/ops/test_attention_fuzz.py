"""Property-based fuzzing of ``leedl_fast.ops.attention`` against the float64 dense reference.

Hypothesis draws whole problems: batch 1..3, Hkv 1..3 key heads with 1..3 query heads each
(grouped-query attention), Nq and Nk in 1..70 independently, head dim 16/24/40/64, causal or not,
no window or a band (left, right) with each side in {-1, 0, 1, 2, 5, 17, 100}, no key padding or
one of several padding patterns (sparse, dense, suffix lengths, fully padded batch rows, everything
padded), dropout 0 / 0.1 / 0.5 with an explicit seed (the reference regenerates the Philox mask),
the default scale or a random one (negative and zero included), and each of q, k, v and the
output gradient in its own layout (contiguous, (B, N, H, D) storage, a slice of a packed
projection, every other position, a slice of a wider head dim), and on the torch path sometimes block
budgets lowered so that these short sequences run its multi-block code.

Every example checks the output and dq, dk, dv against ``attention_reference`` computed in
float64 with the tolerances of ``tests/harness.py`` (the rule of ``tests/ops/test_attention.py``'s
``_check``: the dtype's (atol, rtol), the gradients twice that in float64), that nothing is NaN,
that a query row with no visible key gives exactly zero output and exactly zero dq, and that a key
no query can see gets exactly zero dk and dv.

Paths: the eager torch path (float32 and float64), the torch path through the registered custom op
(the autograd formula torch.compile and the Triton path use), the Triton kernels (under the
interpreter on a CPU-only machine, float32) and the custom op compiled with
``torch.compile(fullgraph=True, backend="aot_eager")``.

CI runs a small fixed (derandomized) set of examples.  To hunt bugs, raise the counts, e.g.
``LEEDL_FUZZ_EXAMPLES=500 python -m pytest -q tests/ops/test_attention_fuzz.py``: the torch tests
run that many, the Triton test a fifth, the compiled one a twentieth (each count can be set on
its own with ``LEEDL_FUZZ_EXAMPLES_TORCH`` / ``_TRITON`` / ``_COMPILE``); with any of them set the
examples are random rather than derandomized.  ``LEEDL_FUZZ_MAX_LEN`` raises the longest Nq, Nk (70).

Failures the fuzzing found are kept at the end as small regular tests (regressions of fixed bugs).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import NamedTuple, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leedl_fast.ops import attention, attention_reference
from tests.harness import assert_close, fuzz_count, fuzz_settings

attn_mod = importlib.import_module("leedl_fast.ops.attention")  # the package attribute is the function

F64 = torch.float64

# ------------------------------------------------------------------------------ example counts


N_TORCH = fuzz_count("TORCH", 100, 1)
N_OP = fuzz_count("OP", 10, 2)
N_TRITON = fuzz_count("TRITON", 5, 5)
N_COMPILE = fuzz_count("COMPILE", 3, 20)

_SETTINGS = fuzz_settings()


# ------------------------------------------------------------------------------ problems

LAYOUTS = ("contiguous", "bnhd", "packed", "every_other", "d_slice")
PADDINGS = (None, "sparse", "dense", "lengths", "one_row_full", "all")
SIDES = (-1, 0, 1, 2, 5, 17, 100)


class Problem(NamedTuple):
    b: int
    hkv: int
    groups: int
    nq: int
    nk: int
    d: int
    causal: bool
    window: Optional[tuple]
    padding: Optional[str]
    dropout_p: float
    scale: Optional[float]
    layouts: tuple          # of q, k, v, do
    seed: int               # dropout seed and the data's
    tiny_blocks: bool = False   # the torch path's block budgets lowered: many blocks, many kernel calls


# A drawn scale is c / sqrt(D), c in [-3, 3]: scores up to three times the default's (negative ones too).
# The float32 error of the result grows with |scale| |q| |k| (the rounding of the scores is amplified by
# the softmax): at |c| <= 4 it stays within the tolerance table's float32 bound (measured: at most 0.6
# of it over 400 random problems; at |c| = 8 up to twice it), so 3 leaves a margin.  0 and scales that are
# 0 in float32 are drawn too (ATen's causal kernel gave NaN for them: test_nonpositive_scale_causal_torch).
_scale_factors = st.one_of(st.floats(-3.0, 3.0, allow_nan=False), st.sampled_from([0.0, 1e-300, -1e-300]))


MAX_LEN = int(os.environ.get("LEEDL_FUZZ_MAX_LEN", "70"))


@st.composite
def problems(draw, max_len: int = MAX_LEN) -> Problem:
    b, hkv, groups = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    d = draw(st.sampled_from([16, 24, 40, 64]))
    return Problem(
        b=b, hkv=hkv, groups=groups, nq=nq, nk=nk, d=d,
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.tuples(st.sampled_from(SIDES), st.sampled_from(SIDES)))),
        padding=draw(st.sampled_from(PADDINGS)),
        dropout_p=draw(st.sampled_from([0.0, 0.1, 0.5])),
        scale=draw(st.one_of(st.none(), _scale_factors.map(lambda c: c / d ** 0.5))),
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(4)),
        seed=draw(st.integers(0, 2**31)),
        tiny_blocks=draw(st.booleans()),
    )


def _uses_aten_causal_flag(p: Problem) -> bool:
    """Whether the torch path runs ``p`` through ATen's fused kernel with its causal flag: no dropout and a band
    bounded on the right only (causal, window (-1, r)), after bounds wider than the problem are dropped."""
    left, right = attn_mod._effective_band(p.nq, p.nk, *attn_mod.normalize_window(p.causal, p.window))
    return p.dropout_p == 0 and left == -1 and right >= 0


def _tensor(shape, layout: str, g: torch.Generator) -> torch.Tensor:
    """A float64 (B, H, N, D) tensor of normal numbers in ``layout``."""
    b, h, n, d = shape
    if layout == "bnhd":           # (B, N, H, D) storage seen as (B, H, N, D)
        t = torch.randn(b, n, h, d, dtype=F64, generator=g).transpose(1, 2)
    elif layout == "packed":       # one of three heads groups of a packed projection
        t = torch.randn(b, n, 3, h, d, dtype=F64, generator=g)[:, :, 1].transpose(1, 2)
    elif layout == "every_other":  # every other position along N
        t = torch.randn(b, h, 2 * n, d, dtype=F64, generator=g)[:, :, ::2]
    elif layout == "d_slice":      # a slice of wider rows: an odd storage offset and row stride
        t = torch.randn(b, h, n, d + 3, dtype=F64, generator=g)[..., 1:d + 1]
    else:
        t = torch.randn(b, h, n, d, dtype=F64, generator=g)
    assert t.shape == shape
    return t


def _padding(kind: Optional[str], b: int, nk: int, g: torch.Generator) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    if kind == "sparse":
        return torch.rand(b, nk, generator=g) < 0.2
    if kind == "dense":
        return torch.rand(b, nk, generator=g) < 0.8
    if kind == "lengths":          # real padding: keys from a per-batch length on (length 0 included)
        lengths = torch.randint(0, nk + 1, (b, 1), generator=g)
        return torch.arange(nk)[None] >= lengths
    if kind == "one_row_full":     # random padding and one batch row fully padded
        m = torch.rand(b, nk, generator=g) < 0.3
        m[int(torch.randint(0, b, (), generator=g))] = True
        return m
    if kind == "all":
        return torch.ones(b, nk, dtype=torch.bool)
    raise AssertionError(kind)


def _make(p: Problem, dtype: torch.dtype, device: str):
    """(q, k, v, do, kpm) in float64 on the CPU (for the reference) and the op's inputs in ``dtype`` on
    ``device`` in the drawn layouts (converted in place, so the layout survives), plus the keyword
    arguments shared by both."""
    g = torch.Generator().manual_seed(p.seed)
    hq = p.hkv * p.groups
    shapes = [(p.b, hq, p.nq, p.d), (p.b, p.hkv, p.nk, p.d), (p.b, p.hkv, p.nk, p.d), (p.b, hq, p.nq, p.d)]
    ref = [_tensor(s, lay, g) for s, lay in zip(shapes, p.layouts)]
    kpm = _padding(p.padding, p.b, p.nk, g)

    def convert(t):
        # Keep the layout: write the values into a same-strided view of new storage of the dtype.
        out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device) if t.is_contiguous() else None
        if out is None:
            base = t
            while base._base is not None:
                base = base._base
            out = torch.zeros(base.shape, dtype=dtype, device=device).as_strided(t.shape, t.stride(),
                                                                                  t.storage_offset())
        return out.copy_(t)

    ops = [convert(t) for t in ref]
    kw = dict(causal=p.causal, window=p.window, dropout_p=p.dropout_p, scale=p.scale, seed=p.seed)
    return ref, ops, kpm, kw


def _reference(ref, kpm, kw):
    q, k, v, do = ref
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = attention_reference(q, k, v, key_padding_mask=kpm, return_lse=True, **kw)
    o.backward(do)
    return o.detach(), lse, q.grad, k.grad, v.grad


def _unseen_keys(p: Problem, kpm) -> torch.Tensor:
    """(B, Nk) bool: keys that no query row sees (band and padding)."""
    left, right = attn_mod.normalize_window(p.causal, p.window)
    vis = attn_mod._visible_mask(p.nq, p.nk, left, right, kpm, "cpu")      # (B or 1, 1, Nq, Nk)
    return ~vis.any(2)[:, 0].expand(p.b, p.nk)


@contextlib.contextmanager
def _block_budgets(tiny: bool):
    """With ``tiny``, the torch path's plain-math blocks hold a few hundred scores and each interior kernel
    call of a band one block (as test_attention.py's tests that lower them), so that these short sequences
    run the multi-block code."""
    saved = attn_mod._MATH_BLOCK_SCORES, attn_mod._CHUNK_ELEMS
    if tiny:
        attn_mod._MATH_BLOCK_SCORES, attn_mod._CHUNK_ELEMS = 300, 1
    try:
        yield
    finally:
        attn_mod._MATH_BLOCK_SCORES, attn_mod._CHUNK_ELEMS = saved


def _check_problem(p: Problem, run, dtype: torch.dtype, device: str):
    """``run(q, k, v, kpm, kw) -> o`` with q, k, v requiring grad: o and its gradients vs the reference."""
    ref, (q, k, v, do), kpm, kw = _make(p, dtype, device)
    want_o, want_lse, want_dq, want_dk, want_dv = _reference(ref, kpm, kw)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with _block_budgets(p.tiny_blocks):
        o = run(q, k, v, None if kpm is None else kpm.to(device), kw)
        assert o.shape == q.shape and o.dtype == dtype
        o.backward(do)
    got = {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for (name, t), x in zip(got.items(), (q, q, k, v)):
        assert t is not None and t.shape == x.shape and t.dtype == dtype, name
        assert not torch.isnan(t).any(), f"{name} has NaN: {p}"
    # tests/ops/test_attention.py's _check: the dtype's tolerance, gradients twice it outside float32
    gscale = 1.0 if dtype == torch.float32 else 2.0
    assert_close(got["o"], want_o, dtype=dtype, name="o")
    assert_close(got["dq"], want_dq, dtype=dtype, name="dq", scale=gscale)
    # dk and dv sum Nq * G rounded terms: beyond the lengths CI draws (Nq * G <= 210), with LEEDL_FUZZ_MAX_LEN
    # raised, their bound widens with that count (a dk that is exactly 0 for Nk = 1, Nq * G = 348 came out
    # 2.4e-5 in float32 on both torch paths, the cancellation of p * (dp - delta) over the rows).
    kscale = gscale * max(1.0, p.nq * p.groups / 256)
    assert_close(got["dk"], want_dk, dtype=dtype, name="dk", scale=kscale)
    assert_close(got["dv"], want_dv, dtype=dtype, name="dv", scale=kscale)
    # a row with no visible key: exactly zero output and dq
    empty = torch.isneginf(want_lse)
    if empty.any():
        assert (got["o"].cpu()[empty] == 0).all(), "nonzero output on a row with no visible key"
        assert (got["dq"].cpu()[empty] == 0).all(), "nonzero dq on a row with no visible key"
    # a key that no query sees: exactly zero dk and dv
    unseen = _unseen_keys(p, kpm)
    if unseen.any():
        for name in ("dk", "dv"):
            g = got[name].cpu().transpose(1, 2)[unseen]        # (keys, Hkv, D)
            assert (g == 0).all(), f"nonzero {name} for a key no query sees"


# ------------------------------------------------------------------------------ runners

def _eager(q, k, v, kpm, kw):
    return attention(q, k, v, key_padding_mask=kpm, **kw)


def _custom_op(q, k, v, kpm, kw):
    """The registered custom op and its autograd formula, called directly (as torch.compile's graph does)."""
    left, right = attn_mod.normalize_window(kw["causal"], kw["window"])
    scale = kw["scale"] if kw["scale"] is not None else q.shape[-1] ** -0.5
    seed = attn_mod.dropout_seed(kw["seed"], kw["dropout_p"])
    return attn_mod._attention_fwd_op(q, k, v, kpm, seed, float(scale), left, right, float(kw["dropout_p"]))[0]


def _compiled(q, k, v, kpm, kw):
    torch._dynamo.reset()      # one fresh compile per example: no recompile limit across examples

    def f(q, k, v, kpm):
        return attention(q, k, v, key_padding_mask=kpm, **kw)

    return torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, kpm)


# ------------------------------------------------------------------------------ tests

@settings(max_examples=N_TORCH, **_SETTINGS)
@given(problem=problems(), double=st.booleans())
def test_fuzz_torch(torch_path, problem, double):
    """The eager torch path (ATen's fused CPU kernels, blocked bands, plain math with dropout), float32 and
    float64."""
    dtype = F64 if double else torch.float32
    _check_problem(problem, _eager, dtype, torch_path)


@settings(max_examples=N_OP, **_SETTINGS)
@given(problem=problems())
def test_fuzz_custom_op_torch(torch_path, problem):
    """The torch path behind the registered custom op (its layout conforming and autograd formula)."""
    _check_problem(problem, _custom_op, torch.float32, torch_path)


@settings(max_examples=N_TRITON, **_SETTINGS)
@given(problem=problems())
def test_fuzz_triton(triton_path, problem):
    """The Triton kernels (the interpreter on a CPU-only machine), float32."""
    _check_problem(problem, _eager, torch.float32, triton_path)


@settings(max_examples=N_COMPILE, **_SETTINGS)
@given(problem=problems())
def test_fuzz_compiled(torch_path, problem):
    """The op under torch.compile(fullgraph=True, backend="aot_eager"), torch path."""
    _check_problem(problem, _compiled, torch.float32, torch_path)


# ------------------------------------------------------------------------------ failures found by the fuzzing

@pytest.mark.parametrize("op", ["eager", "custom_op"])
@pytest.mark.parametrize("nq,nk,scale,kw", [
    (2, 2, 0.0, dict(causal=True)),                   # one causal call of ATen's kernel
    (2, 2, -0.25, dict(causal=True)),
    (2, 2, 1e-300, dict(causal=True)),                # 0 in float32
    (3, 5, -0.25, dict(causal=True)),                 # Nq < Nk: the plain part and the causal part, merged
    (5, 3, 0.0, dict(causal=True)),                   # Nq > Nk
    (5, 5, -0.1, dict(window=(-1, 1))),
], ids=str)
def test_nonpositive_scale_causal_torch(torch_path, op, nq, nk, scale, kw):
    """A scale <= 0 (or one that is 0 in float32) with a band the torch path runs through ATen's causal flag
    (causal, window=(-1, r)), no dropout: ATen's CPU flash kernel gives NaN rows for is_causal=True and such a
    scale (torch's own SDPA too: the masked -inf times the scale).  The torch path folds the scale into q there
    (_scale_into_q); before, NaN output rows and gradients."""
    p = Problem(b=1, hkv=1, groups=1, nq=nq, nk=nk, d=16, causal=False, window=None, padding=None, dropout_p=0.0,
                scale=scale, layouts=("contiguous",) * 4, seed=0)._replace(**kw)
    _check_problem(p, {"eager": _eager, "custom_op": _custom_op}[op], torch.float32, torch_path)


@pytest.mark.parametrize("scale", [0.0, -0.25])
@pytest.mark.parametrize("kw", [dict(window=(2, 1)), dict(causal=True, dropout_p=0.1)], ids=str)
def test_nonpositive_scale_other_torch_paths(torch_path, scale, kw):
    """The same scales where the bug above does not reach on the torch path: the blocked band, the math blocks."""
    p = Problem(b=2, hkv=1, groups=2, nq=5, nk=7, d=16, causal=False, window=None, padding="sparse", dropout_p=0.0,
                scale=scale, layouts=("contiguous",) * 4, seed=3)._replace(**kw)
    assert not _uses_aten_causal_flag(p)
    _check_problem(p, _eager, torch.float32, torch_path)


@pytest.mark.parametrize("scale", [0.0, -0.25])
def test_nonpositive_scale_causal_triton(triton_path, scale):
    """The Triton path gets the causal band right with these scales."""
    p = Problem(b=2, hkv=1, groups=2, nq=5, nk=7, d=16, causal=True, window=None, padding="sparse", dropout_p=0.0,
                scale=scale, layouts=("contiguous",) * 4, seed=3)
    _check_problem(p, _eager, torch.float32, triton_path)
