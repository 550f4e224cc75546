"""The denoising training objective (Ho et al. 2020, algorithm 1) on the fused noising ops."""
from __future__ import annotations

import torch

from ..ops.noising import PREDICTION_TYPES, draw_seed, noise_prediction_loss, q_sample
from .schedule import NoiseSchedule

__all__ = ["training_loss"]


def training_loss(model, x0: torch.Tensor, schedule: NoiseSchedule, *, seed: int | None = None,
                  class_labels: torch.Tensor | None = None, prediction_type: str = "epsilon",
                  t: torch.Tensor | None = None) -> torch.Tensor:
    """One Monte-Carlo estimate of the simple loss E_{t, eps} ||target - model(x_t, t[, y])||^2.

    Draws t ~ U{0..T-1} per sample (torch's default generator, on the CPU, then moved to
    x0's device) unless ``t`` is given, x_t = q_sample(x0, t, seed=seed) with noise from
    the Philox stream of ``seed`` (drawn when None), calls ``model(x_t, t)`` (or
    ``model(x_t, t, class_labels)``) and returns ``noise_prediction_loss``, which
    regenerates the same noise in its kernel: the noise is never read back.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(x0, torch.Tensor) or x0.dim() < 1:
        raise ValueError("x0 must be a (B, ...) tensor")
    ac = schedule.alphas_cumprod
    if ac.device != x0.device:
        ac = ac.to(x0.device)
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],)).to(x0.device, non_blocking=True)
    seed = draw_seed() if seed is None else seed
    x_t, _ = q_sample(x0, t, ac, seed=seed)
    pred = model(x_t, t) if class_labels is None else model(x_t, t, class_labels)
    return noise_prediction_loss(pred, x0, t, ac, seed=seed, target=prediction_type)
