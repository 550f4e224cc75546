"""ops.bias_act_dropout on both paths against the float64 definition: values, dx and dbias, the
Philox dropout mask, layouts, determinism, errors, the custom ops (opcheck, torch.compile)."""
import pytest
import torch
import torch.nn.functional as F

from leedl_fast.ops.bias_act import ACTIVATIONS, bias_act_dropout, bias_act_dropout_reference
from leedl_fast.random import dropout_mask, dropout_scale
from tests.harness import assert_close

SHAPES = [(1, 5), (7, 80), (3, 5, 257)]
# (bias, dropout_p): every combination of bias / no bias and dropout / none.
OPTIONS = [(False, 0.0), (True, 0.0), (True, 0.25), (False, 0.4)]
# (63, 1000) spans several row and column tiles, with ragged edges.  Interpreted Philox costs ~1 s a
# call at this size, and the tile indexing does not depend on the activation (each is covered by the
# small shapes), so three cases: dropout with and without bias, and none.
BIG = [("gelu", True, 0.25, torch.float32), ("relu", False, 0.4, torch.float16), ("silu", True, 0.0, torch.float16)]
SEED = 1234567


def _inputs(shape, dtype, with_bias):
    x = (torch.randn(shape, dtype=torch.float64) * 2).to(dtype)
    b = (torch.randn(shape[-1], dtype=torch.float64)).to(dtype) if with_bias else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x, b, dy


def _reference(x, b, dy, activation, p, seed=SEED):
    """Float64 output and autograd gradients of the definition, from the rounded inputs."""
    xr = x.detach().to(torch.float64, copy=True).requires_grad_()
    br = b.detach().to(torch.float64, copy=True).requires_grad_() if b is not None else None
    y = bias_act_dropout_reference(xr, br, activation=activation, dropout_p=p, seed=seed)
    y.backward(dy.double())
    return y.detach(), xr.grad, (br.grad if br is not None else None)


def _run(fn, x, b, dy, device, activation, p, seed=SEED):
    xd = x.to(device, copy=True).requires_grad_()
    bd = b.to(device, copy=True).requires_grad_() if b is not None else None
    y = fn(xd, bd, activation=activation, dropout_p=p, seed=seed)
    y.backward(dy.to(device))
    return y, xd.grad, (bd.grad if bd is not None else None)


def _check(got, ref, dtype, n_rows):
    y, dx, db = got
    y_ref, dx_ref, db_ref = ref
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous()
    assert_close(y, y_ref, dtype=dtype, name="y")
    assert_close(dx, dx_ref, dtype=dtype, name="dx")
    if db_ref is not None:
        assert db.dtype == dtype
        # dbias sums n_rows rounded float32 terms of size ~|dx| before its one final rounding.
        assert_close(db, db_ref, dtype=dtype, name="dbias", scale=max(1.0, n_rows ** 0.5 / 4))


def _forward_backward(device, shape, with_bias, p, activation, dtype):
    x, b, dy = _inputs(shape, dtype, with_bias)
    ref = _reference(x, b, dy, activation, p)
    got = _run(bias_act_dropout, x, b, dy, device, activation, p)
    _check(got, ref, dtype, x.numel() // shape[-1])
    if p > 0:  # the same Philox mask: exactly zero wherever it drops
        dropped = ~dropout_mask(SEED, shape, p)
        y = got[0].cpu()
        assert dropped.any() and torch.equal(y[dropped], torch.zeros_like(y[dropped]))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias,p", OPTIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward(any_path, shape, with_bias, p, activation, dtype):
    _forward_backward(any_path, shape, with_bias, p, activation, dtype)


@pytest.mark.parametrize("activation,with_bias,p,dtype", BIG)
def test_forward_backward_many_tiles(any_path, activation, with_bias, p, dtype):
    _forward_backward(any_path, (63, 1000), with_bias, p, activation, dtype)


@pytest.mark.parametrize("with_bias,p", OPTIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_custom_op_torch_implementation(torch_path, with_bias, p, activation):
    """Eager CPU calls bypass the custom op; its torch forward and hand-written backward checked here."""
    x, b, dy = _inputs((3, 5, 257), torch.float32, with_bias)
    seed = torch.tensor(SEED, dtype=torch.int64) if p > 0 else None

    def op(xd, bd, *, activation, dropout_p, seed):
        return torch.ops.leedl_fast.bias_act_dropout_fwd(xd, bd, seed, activation, dropout_p)

    got = _run(op, x, b, dy, "cpu", activation, p, seed=seed)
    _check(got, _reference(x, b, dy, activation, p), torch.float32, 15)


@pytest.mark.parametrize("activation,fn", [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu),
                                           ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
                                           ("identity", lambda t: t)])
def test_no_dropout_equals_torch_functional(torch_path, activation, fn):
    x = torch.randn(7, 80) * 3
    b = torch.randn(80)
    y = bias_act_dropout(x, b, activation=activation)
    assert torch.equal(y, fn(x + b))
    assert torch.equal(bias_act_dropout(x, activation=activation), fn(x))


def test_identity_does_not_alias_input(any_path):
    x = torch.randn(4, 9, device=any_path)
    y = bias_act_dropout(x, activation="identity")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    y = torch.ops.leedl_fast.bias_act_dropout_fwd(x, None, None, "identity", 0.0)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_non_contiguous_inputs(any_path):
    base = torch.randn(6, 40, 3, dtype=torch.float64)
    x = base[:, ::2, 1].t()                          # (20, 6), strided both ways
    b = torch.randn(12, dtype=torch.float64)[::2]    # (6,), stride 2
    xp = base.permute(2, 0, 1)                       # (3, 6, 40), permuted
    bp = torch.randn(40, dtype=torch.float64)
    xo = torch.randn(5, 37, dtype=torch.float64)[:, 3:33]  # (5, 30) at an odd offset into wider rows
    bo = torch.randn(40, dtype=torch.float64)[1:31]      # (30,) at an odd offset
    for xx, bb in ((x, b), (xp, bp), (xo, bo)):
        dy = torch.randn(xx.shape[-1], dtype=torch.float64).expand(xx.shape)  # stride-0 gradient
        ref = _reference(xx, bb, dy, "gelu", 0.3)
        got = _run(bias_act_dropout, xx.float(), bb.float(), dy.float(), any_path, "gelu", 0.3)
        _check(got, ref, torch.float32, xx.numel() // xx.shape[-1])


def test_dropout_rate_and_scale(any_path):
    x = torch.ones(63, 1000, device=any_path)
    p = 0.3
    y = bias_act_dropout(x, activation="identity", dropout_p=p, seed=99)
    dropped = (y == 0).float().mean().item()
    # 63000 Bernoulli(p) draws: standard deviation 0.0018.
    assert abs(dropped - p) < 0.01
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, dropout_scale(p)))


def test_determinism_and_seeds(any_path):
    x = torch.randn(7, 80, device=any_path)
    b = torch.randn(80, device=any_path)
    y1 = bias_act_dropout(x, b, activation="silu", dropout_p=0.5, seed=5)
    y2 = bias_act_dropout(x, b, activation="silu", dropout_p=0.5, seed=5)
    y3 = bias_act_dropout(x, b, activation="silu", dropout_p=0.5, seed=6)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1 == 0, y3 == 0)
    # seed=None draws from torch's generator: reproducible under manual_seed, new on each call.
    torch.manual_seed(3)
    z1 = bias_act_dropout(x, b, activation="silu", dropout_p=0.5)
    z2 = bias_act_dropout(x, b, activation="silu", dropout_p=0.5)
    torch.manual_seed(3)
    z3 = bias_act_dropout(x, b, activation="silu", dropout_p=0.5)
    assert torch.equal(z1, z3) and not torch.equal(z1 == 0, z2 == 0)
    # ... and the seed it draws is the one the spec is evaluated with.
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    ref = bias_act_dropout_reference(x.double().cpu(), b.double().cpu(), activation="silu", dropout_p=0.5, seed=seed)
    assert_close(z1, ref, dtype=torch.float32)


def test_same_numbers_on_both_paths(monkeypatch):
    pytest.importorskip("triton")
    x = torch.randn(3, 5, 257)
    b = torch.randn(257)
    out = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("LEEDL_FAST_BACKEND", path)
        xd = x.clone().requires_grad_()
        torch.manual_seed(11)
        # silu is never exactly 0 here, so zeros are the dropout mask's (gelu's tails may round to 0).
        y = bias_act_dropout(xd, b, activation="silu", dropout_p=0.2)
        y.backward(torch.ones_like(y))
        out[path] = (y.detach(), xd.grad)
    assert torch.equal(out["torch"][0] == 0, out["triton"][0] == 0)
    assert_close(out["triton"][0], out["torch"][0], dtype=torch.float32)
    assert_close(out["triton"][1], out["torch"][1], dtype=torch.float32)


def test_empty(any_path):
    for shape in ((0, 5), (4, 0), (2, 0, 3)):
        x = torch.randn(shape, device=any_path, requires_grad=True)
        b = torch.randn(shape[-1], device=any_path, requires_grad=True)
        y = bias_act_dropout(x, b, activation="gelu", dropout_p=0.1, seed=1)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape and torch.equal(b.grad, torch.zeros_like(b))


def test_float64_gradcheck(torch_path):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(3, dtype=torch.int64)
    for act in ("gelu", "gelu_tanh", "silu", "relu"):
        torch.autograd.gradcheck(lambda t, c: bias_act_dropout(t, c, activation=act, dropout_p=0.3, seed=3), (x, b))
        torch.autograd.gradcheck(
            lambda t, c: torch.ops.leedl_fast.bias_act_dropout_fwd(t, c, seed, act, 0.3), (x, b))


def test_errors(monkeypatch, triton_path):
    """Bad arguments raise ValueError naming the argument before any implementation runs."""
    import leedl_fast.kernels.bias_act as K
    import leedl_fast.ops.bias_act as ops

    def fail(*args, **kwargs):
        raise AssertionError("an implementation ran")

    for mod, name in ((K, "bias_act_fwd"), (K, "bias_act_bwd"), (ops, "_bias_act_dropout_torch")):
        monkeypatch.setattr(mod, name, fail)
    x = torch.randn(3, 4, device=triton_path)
    b = torch.randn(4, device=triton_path)
    bad = [
        (dict(x=[1.0, 2.0]), "x must be"),
        (dict(x=torch.arange(4)), "x must be"),
        (dict(x=torch.tensor(1.0)), "x must have at least one dimension"),
        (dict(bias=torch.randn(5)), "bias must have shape"),
        (dict(bias=torch.randn(1, 4)), "bias must have shape"),
        (dict(bias=[0.0] * 4), "bias must be"),
        (dict(bias=b.half()), "bias has dtype"),
        (dict(bias=torch.randn(4, device="meta")), "bias is on"),
        (dict(activation="tanh"), "activation"),
        (dict(activation=None), "activation"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(dropout_p=-0.1), "dropout_p"),
        (dict(dropout_p=True), "dropout_p"),
        (dict(dropout_p="0.1"), "dropout_p"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(seed=1.5), "seed"),
    ]
    for kwargs, match in bad:
        args = dict(x=x, bias=b, activation="relu", dropout_p=0.1, seed=None) | kwargs
        xx = args.pop("x")
        bb = args.pop("bias")
        with pytest.raises(ValueError, match=match):
            bias_act_dropout(xx, bb, **args)
    with pytest.raises(ValueError, match="seed"):
        bias_act_dropout_reference(x, b, dropout_p=0.1)


def test_opcheck(torch_path):
    x = torch.randn(2, 3, 5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    seed = torch.tensor(77, dtype=torch.int64)
    fwd, bwd = torch.ops.leedl_fast.bias_act_dropout_fwd.default, torch.ops.leedl_fast.bias_act_dropout_bwd.default
    torch.library.opcheck(fwd, (x, b, seed, "gelu", 0.2))
    torch.library.opcheck(fwd, (x, None, None, "relu", 0.0))
    dy = torch.randn(2, 3, 5)
    torch.library.opcheck(bwd, (dy, x.detach(), b.detach(), seed, "silu", 0.2))
    torch.library.opcheck(bwd, (dy, x.detach(), None, None, "gelu_tanh", 0.0))


def test_torch_compile_fullgraph(torch_path):
    def f(x, b):
        return bias_act_dropout(x * 2.0, b, activation="gelu", dropout_p=0.2, seed=7).sum(0)

    x = torch.randn(5, 33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, b)
    out.sum().backward()
    gx, gb = x.grad.clone(), b.grad.clone()
    x.grad = b.grad = None
    expected = f(x, b)
    expected.sum().backward()
    assert_close(out, expected, dtype=torch.float32)
    assert_close(gx, x.grad, dtype=torch.float32)
    assert_close(gb, b.grad, dtype=torch.float32)


def test_bench_cases_run_on_cpu(torch_path):
    from leedl_fast.bench.cases import bias_act as bench

    cases = list(bench.cases("cpu", quick=True))
    assert {c.mode for c in cases} == {"fwd", "fwd+bwd"}
    for case in cases:
        assert case.op == "bias_act" and case.bytes > 0 and set(case.peers) == {"torch"}
        case.ours()
        for peer in case.peers.values():
            peer()


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_one_dimensional_input(any_path, activation):
    """x of shape (C,): no leading dims, dbias = dx (separate tensors)."""
    x = torch.randn(17, dtype=torch.float64)
    b = torch.randn(17, dtype=torch.float64)
    dy = torch.randn(17, dtype=torch.float64)
    got = _run(bias_act_dropout, x.float(), b.float(), dy.float(), any_path, activation, 0.3)
    _check(got, _reference(x, b, dy, activation, 0.3), torch.float32, 1)
    dx, db = torch.ops.leedl_fast.bias_act_dropout_bwd(dy.float().to(any_path), x.float().to(any_path),
                                                       b.float().to(any_path), None, activation, 0.0)
    assert torch.equal(dx, db) and dx.data_ptr() != db.data_ptr()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_non_finite_values_as_torch_functional(any_path, activation):
    """NaN and infinities in x and dy give what torch's own activation and its backward give (relu kept
    NaN as 0 in the kernel, and turned an infinite gradient at z < 0 into NaN)."""
    fns = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu,
           "identity": lambda z: z}
    x = torch.tensor([[float("nan"), -2.0, 0.0, 3.0, float("inf"), float("-inf"), -1.0, 2.0]])
    dy = torch.tensor([[1.0, float("inf"), 2.0, float("nan"), 1.0, 1.0, -float("inf"), 0.5]])
    xr = x.clone().requires_grad_()
    want = fns[activation](xr)
    want.backward(dy)
    xa = x.to(any_path).requires_grad_()
    got = bias_act_dropout(xa, activation=activation)
    got.backward(dy.to(any_path))
    for a, b, name in ((got, want, "y"), (xa.grad, xr.grad, "dx")):
        a, b = a.detach().cpu(), b.detach()
        same_nan = torch.equal(torch.isnan(a), torch.isnan(b))
        finite = ~torch.isnan(b)
        assert same_nan and torch.allclose(a[finite], b[finite], rtol=1e-5, atol=1e-6), (name, a, b)
