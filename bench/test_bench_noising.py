"""ops.noising (torch path) against the unfused PyTorch expressions on the CPU, same inputs, same run.

On the CPU the fused ops run their torch path, which draws the kernel's Philox noise
(integer rounds in numpy uint64 arrays, Box-Muller in float32): expect it to be slower
than torch.randn here.  The
speed-up is the GPU kernel's (leedl_fast/bench/cases/noising.py)."""
import pytest
import torch

from leedl_fast.diffusion import DDPMSampler, NoiseSchedule
from leedl_fast.ops import noise_prediction_loss, q_sample

SHAPE = (16, 3, 32, 32)
SCHED = NoiseSchedule(1000)
AC = SCHED.alphas_cumprod


def _unfused_q_sample(x0, t):
    eps = torch.randn_like(x0)
    abar = AC[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps, eps


@pytest.mark.parametrize("impl", ["leedl_fast", "unfused"])
def test_q_sample(benchmark, impl):
    benchmark.group = f"q_sample {SHAPE}"
    x0 = torch.randn(SHAPE)
    t = torch.randint(0, 1000, (SHAPE[0],))
    fn = (lambda: q_sample(x0, t, AC, seed=3)) if impl == "leedl_fast" else (lambda: _unfused_q_sample(x0, t))
    x_t, eps = benchmark(fn)
    assert x_t.shape == SHAPE and abs(eps.std().item() - 1) < 0.05


@pytest.mark.parametrize("impl", ["leedl_fast", "unfused"])
def test_noising_loss_fwd_bwd(benchmark, impl):
    benchmark.group = f"q_sample + loss fwd+bwd {SHAPE}"
    x0 = torch.randn(SHAPE)
    t = torch.randint(0, 1000, (SHAPE[0],))
    pred = torch.randn(SHAPE, requires_grad=True)

    def ours():
        q_sample(x0, t, AC, seed=4)
        noise_prediction_loss(pred, x0, t, AC, seed=4).backward()
        pred.grad = None

    def unfused():
        _, eps = _unfused_q_sample(x0, t)
        torch.nn.functional.mse_loss(pred, eps).backward()
        pred.grad = None

    benchmark(ours if impl == "leedl_fast" else unfused)


@pytest.mark.parametrize("impl", ["leedl_fast", "diffusers"])
def test_ddpm_step(benchmark, impl):
    benchmark.group = f"ddpm step {SHAPE}"
    m, x = torch.randn(SHAPE), torch.randn(SHAPE)
    if impl == "leedl_fast":
        sampler = DDPMSampler(SCHED)
        out = benchmark(lambda: sampler.step(m, 500, x, seed=1))
    else:
        diffusers = pytest.importorskip("diffusers")
        ref = diffusers.DDPMScheduler(1000)
        out = benchmark(lambda: ref.step(m, 500, x).prev_sample)
    assert out.shape == SHAPE
