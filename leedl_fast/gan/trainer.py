"""The alternating GAN update: D steps on real vs generated (and real-but-mismatched) pairs, G steps through a frozen D.

``GANTrainer(G, D, latent_dim=...)`` holds the two optimisers (separate
learning rates ``lr_g`` / ``lr_d``) and does, at each ``step(real, condition)``:

1. a discriminator step:
       L_D = loss(D(x, y), real) + loss(D(G(z, y), y), fake)
             [+ mismatch_weight * loss(D(x, y'), fake)]   y' != y: real image, wrong condition
             [+ gradient_penalty(D, x, G(z, y))]          when lambda_gp > 0 (default for wgangp)
2. every ``n_critic``-th call, a generator step with D frozen:
       L_G = loss(D(G(z, y), y), real, for_discriminator=False)

Unconditional models are called as ``G(z)`` / ``D(x)`` (``condition=None``);
conditional ones as ``G(z, y)`` / ``D(x, y)``.  The mismatched pairs are the
GAN-CLS negatives of Reed et al. 2016, which make D judge whether a sample
fits its condition and not only whether it looks real.  ``spectral_norm=True``
wraps every convolution, linear and embedding layer of D in spectral
normalisation (Miyato et al. 2018) before the optimiser is built.

``discriminator_step`` / ``generator_step`` are the same updates as plain
functions (used by the demo recipe, which receives its models and optimisers
from the CLI trainer).  Freezing D for the G step sets ``requires_grad=False``
on its parameters and, for a DistributedDataParallel D, enters ``no_sync()``
so that the frozen forward does not wait for gradients.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .._checks import check_int, check_number
from .dcgan import sample_latent
from .losses import GANLoss, gradient_penalty
from .conditional import mismatched_condition

__all__ = ["GANTrainer", "apply_spectral_norm", "discriminator_step", "generator_step", "frozen"]

_SN_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral normalisation on every Conv2d, ConvTranspose2d, Linear and Embedding of ``module`` (in place)."""
    from torch.nn.utils.parametrizations import spectral_norm

    for m in list(module.modules()):
        if isinstance(m, _SN_TYPES) and not torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            spectral_norm(m)
    return module


@contextlib.contextmanager
def frozen(*nets: nn.Module) -> Iterator[None]:
    """No parameter of ``nets`` requires grad inside the block (restored after); DDP modules skip their sync."""
    params = [p for n in nets for p in n.parameters()]
    saved = [p.requires_grad for p in params]
    with contextlib.ExitStack() as stack:
        for n in nets:
            if hasattr(n, "no_sync"):
                stack.enter_context(n.no_sync())
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, r in zip(params, saved):
                p.requires_grad_(r)


def _call(net, x, condition):
    return net(x) if condition is None else net(x, condition)


def _batch(real: torch.Tensor, condition) -> int:
    if not isinstance(real, torch.Tensor) or real.dim() < 2:
        raise ValueError(f"real must be a batch of samples (B, ...), got {type(real).__name__}")
    b = real.shape[0]
    if condition is not None:
        from .conditional import condition_batch_size

        if condition_batch_size(condition) != b:
            raise ValueError(f"condition has batch {condition_batch_size(condition)} but real has {b}")
    return b


def discriminator_step(G, D, opt_D: torch.optim.Optimizer, real: torch.Tensor, condition=None, *,
                       criterion: GANLoss, latent_dim: int, latent_distribution: str = "normal",
                       num_classes: int | None = None, mismatch_weight: float = 1.0,
                       lambda_gp: float = 0.0) -> dict[str, float]:
    """One D update; returns ``{"loss_D", "D_real", "D_fake"[, "loss_D_mismatch"][, "gp"]}`` (means of D's logits).

    The mismatched pairs need a wrong condition for each sample: class labels
    with ``num_classes`` always have one; other conditions are rolled along the
    batch, so a batch of one has none and its step leaves that term out (no
    ``"loss_D_mismatch"``).  They are drawn before G runs, so that a condition
    they refuse stops the step before anything changed.
    """
    b = _batch(real, condition)
    z = sample_latent(b, latent_dim, latent_distribution, device=real.device, dtype=real.dtype)
    wrong = None
    if condition is not None and mismatch_weight > 0 and (num_classes is not None or b >= 2):
        wrong = mismatched_condition(condition, num_classes)
    with torch.no_grad():
        fake = _call(G, z, condition)
    opt_D.zero_grad(set_to_none=True)
    d_real = _call(D, real, condition)
    d_fake = _call(D, fake, condition)
    loss = criterion(d_real, True) + criterion(d_fake, False)
    out = {}
    if wrong is not None:
        d_wrong = D(real, wrong)
        l_wrong = criterion(d_wrong, False)
        loss = loss + mismatch_weight * l_wrong
        out["loss_D_mismatch"] = float(l_wrong.detach())
    if lambda_gp > 0:
        gp = gradient_penalty(D, real, fake, lambda_gp, condition=condition)
        loss = loss + gp
        out["gp"] = float(gp.detach())
    loss.backward()
    opt_D.step()
    return {"loss_D": float(loss.detach()), "D_real": float(d_real.detach().mean()), "D_fake": float(d_fake.detach().mean()),
            **out}


def generator_step(G, D, opt_G: torch.optim.Optimizer, batch: int, condition=None, *, criterion: GANLoss,
                   latent_dim: int, latent_distribution: str = "normal", device=None,
                   dtype: torch.dtype | None = None) -> dict[str, float]:
    """One G update through a frozen D; returns ``{"loss_G": float}``."""
    z = sample_latent(batch, latent_dim, latent_distribution, device=device, dtype=dtype)
    opt_G.zero_grad(set_to_none=True)
    fake = _call(G, z, condition)
    with frozen(D):
        loss = criterion(_call(D, fake, condition), True, for_discriminator=False)
        loss.backward()
    opt_G.step()
    return {"loss_G": float(loss.detach())}


class GANTrainer:
    """Alternating GAN training for ``G`` and ``D`` (unconditional or conditional).

    ``n_critic``: D steps per G step (G is updated on every n_critic-th call of
    ``step``).  ``lambda_gp``: gradient-penalty weight (default 10 for
    ``gan_mode="wgangp"``, else 0).  ``num_classes`` (None or an int >= 2):
    labels are mismatched by a guaranteed class change; without it conditions
    are rolled along the batch, and a batch of one gets no mismatched pair
    (see ``discriminator_step``).
    """

    def __init__(self, G: nn.Module, D: nn.Module, *, latent_dim: int, gan_mode: str = "hinge", lr_g: float = 2e-4,
                 lr_d: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), n_critic: int = 1,
                 spectral_norm: bool = False, lambda_gp: float | None = None, num_classes: int | None = None,
                 mismatch_weight: float = 1.0, latent_distribution: str = "normal"):
        check_int("n_critic", n_critic, 1)
        check_number("lr_g", lr_g, 0, lo_open=True)
        check_number("lr_d", lr_d, 0, lo_open=True)
        check_number("mismatch_weight", mismatch_weight, 0)
        if lambda_gp is not None:
            check_number("lambda_gp", lambda_gp, 0)
        check_int("num_classes", num_classes, 2, optional=True)
        self.criterion = GANLoss(gan_mode)
        sample_latent(0, latent_dim, latent_distribution)  # validates latent_dim and latent_distribution
        self.G, self.D = G, apply_spectral_norm(D) if spectral_norm else D
        self.latent_dim, self.latent_distribution = latent_dim, latent_distribution
        self.n_critic, self.num_classes, self.mismatch_weight = n_critic, num_classes, mismatch_weight
        self.lambda_gp = (10.0 if gan_mode == "wgangp" else 0.0) if lambda_gp is None else float(lambda_gp)
        self.opt_G = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas)
        self.calls = 0
        self.last_loss_G = float("nan")

    def step(self, real: torch.Tensor, condition=None) -> dict[str, float]:
        out = discriminator_step(self.G, self.D, self.opt_D, real, condition, criterion=self.criterion,
                                 latent_dim=self.latent_dim, latent_distribution=self.latent_distribution,
                                 num_classes=self.num_classes, mismatch_weight=self.mismatch_weight,
                                 lambda_gp=self.lambda_gp)
        self.calls += 1
        if self.calls % self.n_critic == 0:
            self.last_loss_G = generator_step(self.G, self.D, self.opt_G, real.shape[0], condition,
                                              criterion=self.criterion, latent_dim=self.latent_dim,
                                              latent_distribution=self.latent_distribution, device=real.device,
                                              dtype=real.dtype)["loss_G"]
        out["loss_G"] = self.last_loss_G
        return out

    def state_dict(self) -> dict:
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "opt_G": self.opt_G.state_dict(),
                "opt_D": self.opt_D.state_dict(), "calls": self.calls, "last_loss_G": self.last_loss_G}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.calls, self.last_loss_G = state["calls"], state["last_loss_G"]
