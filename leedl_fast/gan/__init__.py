"""GANs on the library's kernels: DCGAN, conditional (class / text) GANs, SAGAN self-attention, CycleGAN.

* ``Generator``, ``Discriminator``, ``sample_latent``: DCGAN-style models for small images.
* ``ConditionalGenerator``, ``ProjectionDiscriminator``, ``TextEncoder``, ``mismatched_condition``.
* ``SelfAttention2d``: SAGAN's block on ``leedl_fast.ops.attention``.
* ``ResnetGenerator``, ``NLayerDiscriminator``, ``ImagePool``, ``GANLoss``, ``gradient_penalty``, ``CycleGAN``.
* ``GANTrainer``: the alternating update (n_critic, separate learning rates, optional spectral norm).

The demos (``leedl-fast train gan`` / ``cyclegan``) are in ``leedl_fast.gan.recipe``.
"""
from .attention import SelfAttention2d
from .conditional import ConditionalGenerator, ProjectionDiscriminator, TextEncoder, mismatched_condition
from .cyclegan import CycleGAN, NLayerDiscriminator, ResnetGenerator, cyclegan_step, patchgan_output_size
from .dcgan import LATENT_DISTRIBUTIONS, Discriminator, Generator, init_weights, sample_latent
from .losses import GAN_MODES, GANLoss, gradient_penalty
from .pool import ImagePool
from .trainer import GANTrainer, apply_spectral_norm, discriminator_step, generator_step

__all__ = [
    "SelfAttention2d", "ConditionalGenerator", "ProjectionDiscriminator", "TextEncoder", "mismatched_condition",
    "CycleGAN", "NLayerDiscriminator", "ResnetGenerator", "cyclegan_step", "patchgan_output_size",
    "LATENT_DISTRIBUTIONS", "Discriminator", "Generator", "init_weights", "sample_latent",
    "GAN_MODES", "GANLoss", "gradient_penalty", "ImagePool",
    "GANTrainer", "apply_spectral_norm", "discriminator_step", "generator_step",
]
