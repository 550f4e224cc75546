"""Reverse-process samplers: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021), one fused kernel per step.

They mirror diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` with "leading"
timestep spacing (steps_offset 0): ``timesteps`` are ``arange(n) * (T // n)``
reversed, and ``step(model_output, t, x_t)`` equals the diffusers ``step`` given
the same noise.  The six coefficients of every step (see
``leedl_fast.ops.noising.ddpm_step_coefficients``) are computed once, in float64,
when the sampler is built, so a step is one elementwise kernel and no host work
beyond a table lookup.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch

from .._checks import check_int, check_seed
from ..ops.noising import (PREDICTION_TYPES, VARIANCE_TYPES, _acc, _as_int, _check_clip, _check_eta,
                           ddim_step_coefficients, ddpm_step_coefficients, draw_seed, fused_step)
from .schedule import NoiseSchedule

__all__ = ["DDPMSampler", "DDIMSampler"]


def _leading_timesteps(num_train: int, n: int) -> torch.Tensor:
    ratio = num_train // n
    return (torch.arange(n, dtype=torch.int64) * ratio).flip(0)


class _Sampler:
    """Shared machinery: the coefficient table, per-device copies, the step and the sampling loop."""

    def _build(self, schedule: NoiseSchedule, timesteps: torch.Tensor, rows: list, noise_flags: list,
               clip_sample: bool, clip_sample_range: float) -> None:
        self.schedule = schedule
        self.timesteps = timesteps
        self.clip_sample, self.clip_sample_range = clip_sample, float(clip_sample_range)   # checked by _check_common
        self._clip = self.clip_sample_range if clip_sample else None
        self._index = {int(t): i for i, t in enumerate(timesteps.tolist())}
        self._table64 = torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._add_noise = noise_flags

    def _table(self, x_t: torch.Tensor) -> torch.Tensor:
        """The coefficients on x_t's device in its accumulation dtype (float64 for float64 steps)."""
        key = (x_t.device, _acc(x_t.dtype))
        if key not in self._tables:
            self._tables[key] = self._table64.to(key[1]).to(key[0])
        return self._tables[key]

    def step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, *, noise: torch.Tensor | None = None,
             seed: int | None = None) -> torch.Tensor:
        """x at the previous timestep of ``self.timesteps`` from the model output at ``t`` (one kernel).

        ``noise``: the Gaussian noise to add (x_t's shape), or it is drawn from the
        Philox stream of ``seed`` (from torch's generator when None)."""
        key = _as_int(t)
        if isinstance(key, bool) or not isinstance(key, numbers.Integral) or key not in self._index:
            raise ValueError(f"t={t!r} is not one of this sampler's timesteps")
        i = self._index[key]
        if not isinstance(x_t, torch.Tensor):
            raise ValueError("x_t must be a torch.Tensor")
        return fused_step(model_output, x_t, self._table(x_t)[i], add_noise=self._add_noise[i],
                          clip_range=self._clip, noise=noise, seed=seed)

    @torch.no_grad()
    def generate(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape, *,
                 seed: int | None = None, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """Run the whole chain from x_T ~ N(0, I) of ``shape``: ``model_fn(x, t)`` (t a (B,) int64 tensor)
        returns the model output.  ``seed`` makes the run reproducible (initial noise and every step); None
        draws one from torch's default generator, so ``torch.manual_seed`` makes the run reproducible too."""
        gen = torch.Generator()
        gen.manual_seed(draw_seed() if seed is None else check_seed(seed))
        x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        for t in self.timesteps.tolist():
            tt = torch.full((shape[0],), t, dtype=torch.int64, device=device)
            out = model_fn(x, tt)
            step_seed = int(torch.randint(0, 2**62, (), generator=gen))
            x = self.step(out.to(dtype), t, x, seed=step_seed)
        return x


def _check_common(schedule, prediction_type, n, clip_sample, clip_sample_range):
    _check_clip(clip_sample, clip_sample_range)
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    T = schedule.num_train_timesteps
    check_int("num_inference_steps", n, 1, T, optional=True)


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling (diffusers' DDPMScheduler.step): x0_hat from the model output, optional
    clipping, the posterior mean of q(x_{t'} | x_t, x0_hat) and, for t > 0, noise of variance
    "fixed_small" (the posterior variance) or "fixed_large" (beta_t).  ``num_inference_steps=None``
    walks all T steps."""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int | None = None,
                 prediction_type: str = "epsilon", clip_sample: bool = True, variance_type: str = "fixed_small",
                 clip_sample_range: float = 1.0):
        _check_common(schedule, prediction_type, num_inference_steps, clip_sample, clip_sample_range)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}, got {variance_type!r}")
        T = schedule.num_train_timesteps
        n = T if num_inference_steps is None else num_inference_steps
        self.num_inference_steps = num_inference_steps
        self.prediction_type, self.variance_type = prediction_type, variance_type
        timesteps = _leading_timesteps(T, n)
        ac = schedule.alphas_cumprod.cpu().tolist()
        ts = timesteps.tolist()
        rows, flags = [], []
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            coefs, add = ddpm_step_coefficients(ac[t], ac[prev] if prev >= 0 else 1.0, t, prediction_type,
                                                variance_type)
            rows.append(coefs)
            flags.append(add)
        self._build(schedule, timesteps, rows, flags, clip_sample, clip_sample_range)


class DDIMSampler(_Sampler):
    """Deterministic (eta = 0) or stochastic DDIM steps (diffusers' DDIMScheduler.step with
    set_alpha_to_one=True, use_clipped_model_output=False): x_{t'} = sqrt(abar_t') x0_hat
    + sqrt(1 - abar_t' - s^2) eps_hat + s z, s = eta sqrt((1-abar_t')/(1-abar_t) (1 - abar_t/abar_t'))."""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int, eta: float = 0.0,
                 prediction_type: str = "epsilon", clip_sample: bool = True, clip_sample_range: float = 1.0,
                 set_alpha_to_one: bool = True):
        _check_common(schedule, prediction_type, num_inference_steps, clip_sample, clip_sample_range)
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required for DDIM")
        _check_eta(eta)
        if not isinstance(set_alpha_to_one, bool):
            raise ValueError(f"set_alpha_to_one must be a bool, got {set_alpha_to_one!r}")
        T = schedule.num_train_timesteps
        self.num_inference_steps, self.eta, self.prediction_type = num_inference_steps, float(eta), prediction_type
        timesteps = _leading_timesteps(T, num_inference_steps)
        ac = schedule.alphas_cumprod.cpu().tolist()
        final = 1.0 if set_alpha_to_one else ac[0]
        ratio = T // num_inference_steps
        rows, flags = [], []
        for t in timesteps.tolist():
            prev = t - ratio
            coefs, add = ddim_step_coefficients(ac[t], ac[prev] if prev >= 0 else final, prediction_type, self.eta)
            rows.append(coefs)
            flags.append(add)
        self._build(schedule, timesteps, rows, flags, clip_sample, clip_sample_range)
