"""GAN objectives: ``GANLoss`` (lsgan, vanilla, hinge, wgangp) and the WGAN-GP ``gradient_penalty``.

``GANLoss(gan_mode)(prediction, target_is_real)`` mirrors the interface of the
loss object of the CycleGAN/pix2pix code (Zhu et al. 2017, Isola et al. 2017):
the target is a truth value, not a tensor, and the loss is a mean over every
element of ``prediction`` (a PatchGAN map or one score per sample).

    lsgan    mean((p - t)^2),          t = 1 (real) or 0 (fake)      Mao et al. 2017
    vanilla  mean(BCE(sigmoid(p), t))  on logits                     Goodfellow et al. 2014
    wgangp   -mean(p) (real), mean(p) (fake)                         Gulrajani et al. 2017
    hinge    D: mean(relu(1 - p)) (real), mean(relu(1 + p)) (fake)   Lim & Ye 2017; Miyato et al. 2018
             G: -mean(p)  (pass ``for_discriminator=False``)

Only hinge distinguishes the two players; the other modes ignore
``for_discriminator`` (the generator of lsgan/vanilla minimises the loss with
``target_is_real=True``, and -mean(p) of wgangp is the same for both).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .._checks import check_number

__all__ = ["GAN_MODES", "GANLoss", "gradient_penalty"]

GAN_MODES = ("lsgan", "vanilla", "hinge", "wgangp")


class GANLoss(torch.nn.Module):
    """``loss(prediction, target_is_real, for_discriminator=True) -> scalar tensor``.

    ``gan_mode``: one of ``"lsgan"``, ``"vanilla"``, ``"hinge"``, ``"wgangp"``
    (ValueError otherwise).  ``real_label`` / ``fake_label`` are the targets of
    lsgan and vanilla.
    """

    def __init__(self, gan_mode: str = "lsgan", real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        if gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode must be one of {', '.join(GAN_MODES)}; got {gan_mode!r}")
        for name, value in (("real_label", real_label), ("fake_label", fake_label)):
            check_number(name, value)
        self.gan_mode = gan_mode
        self.real_label = float(real_label)
        self.fake_label = float(fake_label)

    def extra_repr(self) -> str:
        return f"gan_mode={self.gan_mode!r}"

    def forward(self, prediction: torch.Tensor, target_is_real: bool, for_discriminator: bool = True) -> torch.Tensor:
        if not isinstance(prediction, torch.Tensor) or not prediction.dtype.is_floating_point:
            raise ValueError(f"prediction must be a floating-point tensor, got {type(prediction).__name__}"
                             + (f" of {prediction.dtype}" if isinstance(prediction, torch.Tensor) else ""))
        if prediction.numel() == 0:
            raise ValueError("prediction must not be empty")
        p = prediction.float() if prediction.dtype in (torch.float16, torch.bfloat16) else prediction
        mode = self.gan_mode
        if mode in ("lsgan", "vanilla"):
            target = torch.full_like(p, self.real_label if target_is_real else self.fake_label)
            if mode == "lsgan":
                return F.mse_loss(p, target)
            return F.binary_cross_entropy_with_logits(p, target)
        if mode == "wgangp" or not for_discriminator:
            return -p.mean() if target_is_real else p.mean()
        # hinge, discriminator side
        return F.relu(1.0 - p).mean() if target_is_real else F.relu(1.0 + p).mean()


def gradient_penalty(D: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor, lambda_gp: float = 10.0, *,
                     condition=None, alpha: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     constant: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): ``lambda_gp * mean_i (||grad_x D(x_i)||_2 - constant)^2``.

    ``x_i = alpha_i * real_i + (1 - alpha_i) * fake_i`` with one ``alpha_i ~ U[0, 1)``
    per sample (drawn from ``generator`` unless ``alpha`` of shape ``(B,)`` is
    given).  ``fake`` is detached; the returned scalar is differentiable with
    respect to D's parameters (the gradient is taken with ``create_graph=True``).
    ``condition`` (if not None) is passed as D's second argument.  The norm is
    ``sqrt(sum g^2 + eps)`` so that its gradient stays finite where g = 0.
    """
    if not isinstance(real, torch.Tensor) or not isinstance(fake, torch.Tensor):
        raise ValueError("real and fake must be tensors")
    if real.shape != fake.shape:
        raise ValueError(f"fake has shape {tuple(fake.shape)} but real has {tuple(real.shape)}")
    if real.dim() < 1 or real.shape[0] == 0:
        raise ValueError(f"real must have a non-empty batch dimension, got shape {tuple(real.shape)}")
    if lambda_gp < 0:
        raise ValueError(f"lambda_gp must be >= 0, got {lambda_gp}")
    b = real.shape[0]
    if alpha is None:
        alpha = torch.rand(b, generator=generator, device="cpu" if generator is None or generator.device.type == "cpu"
                           else generator.device).to(real.device, real.dtype)
    elif alpha.shape != (b,):
        raise ValueError(f"alpha must have shape ({b},), got {tuple(alpha.shape)}")
    a = alpha.to(real.device, real.dtype).view(b, *([1] * (real.dim() - 1)))
    x = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    out = D(x) if condition is None else D(x, condition)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out), create_graph=True)
    norm = torch.sqrt(grad.flatten(1).pow(2).sum(1) + eps)
    return lambda_gp * (norm - constant).pow(2).mean()
