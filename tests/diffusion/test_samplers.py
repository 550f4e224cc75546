"""DDPMSampler / DDIMSampler steps on both paths against diffusers' schedulers (same injected noise) and
the float64 references; timesteps; the full sampling loop's reproducibility."""
import pytest
import torch

from leedl_fast.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule
from leedl_fast.ops.noising import _noise_torch, ddim_step_reference, ddpm_step_reference
from tests.harness import assert_close

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402

SHAPE = (2, 3, 5, 4)


def _check(out, ref_diffusers, ref64, *, amplified):
    # diffusers computes the coefficients in float32 as well; where 1/sqrt(abar_t) (up to ~160 at the
    # noisy end of the chain) multiplies unclipped values, both float32 results carry that much more
    # rounding, so the comparison widens by the same factor there.
    scale = 200 if amplified else 1
    assert_close(out, ref64, dtype=torch.float32, scale=scale, name="vs float64 reference")
    assert_close(out, ref_diffusers.double(), dtype=torch.float32, scale=scale, name="vs diffusers")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type,clip", [("fixed_small", True), ("fixed_large", False)])
def test_ddpm_equals_diffusers(any_path, monkeypatch, schedule, prediction_type, variance_type, clip):
    n_inf = 10
    ours = NoiseSchedule(1000, schedule)
    sampler = DDPMSampler(ours, n_inf, prediction_type=prediction_type, clip_sample=clip, variance_type=variance_type)
    ref = diffusers.DDPMScheduler(1000, beta_schedule={"cosine": "squaredcos_cap_v2"}.get(schedule, schedule),
                                  prediction_type=prediction_type, clip_sample=clip, variance_type=variance_type)
    ref.set_timesteps(n_inf)
    assert torch.equal(sampler.timesteps, ref.timesteps)
    ts = sampler.timesteps.tolist()
    for i in (0, len(ts) // 2, len(ts) - 1):  # noisiest, middle, last (no noise added)
        t = ts[i]
        x, m, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: z)
        expect = ref.step(m, t, x).prev_sample
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        ref64 = ddpm_step_reference(m.double(), t, x.double(), ours.alphas_cumprod.double(), prev_t=prev,
                                    prediction_type=prediction_type, clip_sample=clip, variance_type=variance_type,
                                    noise=z.double())
        out = sampler.step(m.to(any_path), t, x.to(any_path), noise=z.to(any_path))
        _check(out, expect, ref64, amplified=not clip and prediction_type == "epsilon" and t > 800)


def test_ddpm_all_steps_default(any_path, monkeypatch):
    """num_inference_steps=None: every training step, prev_t = t - 1, as diffusers without set_timesteps."""
    ours = NoiseSchedule(20, "linear", beta_start=1e-3, beta_end=0.2)
    sampler = DDPMSampler(ours)
    ref = diffusers.DDPMScheduler(20, beta_start=1e-3, beta_end=0.2)
    assert sampler.timesteps.tolist() == list(range(19, -1, -1)) == ref.timesteps.tolist()
    for t in (19, 7, 0):
        x, m, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, **k: z)
        expect = ref.step(m, t, x).prev_sample
        out = sampler.step(m.to(any_path), t, x.to(any_path), noise=z.to(any_path))
        assert_close(out, expect.double(), dtype=torch.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_equals_diffusers(any_path, prediction_type, eta):
    n_inf = 8
    ours = NoiseSchedule(1000, "scaled_linear", beta_start=0.00085, beta_end=0.012)
    sampler = DDIMSampler(ours, n_inf, eta=eta, prediction_type=prediction_type)
    ref = diffusers.DDIMScheduler(1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type=prediction_type)
    ref.set_timesteps(n_inf)
    assert torch.equal(sampler.timesteps, ref.timesteps)
    ts = sampler.timesteps.tolist()
    for i in (0, len(ts) - 1):
        t = ts[i]
        x, m, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
        expect = ref.step(m, t, x, eta=eta, variance_noise=z).prev_sample
        ref64 = ddim_step_reference(m.double(), t, x.double(), ours.alphas_cumprod.double(), prev_t=t - 1000 // n_inf,
                                    eta=eta, prediction_type=prediction_type, noise=z.double())
        out = sampler.step(m.to(any_path), t, x.to(any_path), noise=z.to(any_path))
        _check(out, expect, ref64, amplified=False)


def test_seeded_step_uses_the_philox_stream(any_path):
    s = NoiseSchedule(1000)
    sampler = DDPMSampler(s, 50, clip_sample=False)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    t = int(sampler.timesteps[10])
    out = sampler.step(m.to(any_path), t, x.to(any_path), seed=31)
    expect = sampler.step(m.to(any_path), t, x.to(any_path), noise=_noise_torch(31, SHAPE, "cpu").to(any_path))
    assert_close(out, expect.double(), dtype=torch.float32, atol=1e-5)


def test_generate_is_reproducible_and_path_independent(monkeypatch):
    s = NoiseSchedule(100, "cosine")
    sampler = DDIMSampler(s, 5, eta=1.0)
    model = lambda x, t: 0.1 * x + 0.01 * t[:, None, None, None].float() / 100  # noqa: E731
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    a = sampler.generate(model, (3, 1, 4, 4), seed=5)
    b = sampler.generate(model, (3, 1, 4, 4), seed=5)
    c = sampler.generate(model, (3, 1, 4, 4), seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "triton")
    d = sampler.generate(model, (3, 1, 4, 4), seed=5)
    assert_close(d, a.double(), dtype=torch.float32, atol=1e-5)


def test_errors():
    s = NoiseSchedule(100)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMSampler(s, 101)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMSampler(s, None)
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMSampler(s, 10, prediction_type="x0")
    with pytest.raises(ValueError, match="variance_type"):
        DDPMSampler(s, variance_type="learned_range")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(s, 10, eta=-1.0)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(s, 10, eta=float("inf"))
    with pytest.raises(ValueError, match="schedule"):
        DDPMSampler(s.alphas_cumprod)
    sampler = DDIMSampler(s, 10)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="not one of"):
        sampler.step(x, 5, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        sampler.step(x[:1], 90, x)
    with pytest.raises(ValueError, match="not one of"):
        sampler.step(x, torch.tensor(90.4), x)          # a float is not a timestep (it was truncated to 90)
    assert torch.equal(sampler.step(x, torch.tensor(90), x), sampler.step(x, 90, x))
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(s, 10, eta=1.5)                      # sigma^2 > 1 - abar_prev: undefined (diffusers: NaN)
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        DDIMSampler(s, 10, set_alpha_to_one="no")
    for bad in (-1.0, float("nan"), float("inf"), "a"):
        with pytest.raises(ValueError, match="clip_sample_range"):
            DDPMSampler(s, 10, clip_sample_range=bad)
    with pytest.raises(ValueError, match="clip_sample"):
        DDIMSampler(s, 10, clip_sample=1)


def test_generate_without_seed_follows_torch_manual_seed(torch_path):
    sampler = DDIMSampler(NoiseSchedule(100), 4, eta=1.0)
    model = lambda x, t: 0.1 * x  # noqa: E731
    torch.manual_seed(3)
    a = sampler.generate(model, (2, 1, 4, 4))
    torch.manual_seed(3)
    b = sampler.generate(model, (2, 1, 4, 4))
    c = sampler.generate(model, (2, 1, 4, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
def test_float64_step_and_gradients(torch_path, sampler_cls):
    """A float64 step is float64-accurate (float64 coefficients), and the step is differentiable: gradients
    with respect to the model output and x_t against autograd through the float64 reference."""
    s = NoiseSchedule(1000, "cosine")
    sampler = DDPMSampler(s, 20, clip_sample=False) if sampler_cls is DDPMSampler else DDIMSampler(s, 20, eta=0.5)
    t = int(sampler.timesteps[0])
    prev = int(sampler.timesteps[1])
    x, m, z = (torch.randn(SHAPE, dtype=torch.float64) for _ in range(3))
    ac = s.alphas_cumprod.double()
    leaves = [v.clone().requires_grad_() for v in (m, x)]
    if sampler_cls is DDPMSampler:
        ref = ddpm_step_reference(*leaves[:1], t, leaves[1], ac, prev_t=prev, clip_sample=False, noise=z)
    else:
        ref = ddim_step_reference(*leaves[:1], t, leaves[1], ac, prev_t=prev, eta=0.5, noise=z)
    ours = [v.clone().requires_grad_() for v in (m, x)]
    out = sampler.step(ours[0], t, ours[1], noise=z)
    assert out.dtype == torch.float64
    assert_close(out, ref.detach(), dtype=torch.float64, scale=10)
    w = torch.randn(SHAPE, dtype=torch.float64)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    for a, b in zip(ours, leaves):
        assert_close(a.grad, b.grad, dtype=torch.float64, scale=10)
