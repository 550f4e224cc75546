"""ops.dropout_add_layer_norm on both paths against the float64 definition, values and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from leedl_fast.ops import layer_norm as ln_mod
from leedl_fast.ops.layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference
from leedl_fast.random import dropout_mask, dropout_scale
from tests.harness import assert_close

SEED = 1234567


def _dtypes():
    # bf16 is wrong under the interpreter (TRITON_ON_CPU.md): on a GPU only.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _case(device, shape, dtype, *, residual=True, weight=True, bias=True, p=0.0, return_residual=False,
          seed=SEED, noncontig=False):
    """Run the op and the float64 reference on the same (dtype-representable) values; compare everything."""
    c = shape[-1]
    x = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    r = torch.randn(shape, dtype=torch.float64).to(dtype).double() if residual else None
    # LayerNorm parameters as trained ones look: near 1 and near 0.
    w = (1 + 0.3 * torch.randn(c, dtype=torch.float64)).to(dtype).double() if weight else None
    b = (0.3 * torch.randn(c, dtype=torch.float64)).to(dtype).double() if bias else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    dh = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    kw = dict(eps=1e-5, dropout_p=p, seed=seed if p > 0 else None, return_residual=return_residual)

    ref_in = [t.clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    out = dropout_add_layer_norm_reference(*ref_in, **kw)
    y_ref, h_ref = out if return_residual else (out, None)
    loss = (y_ref * dy).sum() + ((h_ref * dh).sum() if return_residual else 0)
    loss.backward()

    def dev(t):
        if t is None:
            return None
        t = t.to(device, dtype)
        if noncontig and t.dim() >= 2:  # same values, transposed storage
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
            assert not t.is_contiguous()
        return t.requires_grad_()

    ours_in = [dev(t) for t in (x, r, w, b)]
    out = dropout_add_layer_norm(*ours_in, **kw)
    y, h = out if return_residual else (out, None)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    if return_residual:
        assert h.dtype == dtype and h.shape == x.shape
        torch.autograd.backward([y, h], [dy.to(device, dtype), dh.to(device, dtype)])
    else:
        y.backward(dy.to(device, dtype))
    assert_close(y, y_ref, dtype=dtype, name="y")
    if return_residual:
        assert_close(h, h_ref, dtype=dtype, name="h")
    for name, ours, ref in zip(("dx", "dresidual", "dweight", "dbias"), ours_in, ref_in):
        if ref is None:
            continue
        # dweight/dbias sum dy * xhat over every row: rounded terms add up (and the fp16 h that
        # xhat is taken from carries one rounding), so they get a wider bound at half precision.
        scale = 2.0 if name in ("dweight", "dbias") and dtype != torch.float32 else 1.0
        assert_close(ours.grad, ref.grad, dtype=dtype, name=name, scale=scale)


@pytest.mark.parametrize("shape", [(1, 16), (7, 80), (3, 1000), (2, 3, 33), (63, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward_shapes(any_path, shape, dtype):
    """Every option on: residual, weight, bias, dropout and the h output.  (Not dropout on 63 rows:
    tl.rand costs ~40 ms a row under the interpreter; dropout is covered on the other shapes.)"""
    _case(any_path, shape, dtype, p=0.25 if shape[0] < 63 else 0.0, return_residual=True)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("return_residual", [False, True])
def test_options(any_path, residual, affine, p, return_residual):
    _case(any_path, (5, 48), torch.float32, residual=residual, weight=affine in ("weight", "both"),
          bias=affine in ("bias", "both"), p=p, return_residual=return_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_looped_backward(triton_path, monkeypatch, dtype):
    """Rows wider than the backward's block (8192-wide rows on a GPU) sweep it block by block."""
    from leedl_fast.kernels import layer_norm as kern

    monkeypatch.setattr(kern, "BWD_MAX_BLOCK", 32)
    assert kern.launch_config(80, backward=True)["LOOPED"]
    _case(triton_path, (9, 80), dtype, p=0.3, return_residual=True)
    _case(triton_path, (4, 77), dtype, residual=False, bias=False, p=0.0)


def test_noncontiguous_inputs(any_path):
    _case(any_path, (6, 40), torch.float32, p=0.2, return_residual=True, noncontig=True)
    x = torch.randn(40, 6, dtype=torch.float64)[::2].t()  # (6, 20), strided both ways
    y = dropout_add_layer_norm(x.float().to(any_path))
    assert_close(y, dropout_add_layer_norm_reference(x), dtype=torch.float32)
    # Rows at an odd offset into wider rows, affine parameters at odd offsets.
    x, r = (torch.randn(5, 37, dtype=torch.float64)[:, 3:33] for _ in range(2))
    w, b = (torch.randn(40, dtype=torch.float64)[1:31] for _ in range(2))
    y = dropout_add_layer_norm(*(t.float().to(any_path) for t in (x, r, w, b)))
    assert_close(y, dropout_add_layer_norm_reference(x, r, w, b), dtype=torch.float32)


def test_p0_is_layer_norm_of_sum(torch_path):
    """The torch path without dropout is F.layer_norm(residual + x), bit for bit in fp32."""
    x, r = torch.randn(2, 9, 70), torch.randn(2, 9, 70)
    w, b = torch.randn(70), torch.randn(70)
    y, h = dropout_add_layer_norm(x, r, w, b, eps=1e-6, return_residual=True)
    assert torch.equal(h, r + x)
    assert torch.equal(y, F.layer_norm(r + x, (70,), w, b, 1e-6))
    xh, rh = x.half(), r.half()
    yh = dropout_add_layer_norm(xh, rh, w.half(), b.half())
    ref = F.layer_norm((rh + xh).float(), (70,), w.half().float(), b.half().float()).half()
    assert_close(yh, ref.double(), dtype=torch.float16)


def test_dropout_mask_is_philox_and_regenerated(any_path):
    """Dropped elements are where dropout_mask(seed, shape, p) is False; there the input gradient is 0."""
    p, seed = 0.3, 987
    x = torch.randn(3, 2, 150, device=any_path, requires_grad=True)
    y, h = dropout_add_layer_norm(x, dropout_p=p, seed=seed, return_residual=True)
    keep = dropout_mask(seed, x.shape, p)
    assert_close(h, torch.where(keep, x.detach().double().cpu() * dropout_scale(p), 0.0), dtype=torch.float32, name="h")
    y.backward(torch.randn_like(y))
    g = x.grad.cpu()
    assert torch.all(g[~keep] == 0) and torch.all(g[keep] != 0)
    assert abs((~keep).float().mean().item() - p) < 0.06  # 900 draws: ~4 standard deviations


def test_seed_none_draws_from_torch_generator(torch_path):
    x = torch.randn(4, 64)
    torch.manual_seed(3)
    a = dropout_add_layer_norm(x, dropout_p=0.5, return_residual=True)[1]
    torch.manual_seed(3)
    b = dropout_add_layer_norm(x, dropout_p=0.5, return_residual=True)[1]
    c = dropout_add_layer_norm(x, dropout_p=0.5, return_residual=True)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    seeded = [dropout_add_layer_norm(x, dropout_p=0.5, seed=s, return_residual=True)[1] for s in (1, 2)]
    assert not torch.equal(*seeded)


def test_deterministic(any_path):
    """Two runs give the same bits: outputs and every gradient (dweight/dbias included)."""
    def run():
        torch.manual_seed(5)
        x, r = (torch.randn(9, 96, device=any_path, requires_grad=True) for _ in range(2))
        w = torch.randn(96, device=any_path, requires_grad=True)
        b = torch.randn(96, device=any_path, requires_grad=True)
        y, h = dropout_add_layer_norm(x, r, w, b, dropout_p=0.1, seed=11, return_residual=True)
        (y.square().sum() + h.sum()).backward()
        return [y, h, x.grad, r.grad, w.grad, b.grad]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_only_h_used(any_path):
    """return_residual=True with y unused: the gradient reaches x and residual through h only."""
    x = torch.randn(5, 24, device=any_path, requires_grad=True)
    r = torch.randn(5, 24, device=any_path, requires_grad=True)
    _, h = dropout_add_layer_norm(x, r, torch.ones(24, device=any_path), dropout_p=0.2, seed=4,
                                  return_residual=True)
    h.sum().backward()
    keep = dropout_mask(4, x.shape, 0.2)
    assert_close(r.grad, torch.ones(5, 24, dtype=torch.float64), dtype=torch.float32, name="dresidual")
    assert_close(x.grad, keep.double() * dropout_scale(0.2), dtype=torch.float32, name="dx")


def test_no_grad_skips_h(triton_path):
    """Without autograd the residual sum is not written (the kernel writes y only); values unchanged."""
    x, r = torch.randn(6, 32, device=triton_path), torch.randn(6, 32, device=triton_path)
    with torch.no_grad():
        y = dropout_add_layer_norm(x, r, dropout_p=0.2, seed=8)
    ref = dropout_add_layer_norm_reference(x.double(), r.double(), dropout_p=0.2, seed=8)
    assert_close(y, ref, dtype=torch.float32)


def test_empty_rows(any_path):
    x = torch.empty(0, 5, 16, device=any_path).normal_().requires_grad_()
    w = torch.ones(16, device=any_path, requires_grad=True)
    y = dropout_add_layer_norm(x, None, w, dropout_p=0.1, seed=1)
    assert y.shape == (0, 5, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(16, device=any_path))


def test_long_rows_torch_path(torch_path):
    x, r = torch.randn(2, 9000, dtype=torch.float64), torch.randn(2, 9000, dtype=torch.float64)
    y = dropout_add_layer_norm(x.float(), r.float(), dropout_p=0.1, seed=2)
    assert_close(y, dropout_add_layer_norm_reference(x, r, dropout_p=0.1, seed=2), dtype=torch.float32)


def test_float64_gradcheck_through_custom_op(torch_path):
    """The custom op's hand-written torch backward, checked numerically (float64)."""
    def f(x, r, w, b):
        y, h, _, _ = ln_mod._fwd_op(x, r, w, b, torch.tensor(77), 1e-5, 0.3, True)
        return y, h

    args = [torch.randn(3, 11, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args += [torch.randn(11, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    torch.autograd.gradcheck(f, args)


def test_errors(any_path):
    x = torch.randn(4, 8, device=any_path)
    bad = [
        (dict(x=[1.0]), "x must be"),
        (dict(x=torch.arange(8)), "x must be"),
        (dict(x=torch.randn(4, 0)), "x must have a non-empty last dim"),
        (dict(residual=torch.randn(4, 9)), "residual must have"),
        (dict(residual=torch.randn(4, 8, dtype=torch.float64)), "residual has dtype"),
        (dict(weight=torch.randn(9)), "weight must have shape"),
        (dict(bias=torch.randn(8, 1)), "bias must have shape"),
        (dict(weight=torch.randn(8).half()), "weight has dtype"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(dropout_p=-0.1), "dropout_p"),
        (dict(dropout_p=True), "dropout_p"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(return_residual=1), "return_residual"),
    ]
    for kwargs, msg in bad:
        args = {"x": x, **kwargs}
        xx = args.pop("x")
        with pytest.raises(ValueError, match=msg):
            dropout_add_layer_norm(xx, **args)
    with pytest.raises(ValueError, match="residual is on"):
        dropout_add_layer_norm(torch.randn(2, 4), torch.randn(2, 4, device="meta"))


def test_row_too_long_for_triton(triton_path):
    with pytest.raises(ValueError, match="last dim must be <= 8192"):
        dropout_add_layer_norm(torch.randn(1, 8193, device=triton_path))
    assert ln_mod.MAX_COLS == __import__("leedl_fast.kernels.layer_norm", fromlist=["MAX_COLS"]).MAX_COLS


def test_opcheck(torch_path):
    x, r = torch.randn(4, 3, 9, requires_grad=True), torch.randn(4, 3, 9, requires_grad=True)
    w, b = torch.randn(9, requires_grad=True), torch.randn(9, requires_grad=True)
    fwd = torch.ops.leedl_fast.dropout_add_layer_norm_fwd.default
    torch.library.opcheck(fwd, (x, r, w, b, torch.tensor(5), 1e-5, 0.2, True))
    torch.library.opcheck(fwd, (x, None, None, None, None, 1e-5, 0.0, False))
    y, h, mean, rstd = fwd(x, r, w, b, torch.tensor(5), 1e-5, 0.2, True)
    bwd = torch.ops.leedl_fast.dropout_add_layer_norm_bwd.default
    dy = torch.randn_like(y)
    torch.library.opcheck(bwd, (dy, torch.randn_like(h), h.detach(), w.detach(), mean, rstd, torch.tensor(5), 0.2,
                                True, True))
    torch.library.opcheck(bwd, (dy, None, x.detach(), None, mean, rstd, None, 0.0, False, False))


def test_torch_compile_fullgraph(torch_path):
    def f(x, r, w, b):
        y, h = dropout_add_layer_norm(x * 2.0, r, w, b, dropout_p=0.2, seed=9, return_residual=True)
        return y.sum(0) + h.mean(0)

    x, r = torch.randn(5, 33, requires_grad=True), torch.randn(5, 33, requires_grad=True)
    w, b = torch.randn(33, requires_grad=True), torch.randn(33, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w, b)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, r, w, b)]
    for t in (x, r, w, b):
        t.grad = None
    ref = f(x, r, w, b)  # eager: torch's own autograd
    ref.square().sum().backward()
    assert_close(out, ref, dtype=torch.float32)
    for name, g, t in zip(("dx", "dresidual", "dweight", "dbias"), grads, (x, r, w, b)):
        assert_close(g, t.grad, dtype=torch.float32, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_no_grad_gives_the_same_numbers(any_path, dtype):
    """y is the layer norm of h rounded to x's dtype whether or not h is kept for a backward: a large
    residual and small x make the rounding visible in float16 (h's spacing is 0.5 near 1000)."""
    g = torch.Generator().manual_seed(0)
    r = (1000 + torch.arange(16, dtype=torch.float32)).repeat(3, 1).to(dtype).to(any_path)
    x = (torch.rand(3, 16, generator=g) * 0.5).to(dtype).to(any_path)
    with torch.no_grad():
        y_nograd = dropout_add_layer_norm(x, r)
    y_grad = dropout_add_layer_norm(x.clone().requires_grad_(), r).detach()
    assert torch.equal(y_nograd, y_grad)
    h = (x.float() + r.float()).to(dtype)
    assert_close(y_nograd, F.layer_norm(h.double(), (16,)), dtype=dtype)


def test_returned_residual_is_never_x(torch_path):
    """Without residual and dropout h equals x; it is still a contiguous copy (updating h in place as the next
    residual must leave x alone)."""
    x = torch.randn(8, 6).t()                                    # (6, 8), non-contiguous
    _, h = dropout_add_layer_norm(x, return_residual=True)
    assert torch.equal(h, x) and h.is_contiguous() and h.data_ptr() != x.data_ptr()
    h.add_(1.0)
    assert not torch.equal(h, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_backward_without_dropout(torch_path, dtype):
    """dx and dresidual are equal without dropout; the custom op returns them as two tensors (a compiled
    backward refused aliased outputs)."""
    x, r = (torch.randn(4, 12, dtype=dtype, requires_grad=True) for _ in range(2))
    f = torch.compile(lambda x, r: dropout_add_layer_norm(x, r), fullgraph=True, backend="aot_eager")
    w = torch.randn(4, 12, dtype=dtype)
    (f(x, r) * w).sum().backward()
    xr, rr = (t.detach().clone().requires_grad_() for t in (x, r))
    (F.layer_norm(xr + rr, (12,)) * w).sum().backward()
    assert_close(x.grad, xr.grad, dtype=dtype)
    assert_close(r.grad, rr.grad, dtype=dtype)
