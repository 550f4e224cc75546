"""ops.softmax (torch path) against torch.softmax on the CPU, same inputs, same run."""
import pytest
import torch

from leedl_fast.ops import softmax

SHAPES = [(512, 1000), (64, 16384)]


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("impl", ["leedl_fast", "torch"])
def test_softmax_fwd(benchmark, impl, m, n):
    benchmark.group = f"softmax fwd {m}x{n}"
    x = torch.randn(m, n)
    fn = softmax if impl == "leedl_fast" else torch.softmax
    y = benchmark(fn, x, -1)
    assert torch.allclose(y, torch.softmax(x, -1), atol=1e-6)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("impl", ["leedl_fast", "torch"])
def test_softmax_fwd_bwd(benchmark, impl, m, n):
    benchmark.group = f"softmax fwd+bwd {m}x{n}"
    x = torch.randn(m, n, requires_grad=True)
    dy = torch.randn(m, n)
    fn = softmax if impl == "leedl_fast" else torch.softmax

    def step():
        fn(x, -1).backward(dy)
        x.grad = None

    benchmark(step)
