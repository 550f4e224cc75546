"""NoiseSchedule against diffusers' DDPMScheduler tables and the published formulas."""
import math

import pytest
import torch

from leedl_fast.diffusion import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("name", list(NAMES))
@pytest.mark.parametrize("n", [1, 50, 1000])
def test_equals_diffusers(name, n):
    ours = NoiseSchedule(n, name, beta_start=2e-4, beta_end=0.03)
    ref = diffusers.DDPMScheduler(n, beta_start=2e-4, beta_end=0.03, beta_schedule=NAMES[name])
    for attr in ("betas", "alphas", "alphas_cumprod"):
        got = getattr(ours, attr)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert torch.equal(got, getattr(ref, attr)), attr


def test_cosine_formula():
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008."""
    T = 1000
    s = NoiseSchedule(T, "cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expect = torch.tensor([f((t + 1) / T) / f(0) for t in range(T)], dtype=torch.float64)
    # the capped betas (0.999) only touch the very last steps
    assert torch.allclose(s.alphas_cumprod[:-5].double(), expect[:-5], rtol=1e-5, atol=1e-7)
    assert s.betas.max() == torch.tensor(0.999, dtype=torch.float32)  # the cap is reached at the end


def test_linear_formula():
    s = NoiseSchedule(10, "linear", beta_start=0.001, beta_end=0.01)
    betas = torch.linspace(0.001, 0.01, 10, dtype=torch.float64)
    assert torch.allclose(s.betas.double(), betas, rtol=1e-6)
    assert torch.allclose(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-6)


def test_errors_and_to():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(100, "sigmoid")
    alias = NoiseSchedule(100, "squaredcos_cap_v2")      # diffusers' name of the cosine schedule
    assert alias.beta_schedule == "cosine" and torch.equal(alias.betas, NoiseSchedule(100, "cosine").betas)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule(0)
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule(10, "linear", beta_start=0.1, beta_end=0.01)
    for name in ("beta_start", "beta_end"):
        with pytest.raises(ValueError, match=name):
            NoiseSchedule(10, "linear", **{name: "1e-4"})
    s = NoiseSchedule(10).to("cpu")
    assert s.device == torch.device("cpu") and len(s) == 10 and "linear" in repr(s)
