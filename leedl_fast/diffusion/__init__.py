"""Diffusion models: noise schedules, the fused forward process and loss, DDPM/DDIM samplers, a U-Net.

    from leedl_fast.diffusion import NoiseSchedule, UNet, DDIMSampler, training_loss
"""
from .loss import training_loss
from .samplers import DDIMSampler, DDPMSampler
from .schedule import BETA_SCHEDULES, NoiseSchedule
from .unet import UNet, timestep_embedding

__all__ = ["NoiseSchedule", "BETA_SCHEDULES", "DDPMSampler", "DDIMSampler", "UNet", "timestep_embedding",
           "training_loss"]
