"""Noise schedules: beta_t, alpha_t = 1 - beta_t and abar_t = prod_{s<=t} alpha_s.

Mirrors diffusers' ``DDPMScheduler`` tables (same float32 values):

* ``"linear"``: betas evenly spaced from beta_start to beta_end (Ho et al. 2020);
* ``"scaled_linear"``: sqrt(beta) evenly spaced, squared (the latent-diffusion schedule);
* ``"cosine"`` (diffusers' ``"squaredcos_cap_v2"``): Nichol & Dhariwal 2021, eq. 17,
  abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2) with s = 0.008 and
  beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999), computed in float64 and rounded.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_int, check_number

__all__ = ["NoiseSchedule", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
_ALIASES = {"squaredcos_cap_v2": "cosine"}   # diffusers' name, so its configs carry over


def _cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


class NoiseSchedule:
    """The diffusion noise schedule: ``betas``, ``alphas``, ``alphas_cumprod`` as float32 (T,) tensors.

    ``beta_schedule``: "linear", "scaled_linear" or "cosine" (also under diffusers' name
    "squaredcos_cap_v2"; beta_start / beta_end are ignored by "cosine").  ``to(device)`` moves the tables (returns self).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 1)
        beta_schedule = _ALIASES.get(beta_schedule, beta_schedule) if isinstance(beta_schedule, str) else beta_schedule
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {beta_schedule!r}")
        beta_start, beta_end = check_number("beta_start", beta_start), check_number("beta_end", beta_end)
        if beta_schedule != "cosine" and not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start, self.beta_end = beta_start, beta_end
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = _cosine_betas(n)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def to(self, device) -> "NoiseSchedule":
        self.betas = self.betas.to(device)
        self.alphas = self.alphas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return (f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end})")
