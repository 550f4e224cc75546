"""CycleGAN (Zhu et al. 2017): unpaired translation between domains A and B.

The architecture and defaults follow the paper and its reference code (facts
only; this is an independent implementation):

* ``ResnetGenerator(input_nc, output_nc, ngf=64, n_blocks=9)``: reflection pad
  3 + 7x7 conv (ngf) / two 3x3 stride-2 convs (2 ngf, 4 ngf) / ``n_blocks``
  residual blocks (reflection pad 1 + 3x3 conv + norm + ReLU + reflection pad 1
  + 3x3 conv + norm, plus the input) / two 3x3 stride-2 transposed convs back /
  reflection pad 3 + 7x7 conv + tanh.  Instance norm without affine parameters
  and biases on the convolutions (the code's default ``--norm instance``).
* ``NLayerDiscriminator(input_nc, ndf=64, n_layers=3)``: the PatchGAN.  4x4
  convs: one stride-2 without norm, ``n_layers - 1`` stride-2 with norm, one
  stride-1 with norm, one stride-1 to a single channel; channels ndf * min(2^k,
  8); leaky ReLU 0.2.  With n_layers=3 each output sees a 70x70 patch, and a
  256x256 input gives a 30x30 map (each side: floor-halved n_layers times, minus 2).
* weights ~ N(0, 0.02), biases 0 (the code's ``--init_type normal``).
* ``CycleGAN``: lambda_A = lambda_B = 10, lambda_identity = 0.5, LSGAN loss,
  Adam(lr=2e-4, betas=(0.5, 0.999)), image pools of 50, one Adam for both
  generators and one for both discriminators, the discriminator loss halved.
  D_A judges domain B (real B vs G_A(A)); D_B judges domain A.

Differences, all of them outside the original's working range: the generator
pads an input whose side is not a multiple of 4 (or is below 8) by edge
replication on the bottom/right and crops its output back, so it returns the
input's size for any size, odd ones included (the original needs multiples of
4); in ``"wgangp"`` mode the discriminator loss adds ``gradient_penalty``; in
``"hinge"`` mode the generator uses -mean(D).  The learning-rate decay
schedule of the original is left to the caller.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_number
from .dcgan import init_weights
from .losses import GANLoss, gradient_penalty
from .pool import ImagePool
from .trainer import frozen

__all__ = ["ResnetGenerator", "NLayerDiscriminator", "CycleGAN", "patchgan_output_size", "cyclegan_step"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {kind!r}")


def _check_images(name: str, x, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must not be an empty batch")


class _ResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, use_dropout: bool, bias: bool):
        super().__init__()
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """(B, input_nc, H, W) -> (B, output_nc, H, W) in [-1, 1]; any H, W >= 1."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, n_blocks: int = 9, *, norm: str = "instance",
                 use_dropout: bool = False, init_gain: float = 0.02):
        super().__init__()
        self.input_nc = check_int("input_nc", input_nc, 1)
        self.output_nc = check_int("output_nc", output_nc, 1)
        ngf = check_int("ngf", ngf, 1)
        check_int("n_blocks", n_blocks, 0)
        check_number("init_gain", init_gain, 0)
        bias = norm == "instance"  # batch norm has its own shift
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=bias), _norm(norm, ngf), nn.ReLU(True)]
        for i in range(2):  # downsampling
            c = ngf * 2 ** i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), _norm(norm, 2 * c), nn.ReLU(True)]
        layers += [_ResnetBlock(ngf * 4, norm, use_dropout, bias) for _ in range(n_blocks)]
        for i in range(2):  # upsampling
            c = ngf * 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       _norm(norm, c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self, init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images("x", x, self.input_nc)
        h, w = x.shape[2:]
        # the two stride-2 stages need sides divisible by 4, and the residual
        # blocks' reflection padding needs >= 2 pixels after them: >= 8
        ph, pw = max(8, -(-h // 4) * 4) - h, max(8, -(-w // 4) * 4) - w
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.model(x)[:, :, :h, :w]


def patchgan_output_size(size: int, n_layers: int = 3) -> int:
    """Side of an ``NLayerDiscriminator``'s output map for an input side ``size``:
    floor-halved ``n_layers`` times (4x4, stride 2, pad 1), then minus 1 twice (4x4, stride 1, pad 1)."""
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1
    return size - 2


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, input_nc, H, W) -> (B, 1, H', W') logits, one per overlapping patch
    (70x70 patches and 30x30 outputs for 256x256 inputs with the defaults)."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, *, norm: str = "instance",
                 init_gain: float = 0.02):
        super().__init__()
        self.input_nc = check_int("input_nc", input_nc, 1)
        ndf = check_int("ndf", ndf, 1)
        self.n_layers = check_int("n_layers", n_layers, 1)
        check_number("init_gain", init_gain, 0)
        bias = norm == "instance"
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias), _norm(norm, ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_weights(self, init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images("x", x, self.input_nc)
        oh, ow = (patchgan_output_size(s, self.n_layers) for s in x.shape[2:])
        if oh < 1 or ow < 1:
            raise ValueError(f"x of size {tuple(x.shape[2:])} is too small for n_layers={self.n_layers} "
                             f"(output map would be {oh}x{ow})")
        return self.model(x)


def cyclegan_step(netG_A, netG_B, netD_A, netD_B, optimizer_G, optimizer_D, fake_A_pool: ImagePool,
                  fake_B_pool: ImagePool, criterion: GANLoss, real_A: torch.Tensor, real_B: torch.Tensor, *,
                  lambda_A: float = 10.0, lambda_B: float = 10.0, lambda_identity: float = 0.5) -> dict[str, float]:
    """One CycleGAN iteration on modules (possibly DDP-wrapped) and their two optimisers.

    Generator step, D_A and D_B frozen:
        L_G = L_GAN(D_A(G_A(a)), real) + L_GAN(D_B(G_B(b)), real)
              + lambda_A |G_B(G_A(a)) - a|_1 + lambda_B |G_A(G_B(b)) - b|_1
              + lambda_identity (lambda_B |G_A(b) - b|_1 + lambda_A |G_B(a) - a|_1)
    then the discriminator step on pooled fakes:
        L_D_A = (L_GAN(D_A(b), real) + L_GAN(D_A(pool_B(G_A(a))), fake)) / 2,  L_D_B likewise.
    Returns every term as a float.

    Checked before any update, so that a refused step changes nothing: in
    ``"wgangp"`` mode real_A and real_B must have the same batch and image size
    (the penalty mixes real_B with G_A(real_A), and real_A with G_B(real_B)),
    and each image size must be the one of the fakes already in its pool.
    """
    if criterion.gan_mode == "wgangp" and (real_A.shape[0], *real_A.shape[2:]) != (real_B.shape[0], *real_B.shape[2:]):
        raise ValueError(f"gan_mode='wgangp' needs real_A and real_B of the same batch and image size, got "
                         f"{tuple(real_A.shape)} and {tuple(real_B.shape)}")
    for name, real, pool in (("real_A", real_A, fake_B_pool), ("real_B", real_B, fake_A_pool)):
        if pool.images and tuple(pool.images[0].shape[1:]) != tuple(real.shape[2:]):
            raise ValueError(f"{name} has images of size {tuple(real.shape[2:])} but its fakes' pool holds "
                             f"{tuple(pool.images[0].shape[1:])}")
    fake_B = netG_A(real_A)
    rec_A = netG_B(fake_B)
    fake_A = netG_B(real_B)
    rec_B = netG_A(fake_A)

    optimizer_G.zero_grad(set_to_none=True)
    out = {}
    with frozen(netD_A, netD_B):
        if lambda_identity > 0:
            out["loss_idt_A"] = F.l1_loss(netG_A(real_B), real_B) * lambda_B * lambda_identity
            out["loss_idt_B"] = F.l1_loss(netG_B(real_A), real_A) * lambda_A * lambda_identity
        out["loss_G_A"] = criterion(netD_A(fake_B), True, for_discriminator=False)
        out["loss_G_B"] = criterion(netD_B(fake_A), True, for_discriminator=False)
        out["loss_cycle_A"] = F.l1_loss(rec_A, real_A) * lambda_A
        out["loss_cycle_B"] = F.l1_loss(rec_B, real_B) * lambda_B
        loss_G = sum(out.values())
        loss_G.backward()
    optimizer_G.step()
    out["loss_G"] = loss_G

    optimizer_D.zero_grad(set_to_none=True)
    for name, D, real, fake, pool in (("A", netD_A, real_B, fake_B, fake_B_pool),
                                      ("B", netD_B, real_A, fake_A, fake_A_pool)):
        fake = pool.query(fake.detach())
        loss = 0.5 * (criterion(D(real), True) + criterion(D(fake), False))
        if criterion.gan_mode == "wgangp":
            gp = gradient_penalty(D, real, fake)
            out[f"gp_{name}"] = gp
            loss = loss + gp
        loss.backward()
        out[f"loss_D_{name}"] = loss
    optimizer_D.step()
    return {k: float(v.detach()) for k, v in out.items()}


class CycleGAN(nn.Module):
    """G_A: A -> B, G_B: B -> A, D_A (judges B), D_B (judges A), their optimisers and fake pools.

    ``train_step(real_A, real_B) -> dict`` of float losses (see ``cyclegan_step``).
    ``n_layers_D``, ``norm`` and ``seed`` (for the pools) are extra keywords.
    """

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, ndf: int = 64, n_blocks: int = 9,
                 lambda_A: float = 10.0, lambda_B: float = 10.0, lambda_identity: float = 0.5, gan_mode: str = "lsgan",
                 lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), pool_size: int = 50, *,
                 n_layers_D: int = 3, norm: str = "instance", seed: int = 0):
        super().__init__()
        for name, v in (("lambda_A", lambda_A), ("lambda_B", lambda_B), ("lambda_identity", lambda_identity)):
            check_number(name, v, 0)
        check_number("lr", lr, 0, lo_open=True)
        check_int("seed", seed, -(2**63), 2**64 - 2)  # the pools take seed and seed + 1 (torch.Generator's range)
        if lambda_identity > 0 and input_nc != output_nc:
            raise ValueError(f"lambda_identity > 0 needs input_nc == output_nc (got {input_nc} and {output_nc}); "
                             "set lambda_identity=0")
        self.criterion = GANLoss(gan_mode)
        self.netG_A = ResnetGenerator(input_nc, output_nc, ngf, n_blocks, norm=norm)
        self.netG_B = ResnetGenerator(output_nc, input_nc, ngf, n_blocks, norm=norm)
        self.netD_A = NLayerDiscriminator(output_nc, ndf, n_layers_D, norm=norm)
        self.netD_B = NLayerDiscriminator(input_nc, ndf, n_layers_D, norm=norm)
        self.input_nc, self.output_nc = input_nc, output_nc
        self.lambda_A, self.lambda_B, self.lambda_identity = float(lambda_A), float(lambda_B), float(lambda_identity)
        self.optimizer_G = torch.optim.Adam(itertools.chain(self.netG_A.parameters(), self.netG_B.parameters()),
                                            lr=lr, betas=betas)
        self.optimizer_D = torch.optim.Adam(itertools.chain(self.netD_A.parameters(), self.netD_B.parameters()),
                                            lr=lr, betas=betas)
        self.fake_A_pool = ImagePool(pool_size, seed=seed)
        self.fake_B_pool = ImagePool(pool_size, seed=seed + 1)

    def forward(self, real_A: torch.Tensor) -> torch.Tensor:
        """G_A(real_A): the translation A -> B."""
        return self.netG_A(real_A)

    def train_step(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, float]:
        _check_images("real_A", real_A, self.input_nc)
        _check_images("real_B", real_B, self.output_nc)
        return cyclegan_step(self.netG_A, self.netG_B, self.netD_A, self.netD_B, self.optimizer_G, self.optimizer_D,
                             self.fake_A_pool, self.fake_B_pool, self.criterion, real_A, real_B,
                             lambda_A=self.lambda_A, lambda_B=self.lambda_B, lambda_identity=self.lambda_identity)
