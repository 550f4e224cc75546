"""Property-based (hypothesis) fuzz tests of the elementwise ops against independent float64 references.

    softmax                  vs torch.softmax in float64 (any dim, sizes 0 / 1 / odd / past one block,
                             -inf entries, whole -inf rows, +inf and NaN, non-contiguous inputs)
    bias_act_dropout         vs F.relu / F.gelu / F.silu in float64 of x + bias, times the documented Philox
                             mask ``dropout_mask(seed, x.shape, p)`` and ``dropout_scale(p)``
    dropout_add_layer_norm   vs float64 F.layer_norm of residual + dropout(x) (h rounded to x's dtype, as
                             documented), with and without residual / weight / bias, return_residual both ways
    q_sample, ddpm_step, ddim_step
                             vs the published formulas in float64 (the ``*_reference`` functions of
                             leedl_fast.ops.noising), and diffusers' schedulers where installed

Outputs and every gradient (autograd of the op against autograd of the float64 reference, on the same
dtype-rounded input values), NaN exactly where the reference has NaN, in float32 and float16 (float64 too on
the torch path), on the torch path and on the Triton path (the interpreter on a CPU machine: fewer
examples, smaller shapes).  Tolerances are the per-dtype table of tests/harness.py, widened only where the
existing tests of the same op widen them (dbias / dweight sums).

Hypothesis runs derandomized with few examples in CI.  To hunt for bugs locally, raise the counts:

    LEEDL_FUZZ_EXAMPLES=500 python -m pytest -q tests/ops/test_elementwise_fuzz.py

(random, not derandomized, examples; the Triton path gets a fifth of them unless
LEEDL_FUZZ_TRITON_EXAMPLES says otherwise).
"""
from __future__ import annotations

import math
import os
from functools import partial

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from leedl_fast.ops import layer_norm as ln_mod  # noqa: E402
from leedl_fast.ops.bias_act import ACTIVATIONS, bias_act_dropout  # noqa: E402
from leedl_fast.ops.layer_norm import dropout_add_layer_norm  # noqa: E402
from leedl_fast.ops.noising import (PREDICTION_TYPES, ddim_step, ddim_step_reference, ddpm_step,  # noqa: E402
                                    ddpm_step_reference, q_sample)
from leedl_fast.ops.softmax import softmax  # noqa: E402
from leedl_fast.random import dropout_mask, dropout_scale, normal_noise  # noqa: E402
from tests.harness import assert_close  # noqa: E402

# ----------------------------------------------------------------------------- hypothesis settings

_LOCAL = int(os.environ.get("LEEDL_FUZZ_EXAMPLES", "0") or 0)
_LOCAL_TRITON = int(os.environ.get("LEEDL_FUZZ_TRITON_EXAMPLES", "0") or 0) or max(1, _LOCAL // 5)


def _fuzz(path: str, ci_torch: int, ci_triton: int):
    """Settings for one fuzz test on ``path``: derandomized and small in CI, random and large when
    LEEDL_FUZZ_EXAMPLES is set."""
    common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
    if _LOCAL:
        return settings(max_examples=_LOCAL if path == "torch" else _LOCAL_TRITON, derandomize=False, **common)
    return settings(max_examples=ci_torch if path == "torch" else ci_triton, derandomize=True, **common)


def _run_fuzz(path, cases, check, ci_torch: int, ci_triton: int) -> None:
    """``check(case, device)`` on every example ``cases(path name)`` draws, with ``_fuzz``'s settings."""
    name, device = path

    @_fuzz(name, ci_torch, ci_triton)
    @given(cases(name))
    def run(c):
        check(c, device)

    run()


@pytest.fixture(params=["torch", "triton"])
def path(request):
    """(path name, device): the conftest's ``torch_path`` / ``triton_path`` (outputs poisoned with NaN)."""
    device = request.getfixturevalue(f"{request.param}_path")
    return request.param, device


def _dtypes(path_name: str):
    # bf16 is wrong under Triton's interpreter (TRITON_ON_CPU.md); float64 always takes the torch path.
    if path_name == "torch":
        return [torch.float32, torch.float16, torch.float64]
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- tensors with layouts

LAYOUTS = ("contiguous", "permuted", "strided", "offset", "expanded")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _values(shape, g, scale=1.0) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=g) * scale


def _layout(v: torch.Tensor, layout: str, perm=None, expand_dim: int = 0) -> torch.Tensor:
    """A tensor with v's shape, dtype and values (``expanded``: v's values at index 0 of ``expand_dim``,
    repeated with stride 0) in another memory layout."""
    if v.dim() == 0 or layout == "contiguous":
        return v.clone()
    if layout == "permuted":          # the same values stored in another dim order
        perm = list(perm) if perm is not None else list(range(v.dim()))[::-1]
        inv = [perm.index(i) for i in range(v.dim())]
        return v.permute(perm).contiguous().permute(inv)
    if layout == "strided":           # every other element of a buffer twice as large in each dim
        big = torch.full([2 * s + 1 for s in v.shape], float("nan"), dtype=v.dtype)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in v.shape)]
        view.copy_(v)
        return view
    if layout == "offset":            # rows at an odd offset into wider rows
        big = torch.full(v.shape[:-1] + (v.shape[-1] + 3,), float("nan"), dtype=v.dtype)
        view = big[..., 1:1 + v.shape[-1]]
        view.copy_(v)
        return view
    if layout == "expanded":          # stride 0 along expand_dim
        d = expand_dim % v.dim()
        return v.narrow(d, 0, min(1, v.shape[d])).expand(v.shape) if v.shape[d] > 0 else v.clone()
    raise AssertionError(layout)


def _pair(vals: torch.Tensor, dtype, device, layout: str = "contiguous", perm=None, expand_dim: int = 0,
          grad: bool = True):
    """(float64 reference leaf, op input): the op input holds ``vals`` in ``dtype`` on ``device`` in
    ``layout`` (a leaf that requires grad, its strides kept); the reference leaf holds the same values
    (``vals`` must already be representable in ``dtype``) in float64, contiguous."""
    ref = _layout(vals, layout, perm, expand_dim).to(torch.float64).contiguous().requires_grad_()
    ours = _layout(vals.to(device=device, dtype=dtype), layout, perm, expand_dim).detach()
    return ref, (ours.requires_grad_() if grad else ours)


def _rounded(v: torch.Tensor, dtype) -> torch.Tensor:
    """v's values rounded to dtype, as float64."""
    return v.to(dtype).to(torch.float64)


layouts = st.sampled_from(LAYOUTS)
seeds32 = st.integers(0, 2**32 - 1)
philox_seeds = st.one_of(st.integers(0, 2**16), st.integers(0, 2**63 - 1))
dropout_ps = st.one_of(st.just(0.0), st.floats(1e-6, 0.95), st.sampled_from([0.1, 0.5, 2.0**-17, 0.9999]))
col_sizes = st.one_of(st.integers(1, 20), st.sampled_from([16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 257]))


def _bounded_dims(draw, n_dims: int, max_product: int, allow_zero: bool):
    dims = []
    for _ in range(n_dims):
        room = max(1, max_product // max(1, math.prod(dims)))
        lo = 0 if allow_zero and draw(st.integers(0, 9)) == 0 else 1
        dims.append(draw(st.integers(lo, max(lo, min(room, 9)))))
    return dims


# ============================================================================= softmax

@st.composite
def softmax_cases(draw, path_name):
    triton = path_name == "triton"
    ndim = draw(st.integers(0, 4))
    dim = draw(st.integers(-max(ndim, 1), max(ndim, 1) - 1))
    if ndim == 0:
        shape = []
    else:
        d = dim % ndim
        n = draw(st.one_of(col_sizes, st.sampled_from([0, 1000, 1025])) if not triton else col_sizes)
        others = _bounded_dims(draw, ndim - 1, 48 if triton else 256, allow_zero=True)
        if draw(st.integers(0, 19)) == 0 and ndim >= 1:   # a long row: the Triton path's two-sweep variant
            n, others = 16385 + draw(st.integers(0, 100)), [1] * (ndim - 1)
        shape = others[:d] + [n] + others[d:]
    return dict(
        shape=tuple(shape), dim=dim, dtype=draw(st.sampled_from(_dtypes(path_name))),
        scale=draw(st.sampled_from([1e-3, 1.0, 3.0, 30.0, 1000.0])),
        inf=draw(st.sampled_from(["none", "some", "rows", "one_finite", "nonfinite"])),
        layout=draw(layouts), perm=draw(st.permutations(range(max(ndim, 1)))),
        expand_dim=draw(st.integers(0, 3)), dy_layout=draw(st.sampled_from(["contiguous", "expanded", "permuted"])),
        seed=draw(seeds32), custom_op=draw(st.booleans()) if not triton else False,
    )


def _softmax_values(c):
    g = _gen(c["seed"])
    shape, dim = c["shape"], c["dim"]
    x = _values(shape, g, c["scale"])
    if len(shape) and x.numel():
        moved = x.movedim(dim % len(shape), -1)          # a view: the rows along dim, last
        r = torch.rand(moved.shape, generator=g)
        if c["inf"] == "some":
            moved[r < 0.3] = -float("inf")
        elif c["inf"] == "rows":                          # whole rows of -inf: NaN, as torch.softmax
            moved[torch.rand(moved.shape[:-1], generator=g) < 0.4] = -float("inf")
        elif c["inf"] == "one_finite":                    # -inf but for one entry: probability exactly 1
            moved[...] = -float("inf")
            moved[..., int(torch.randint(0, moved.shape[-1], (), generator=g))] = 0.5
        elif c["inf"] == "nonfinite":                     # +inf and NaN make their rows NaN (torch.softmax)
            moved[r < 0.05] = float("inf")
            moved[(r >= 0.05) & (r < 0.1)] = float("nan")
            moved[(r >= 0.1) & (r < 0.3)] = -float("inf")
    elif len(shape) == 0 and c["inf"] in ("rows", "nonfinite"):
        x.fill_(float("nan") if c["inf"] == "nonfinite" else -float("inf"))
    return _rounded(x, c["dtype"]), _rounded(_values(shape, g), c["dtype"])


def _check_softmax(c, device):
    note(repr(c))
    dtype, dim = c["dtype"], c["dim"]
    xv, dyv = _softmax_values(c)
    xr, xd = _pair(xv, dtype, device, c["layout"], c["perm"], c["expand_dim"])
    dyr, dyd = _pair(dyv, dtype, device, c["dy_layout"], c["perm"][::-1], 0, grad=False)
    y_ref = torch.softmax(xr, dim)
    if y_ref.numel():
        y_ref.backward(dyr)
    dx_ref = xr.grad if xr.grad is not None else torch.zeros_like(xr)

    if c["custom_op"] and xd.dim():
        y = torch.ops.leedl_fast.softmax(xd, dim % xd.dim())
    else:
        y = softmax(xd, dim)
    assert y.dtype == dtype and y.shape == xv.shape
    assert_close(y, y_ref, dtype=dtype, name="y")
    if y.numel():
        y.backward(dyd)
        assert_close(xd.grad, dx_ref, dtype=dtype, name="dx")


def test_softmax_fuzz(path):
    _run_fuzz(path, softmax_cases, _check_softmax, 60, 10)


# ============================================================================= bias + activation + dropout

_ACT64 = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu,
    "identity": lambda z: z,
}


@st.composite
def bias_act_cases(draw, path_name):
    triton = path_name == "triton"
    lead = _bounded_dims(draw, draw(st.integers(0, 3)), 40 if triton else 200, allow_zero=True)
    c_ = draw(st.one_of(col_sizes, st.just(0)) if not triton else col_sizes)
    p = draw(dropout_ps)
    return dict(
        shape=tuple(lead) + (c_,), dtype=draw(st.sampled_from(_dtypes(path_name))),
        activation=draw(st.sampled_from(ACTIVATIONS)), bias=draw(st.booleans()), p=p,
        philox_seed=draw(philox_seeds), scale=draw(st.sampled_from([0.01, 1.0, 3.0, 30.0])),
        layout=draw(layouts), perm=draw(st.permutations(range(len(lead) + 1))),
        expand_dim=draw(st.integers(0, 3)), bias_layout=draw(st.sampled_from(["contiguous", "strided", "offset"])),
        dy_layout=draw(st.sampled_from(["contiguous", "expanded", "permuted"])),
        seed=draw(seeds32), custom_op=draw(st.booleans()) if not triton else False,
    )


def _check_bias_act(c, device):
    note(repr(c))
    g = _gen(c["seed"])
    dtype, shape, p, act, seed = c["dtype"], c["shape"], c["p"], c["activation"], c["philox_seed"]
    xr, xd = _pair(_rounded(_values(shape, g, c["scale"]), dtype), dtype, device, c["layout"], c["perm"],
                   c["expand_dim"])
    br, bd = _pair(_rounded(_values(shape[-1:], g), dtype), dtype, device, c["bias_layout"]) if c["bias"] \
        else (None, None)
    dyr, dyd = _pair(_rounded(_values(shape, g), dtype), dtype, device, c["dy_layout"], c["perm"][::-1], 0,
                     grad=False)

    # Reference: float64 act(x + bias) * mask * scale, torch's own float64 activations and autograd.
    a = _ACT64[act](xr if br is None else xr + br)
    keep = dropout_mask(seed, shape, p) if p > 0 else torch.ones(shape, dtype=torch.bool)
    y_ref = torch.where(keep, a * dropout_scale(p), torch.zeros((), dtype=torch.float64)) if p > 0 else a
    if y_ref.numel():
        y_ref.backward(dyr)

    if c["custom_op"]:
        seed_t = torch.tensor(seed, dtype=torch.int64) if p > 0 else None
        y = torch.ops.leedl_fast.bias_act_dropout_fwd(xd, bd, seed_t, act, float(p))
    else:
        y = bias_act_dropout(xd, bd, activation=act, dropout_p=p, seed=seed)
    assert y.dtype == dtype and y.shape == shape and y.is_contiguous()
    assert_close(y, y_ref, dtype=dtype, name="y")
    if p > 0:   # dropped elements are exactly zero (the documented mask), forward and backward
        assert torch.all(y.detach().cpu()[~keep] == 0)
    if not y.numel():
        return
    y.backward(dyd)
    dx_ref = xr.grad if xr.grad is not None else torch.zeros_like(xr)
    assert_close(xd.grad, dx_ref, dtype=dtype, name="dx")
    if p > 0:
        assert torch.all(xd.grad.cpu()[~keep] == 0)
    if br is not None:
        n_rows = xr.numel() // max(shape[-1], 1)
        # dbias sums n_rows rounded float32 terms of size ~|dx| before its one final rounding (as test_bias_act).
        db_ref = br.grad if br.grad is not None else torch.zeros_like(br)
        assert_close(bd.grad, db_ref, dtype=dtype, name="dbias", scale=max(1.0, n_rows ** 0.5 / 4))


def test_bias_act_dropout_fuzz(path):
    _run_fuzz(path, bias_act_cases, _check_bias_act, 80, 12)


# ============================================================================= dropout + residual + layer norm

@st.composite
def layer_norm_cases(draw, path_name):
    triton = path_name == "triton"
    lead = _bounded_dims(draw, draw(st.integers(0, 3)), 24 if triton else 128, allow_zero=True)
    c_ = draw(st.one_of(col_sizes, st.sampled_from([1000, 1025])) if not triton else col_sizes)
    # Zero-variance rows only with integer values (exact sums): for other constant rows y = (h - mean) *
    # rsqrt(eps) turns a one-ulp error of an fp32 mean into ~300 ulp (torch's own CPU backward gives dweight
    # ~1e-4 where it is 0), beyond the fp32 tolerance.  C = 1 rows are constant.
    # On the torch path the public function's gradients are torch's own F.layer_norm autograd, whose CPU
    # backward is not exact on zero-variance rows (dx ~1e-4 for C = 1 at eps = 1e-5 where it is 0, dweight
    # ~1e-3 at eps = 1e-6): those rows go through the library's custom op (its own backward) there.
    custom_op = draw(st.booleans()) if not triton else False
    # Rows of 2 are constant too: for C = 2 the exact dx is rstd * O(eps / var) (the two terms of the backward
    # cancel), so with random values a row of small spread (std ~0.02, rstd ~45) has fp32 errors ~1e-4 in dx
    # on every implementation (torch's F.layer_norm in fp32 included): beyond the fp32 tolerance.
    rows = draw(st.sampled_from(["random", "random", "random", "constant", "shifted"])) if c_ > 2 else "constant"
    if rows == "constant" and not triton:
        custom_op = True
    p = draw(dropout_ps)
    # eps = 0 only where no row can have zero variance (dropout may zero a whole row: y is NaN there, and
    # the Triton backward's dweight is then NaN even when y is unused; see the report of these tests)
    eps = draw(st.sampled_from([1e-5, 1e-5, 1e-6, 1e-3, 0.1] + ([0.0] if rows == "random" and p == 0 else [])))
    return dict(
        shape=tuple(lead) + (c_,), dtype=draw(st.sampled_from(_dtypes(path_name))),
        residual=draw(st.booleans()), weight=draw(st.booleans()), bias=draw(st.booleans()),
        p=p, philox_seed=draw(philox_seeds), eps=eps, rows=rows,
        return_residual=draw(st.booleans()), use_y=draw(st.sampled_from([True, True, False])),
        layout=draw(layouts), perm=draw(st.permutations(range(len(lead) + 1))), expand_dim=draw(st.integers(0, 3)),
        param_layout=draw(st.sampled_from(["contiguous", "strided", "offset"])),
        grad=draw(st.sampled_from([True, True, True, False])), seed=draw(seeds32), custom_op=custom_op,
    )


def _check_layer_norm(c, device):
    note(repr(c))
    g = _gen(c["seed"])
    dtype, shape, p, seed, eps = c["dtype"], c["shape"], c["p"], c["philox_seed"], c["eps"]
    n_cols = shape[-1]
    x = _values(shape, g)
    if c["rows"] == "constant":     # zero variance: y = bias (integers, so that every sum is exact)
        x = torch.randint(-3, 4, shape[:-1] + (1,), generator=g).double().expand(shape).clone()
        p = 0.0
    elif c["rows"] == "shifted":    # a mean far from 0 (small relative to the spread in x's dtype)
        x = x + 4.0
    r = _values(shape, g) if c["residual"] else None
    if c["rows"] == "constant" and r is not None:
        r = torch.randint(-3, 4, shape[:-1] + (1,), generator=g).double().expand(shape).clone()
    w = 1 + 0.3 * _values((n_cols,), g) if c["weight"] else None
    b = 0.3 * _values((n_cols,), g) if c["bias"] else None
    dy = _rounded(_values(shape, g), dtype)
    dh = _rounded(_values(shape, g), dtype)
    # stride 0 along a leading dim only (repeated rows; a stride-0 last dim makes constant rows, see above)
    layout = c["layout"] if c["layout"] != "expanded" or len(shape) > 1 else "contiguous"
    lead = max(len(shape) - 1, 1)
    xr, xd = _pair(_rounded(x, dtype), dtype, device, layout, c["perm"], c["expand_dim"] % lead, grad=c["grad"])
    rr, rd = _pair(_rounded(r, dtype), dtype, device, layout, c["perm"][::-1], (c["expand_dim"] + 1) % lead,
                   grad=c["grad"]) if r is not None else (None, None)
    wr, wd = _pair(_rounded(w, dtype), dtype, device, c["param_layout"], grad=c["grad"]) if w is not None \
        else (None, None)
    br, bd = _pair(_rounded(b, dtype), dtype, device, c["param_layout"], grad=c["grad"]) if b is not None \
        else (None, None)
    leaves, ins = [xr, rr, wr, br], [xd, rd, wd, bd]

    # Reference: float64 layer norm of h = residual + x * keep * scale, h rounded to x's dtype (documented:
    # "y is the layer norm of that rounded h"); the rounding passes gradients straight through.
    keep = dropout_mask(seed, shape, p) if p > 0 else None
    hx = torch.where(keep, xr * dropout_scale(p), torch.zeros((), dtype=torch.float64)) if p > 0 else xr
    h_ref = hx + rr if rr is not None else hx
    h_round = h_ref + (h_ref.detach().to(dtype).double() - h_ref.detach())
    y_ref = F.layer_norm(h_round, (n_cols,), wr, br, eps)

    kw = dict(eps=eps, dropout_p=p, seed=seed if p > 0 else None, return_residual=c["return_residual"])
    with torch.set_grad_enabled(c["grad"]):
        if c["custom_op"]:
            seed_t = torch.tensor(seed, dtype=torch.int64) if p > 0 else None
            store_h = c["return_residual"] or (c["grad"] and (rr is not None or p > 0))
            y, h, _, _ = ln_mod._fwd_op(*ins, seed_t, float(eps), float(p), store_h)
            out = (y, h) if c["return_residual"] else y
        else:
            out = dropout_add_layer_norm(*ins, **kw)
    y, h = out if c["return_residual"] else (out, None)
    assert y.dtype == dtype and y.shape == shape and y.is_contiguous()
    assert_close(y, y_ref, dtype=dtype, name="y")
    if h is not None:
        assert h.dtype == dtype and h.shape == shape and h.is_contiguous()
        assert_close(h, h_ref, dtype=dtype, name="h")
    if not c["grad"] or not y.numel():
        return
    outs, grads, loss = [], [], 0
    if c["use_y"] or h is None:
        outs.append(y), grads.append(dy.to(device, dtype))
        loss = loss + (y_ref * dy).sum()
    if h is not None:
        outs.append(h), grads.append(dh.to(device, dtype))
        loss = loss + (h_ref * dh).sum()
    loss.backward()
    torch.autograd.backward(outs, grads)
    for name, ours, ref in zip(("dx", "dresidual", "dweight", "dbias"), ins, leaves):
        if ref is None:
            continue
        want = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        got = ours.grad if ours.grad is not None else torch.zeros_like(ours)
        # dweight/dbias sum over every row: a wider bound at half precision (as test_layer_norm).
        scale = 2.0 if name in ("dweight", "dbias") and dtype not in (torch.float32, torch.float64) else 1.0
        assert_close(got, want, dtype=dtype, name=name, scale=scale)
    if p > 0:
        assert torch.all(ins[0].grad.cpu()[~keep] == 0)


def test_dropout_add_layer_norm_fuzz(path):
    _run_fuzz(path, layer_norm_cases, _check_layer_norm, 80, 8)


# ============================================================================= diffusion noising

def _schedule(kind: str, n: int) -> torch.Tensor:
    """alphas_cumprod of the schedules the diffusion code uses (float32, as NoiseSchedule / diffusers)."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    else:  # scaled_linear (Stable Diffusion)
        betas = torch.linspace(0.0085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)[:n].contiguous()


schedules = st.tuples(st.sampled_from(["linear", "scaled_linear"]), st.sampled_from([1, 2, 10, 1000]))


@st.composite
def q_sample_cases(draw, path_name):
    triton = path_name == "triton"
    batch = draw(st.one_of(st.integers(1, 5), st.just(0)))
    per = _bounded_dims(draw, draw(st.integers(0, 3)), 1200 if triton else 3000, allow_zero=False)
    if draw(st.integers(0, 4)) == 0:
        per = [draw(st.sampled_from([1023, 1024, 1025, 2049]))]
    kind, n = draw(schedules)
    return dict(shape=(batch, *per), dtype=draw(st.sampled_from(_dtypes(path_name))), schedule=(kind, n),
                ac_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                t_kind=draw(st.sampled_from(["tensor", "int", "int32", "uint8"])),
                given=draw(st.sampled_from([True, True, False])), philox_seed=draw(philox_seeds),
                layout=draw(layouts), perm=draw(st.permutations(range(len(per) + 1))),
                expand_dim=draw(st.integers(0, 3)), seed=draw(seeds32))


def _check_q_sample(c, device):
    note(repr(c))
    g = _gen(c["seed"])
    dtype, shape = c["dtype"], c["shape"]
    ac = _schedule(*c["schedule"]).to(c["ac_dtype"])
    n = ac.shape[0]
    batch = shape[0]
    if c["t_kind"] == "int":
        t_int = int(torch.randint(0, n, (), generator=g))
        t, t_ref = t_int, torch.full((batch,), t_int, dtype=torch.int64)
    else:
        t_ref = torch.randint(0, n, (batch,), generator=g)
        if batch > 1:
            t_ref[0], t_ref[1] = n - 1, 0      # the ends of the schedule
        if c["t_kind"] == "uint8" and n > 256:
            t_ref = t_ref % 256
        t = t_ref.to({"tensor": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[c["t_kind"]])
    x0r, x0d = _pair(_rounded(_values(shape, g), dtype), dtype, device, c["layout"], c["perm"], c["expand_dim"])
    nr, nd = _pair(_rounded(_values(shape, g), dtype), dtype, device, c["layout"], c["perm"][::-1], 0) \
        if c["given"] else (normal_noise(c["philox_seed"], shape).double(), None)
    w = _rounded(_values(shape, g), dtype)

    abar = ac.double()[t_ref].view((-1,) + (1,) * (len(shape) - 1))
    ref = abar.sqrt() * x0r + (1 - abar).sqrt() * nr        # Ho et al. 2020, eq. 4, in float64
    if ref.numel():
        (ref * w).sum().backward()

    td = t.to(device) if isinstance(t, torch.Tensor) else t
    if nd is not None:
        x_t, eps = q_sample(x0d, td, ac.to(device), nd)
        assert eps is nd
    else:
        x_t, eps = q_sample(x0d, td, ac.to(device), seed=c["philox_seed"])
        assert eps.dtype == dtype and eps.shape == shape
        # the documented stream, in x0's dtype
        assert_close(eps, nr, dtype=dtype, atol=1e-6 if dtype == torch.float32 else None, name="eps")
    assert x_t.dtype == dtype and x_t.shape == shape
    assert_close(x_t, ref, dtype=dtype, name="x_t")
    if not x_t.numel():
        return
    (x_t * w.to(device, dtype)).sum().backward()
    assert_close(x0d.grad, x0r.grad, dtype=dtype, name="dx0")
    if nd is not None:
        assert_close(nd.grad, nr.grad, dtype=dtype, name="dnoise")


def test_q_sample_fuzz(path):
    _run_fuzz(path, q_sample_cases, _check_q_sample, 60, 10)


@st.composite
def step_cases(draw, path_name, kind):
    triton = path_name == "triton"
    dtypes = _dtypes(path_name)
    batch = draw(st.integers(1, 4))
    per = _bounded_dims(draw, draw(st.integers(0, 3)), 1100 if triton else 3000, allow_zero=False)
    if draw(st.integers(0, 5)) == 0:
        per = [draw(st.sampled_from([1023, 1024, 1025]))]
    sched, n = draw(schedules)
    t = draw(st.one_of(st.integers(0, n - 1), st.sampled_from([0, n - 1])))
    prev = draw(st.one_of(st.integers(-1, t - 1), st.just(-1), st.just(t - 1))) if t > 0 else -1
    x_dtype = draw(st.sampled_from(dtypes))
    mixed = draw(st.integers(0, 3)) == 0
    c = dict(shape=(batch, *per), x_dtype=x_dtype,
             m_dtype=draw(st.sampled_from(dtypes)) if mixed else x_dtype,
             z_dtype=draw(st.sampled_from(dtypes)) if mixed else x_dtype,
             schedule=(sched, n), t=t, prev_t=prev, prediction_type=draw(st.sampled_from(PREDICTION_TYPES)),
             clip=draw(st.booleans()), clip_range=draw(st.sampled_from([1.0, 1.0, 0.5, 3.0])),
             given=draw(st.sampled_from([True, True, False])), philox_seed=draw(philox_seeds),
             m_scale=draw(st.sampled_from([1.0, 0.3, 3.0])),
             layout=draw(layouts), perm=draw(st.permutations(range(len(per) + 1))),
             expand_dim=draw(st.integers(0, 3)), t_tensor=draw(st.booleans()), seed=draw(seeds32))
    if kind == "ddpm":
        c.update(variance_type=draw(st.sampled_from(["fixed_small", "fixed_large"])),
                 default_prev=draw(st.booleans()) and prev == t - 1)
    else:
        c.update(eta=draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))),
                 # diffusers' set_alpha_to_one: 1, or alphas_cumprod[0] (a final abar below abar_t makes the
                 # step's variance negative: NaN in the reference and diffusers, not a step anyone takes)
                 final=draw(st.sampled_from(["one", "first"])))
    return c


def _check_step(c, device, kind):
    note(repr(c))
    g = _gen(c["seed"])
    shape, xt, mt, zt = c["shape"], c["x_dtype"], c["m_dtype"], c["z_dtype"]
    ac = _schedule(*c["schedule"])
    xr, xd = _pair(_rounded(_values(shape, g), xt), xt, device, c["layout"], c["perm"], c["expand_dim"])
    mr, md = _pair(_rounded(_values(shape, g, c["m_scale"]), mt), mt, device, c["layout"], c["perm"][::-1],
                   c["expand_dim"] + 1)
    zr, zd = _pair(_rounded(_values(shape, g), zt), zt, device) if c["given"] else \
        (normal_noise(c["philox_seed"], shape).double(), None)
    w = _rounded(_values(shape, g), xt)
    t, prev = c["t"], c["prev_t"]
    kw = dict(prediction_type=c["prediction_type"], clip_sample=c["clip"], clip_sample_range=c["clip_range"])
    if kind == "ddpm":
        kw.update(prev_t=None if c["default_prev"] else prev, variance_type=c["variance_type"])
        op, ref_op, noisy = ddpm_step, ddpm_step_reference, t > 0
    else:
        kw.update(prev_t=prev, eta=c["eta"], final_alpha_cumprod=1.0 if c["final"] == "one" else float(ac[0]))
        op, ref_op, noisy = ddim_step, ddim_step_reference, c["eta"] > 0

    ref = ref_op(mr, t, xr, ac.double(), noise=zr, **kw)
    (ref * w).sum().backward()

    tt = torch.tensor(t) if c["t_tensor"] else t
    out = op(md, tt, xd, ac.to(device), noise=zd, seed=None if zd is not None else c["philox_seed"], **kw)
    assert out.dtype == xt and out.shape == shape
    assert_close(out, ref, dtype=xt, name="x_prev")
    (out * w.to(device, xt)).sum().backward()
    for name, ours, leaf, dt in (("model_output", md, mr, mt), ("x_t", xd, xr, xt), ("noise", zd, zr, zt)):
        if ours is None:
            continue
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        got = ours.grad if ours.grad is not None else torch.zeros(ours.shape, dtype=dt)
        if not noisy and name == "noise":
            assert ours.grad is None or torch.all(ours.grad == 0)
            continue
        # each gradient is a product g * c in float32, rounded to its input's dtype
        assert_close(got, want, dtype=dt if dt != torch.float64 else xt, name=f"d{name}")


def test_ddpm_step_fuzz(path):
    _run_fuzz(path, partial(step_cases, kind="ddpm"), partial(_check_step, kind="ddpm"), 60, 10)


def test_ddim_step_fuzz(path):
    _run_fuzz(path, partial(step_cases, kind="ddim"), partial(_check_step, kind="ddim"), 60, 10)


# ----------------------------------------------------------------------------- diffusers' schedulers

@st.composite
def diffusers_cases(draw, kind):
    sched, n = draw(schedules)
    t = draw(st.one_of(st.integers(0, n - 1), st.sampled_from([0, n - 1])))
    prev = draw(st.one_of(st.integers(-1, t - 1), st.just(-1), st.just(t - 1))) if t > 0 else -1
    c = dict(schedule=(sched, n), t=t, prev_t=prev, prediction_type=draw(st.sampled_from(PREDICTION_TYPES)),
             clip=draw(st.booleans()), clip_range=draw(st.sampled_from([1.0, 0.5, 3.0])),
             shape=(draw(st.integers(1, 3)), draw(st.integers(1, 40))), seed=draw(seeds32))
    if kind == "ddpm":
        c["variance_type"] = draw(st.sampled_from(["fixed_small", "fixed_large"]))
    else:
        c.update(eta=draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))),
                 final=draw(st.sampled_from(["one", "first"])))
    return c


def _check_against_diffusers(c, kind):
    """ddpm_step / ddim_step in float64 (the torch path) against diffusers' DDPMScheduler.step /
    DDIMScheduler.step (use_clipped_model_output=False) given the same noise."""
    import diffusers

    note(repr(c))
    g = _gen(c["seed"])
    ac = _schedule(*c["schedule"]).double()
    x, m, z = (_values(c["shape"], g) for _ in range(3))
    t, prev = c["t"], c["prev_t"]
    cfg = dict(num_train_timesteps=1000, prediction_type=c["prediction_type"], clip_sample=c["clip"],
               clip_sample_range=c["clip_range"])
    if kind == "ddpm":
        s = diffusers.DDPMScheduler(variance_type=c["variance_type"], **cfg)
        s.alphas_cumprod, s.one = ac, torch.tensor(1.0, dtype=torch.float64)
        s.previous_timestep = lambda _t: prev                      # any prev_t (DDPMSampler's spacing)
        gen = torch.Generator().manual_seed(c["seed"])
        noise = torch.randn(c["shape"], generator=torch.Generator().manual_seed(c["seed"]), dtype=torch.float64)
        want = s.step(m, t, x, generator=gen).prev_sample
        got = ddpm_step(m, t, x, ac, prev_t=prev, prediction_type=c["prediction_type"], clip_sample=c["clip"],
                        clip_sample_range=c["clip_range"], variance_type=c["variance_type"], noise=noise)
    else:
        final = 1.0 if c["final"] == "one" else float(ac[0])
        s = diffusers.DDIMScheduler(**cfg)
        s.num_inference_steps = 1000                              # its step goes from `timestep` to timestep - 1
        s.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
        s.alphas_cumprod = torch.stack([ac[prev], ac[t]]) if prev >= 0 else ac[t:t + 1]
        want = s.step(m, 1 if prev >= 0 else 0, x, eta=c["eta"], variance_noise=z).prev_sample
        got = ddim_step(m, t, x, ac, prev_t=prev, eta=c["eta"], prediction_type=c["prediction_type"],
                        clip_sample=c["clip"], clip_sample_range=c["clip_range"], final_alpha_cumprod=final, noise=z)
    # float64 coefficients folded in another order: as test_float64_steps_keep_float64
    assert_close(got, want, dtype=torch.float64, scale=10, name=f"{kind} vs diffusers")


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_steps_match_diffusers_fuzz(torch_path, kind):
    pytest.importorskip("diffusers")

    @_fuzz("torch", 30, 0)
    @given(diffusers_cases(kind))
    def run(c):
        _check_against_diffusers(c, kind)

    run()


# ============================================================================= failures found by the fuzz tests

def test_bias_act_identity_of_empty_input_triton_path(triton_path):
    """bias_act_dropout's custom op returned its input itself for an empty float32/float64 x with activation
    'identity' (the aliasing result was cloned only when x.numel() > 0), which torch.library rejects ('may not
    alias any inputs'): every CUDA call (the interpreter here) and torch.compile raised."""
    x = torch.empty(0, 5, device=triton_path)
    y = bias_act_dropout(x, activation="identity")
    assert y.shape == (0, 5)


def test_bias_act_identity_of_empty_input_custom_op(torch_path):
    """As above, through the custom op on the torch path (what torch.compile runs)."""
    for shape in ((0, 5), (4, 0)):
        y = torch.ops.leedl_fast.bias_act_dropout_fwd(torch.empty(shape), None, None, "identity", 0.0)
        assert y.shape == shape


def test_bias_act_identity_backward_of_empty_input_custom_op(torch_path):
    """The backward custom op returned dy itself as dx for empty float32 inputs with activation 'identity'."""
    dx, _ = torch.ops.leedl_fast.bias_act_dropout_bwd(torch.empty(0, 5), torch.empty(0, 5), None, None,
                                                      "identity", 0.0)
    assert dx.shape == (0, 5)
