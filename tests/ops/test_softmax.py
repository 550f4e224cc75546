"""ops.softmax on both paths against the float64 definition, values and gradients."""
import pytest
import torch

from leedl_fast.ops import softmax, softmax_reference
from tests.harness import assert_close

SHAPES = [((1,), -1), ((3, 1), -1), ((5, 63), -1), ((2, 3, 77), 1), ((4, 257), -1), ((2, 1000), 0), ((7, 2, 5), 0)]


def _dtypes(device_path):
    # bf16 is wrong under the interpreter (TRITON_ON_CPU.md): on a GPU only.
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("shape,dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward(any_path, shape, dim, dtype):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    x_ref = x.double().requires_grad_()
    y_ref = softmax_reference(x_ref, dim)
    y_ref.backward(dy.double())

    xd = x.to(any_path).requires_grad_()
    y = softmax(xd, dim)
    y.backward(dy.to(any_path))
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype=dtype, name="y")
    assert_close(xd.grad, x_ref.grad, dtype=dtype, name="dx")


@pytest.mark.parametrize("n_cols", [16385, 20000])
def test_long_rows_two_pass(any_path, n_cols):
    """Rows longer than MAX_FUSED_COLS take the online two-sweep variant."""
    x = torch.randn(2, n_cols, dtype=torch.float64) * 4
    x[0, -3] = 30.0  # the max sits in the last block
    dy = torch.randn(2, n_cols, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    softmax_reference(x_ref).backward(dy)
    xd = x.float().to(any_path).requires_grad_()
    y = softmax(xd)
    y.backward(dy.float().to(any_path))
    assert_close(y, softmax_reference(x), dtype=torch.float32, name="y")
    assert_close(xd.grad, x_ref.grad, dtype=torch.float32, name="dx")


def test_non_contiguous_and_masking_values(any_path):
    x = torch.randn(6, 40, dtype=torch.float64)[:, ::2].t()  # (20, 6), strided both ways
    x[3, :] = -float("inf")
    x[3, 2] = 0.0  # one finite entry: probability 1
    y = softmax(x.float().to(any_path), dim=0)
    assert_close(y, softmax_reference(x, 0), dtype=torch.float32)
    y1 = softmax(x.float().to(any_path), dim=1)
    assert y1[3, 2].item() == 1.0 and y1[3].sum().item() == 1.0


def test_large_values_do_not_overflow(any_path):
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4]], dtype=torch.float32)
    y = softmax(x.to(any_path))
    assert torch.isfinite(y).all()
    assert_close(y, softmax_reference(x.double()), dtype=torch.float32)


def test_all_inf_row_is_nan_like_torch(any_path):
    x = torch.full((2, 5), -float("inf"))
    x[1] = 0.0
    y = softmax(x.to(any_path)).cpu()
    ref = torch.softmax(x, -1)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))


def test_double_backward_torch_path(torch_path):
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda t: softmax(t, -1), (x,))
    torch.autograd.gradcheck(lambda t: softmax(t, 0), (x,))


def test_errors():
    with pytest.raises(ValueError, match="x must be"):
        softmax([1.0, 2.0])
    with pytest.raises(ValueError, match="x must be"):
        softmax(torch.arange(4))
    with pytest.raises(ValueError, match="dim"):
        softmax(torch.randn(2, 3), dim=2)
    with pytest.raises(ValueError, match="dim"):
        softmax(torch.randn(2, 3), dim=1.0)


def test_empty_and_scalar(any_path):
    assert softmax(torch.empty(0, 5, device=any_path)).shape == (0, 5)
    assert softmax(torch.tensor(3.0, device=any_path)).item() == 1.0


@pytest.mark.parametrize("value", [3.0, float("inf"), float("-inf"), float("nan")])
def test_scalar_as_torch(any_path, value):
    """A 0-d x is a row of one: torch.softmax's value (NaN for infinities and NaN) and a zero gradient."""
    x = torch.tensor(value, device=any_path, requires_grad=True)
    xr = torch.tensor(value, requires_grad=True)
    y, want = softmax(x), torch.softmax(xr, 0)
    assert y.shape == () and torch.equal(torch.isnan(y).cpu(), torch.isnan(want))
    if not torch.isnan(want):
        assert y.item() == want.item()
        y.backward()
        want.backward()
        assert x.grad.item() == xr.grad.item() == 0.0


def test_opcheck(torch_path):
    x = torch.randn(4, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.leedl_fast.softmax.default, (x, 1))
    torch.library.opcheck(torch.ops.leedl_fast.softmax.default, (torch.randn(3, 5, 2), 1))


def test_torch_compile_fullgraph(torch_path):
    def f(x):
        return softmax(x * 2.0, -1).sum(0)

    x = torch.randn(5, 33, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    g = x.grad.clone()
    x.grad = None
    f(x).sum().backward()
    assert_close(out, f(x), dtype=torch.float32)
    assert_close(g, x.grad, dtype=torch.float32)
