"""DCGAN-style generator and discriminator for small images, and latent sampling.

Architecture after Radford et al. 2016 (DCGAN): the generator projects z to a
small feature map and doubles its resolution with stride-2 transposed
convolutions (batch norm, ReLU, tanh output); the discriminator halves the
resolution with stride-2 convolutions (leaky ReLU 0.2).  Two changes make it
fit any small size and the conditional models of ``conditional.py``:

* any height and width: the generator starts from ``ceil(size / 2**n_up)`` and
  center-crops its output to the requested size (so odd sizes work);
* the discriminator ends in global sum pooling and a linear layer (as in the
  projection discriminator of Miyato & Koyama 2018), which gives one logit per
  sample for any input size and exposes the pooled features for projection.
  It has no batch norm, so gradient penalties and spectral norm apply cleanly.

``SelfAttention2d`` (SAGAN) can be inserted in both with ``attention=True``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import check_int, check_number
from .attention import _MAX_HEAD_DIM, SelfAttention2d

__all__ = ["Generator", "Discriminator", "sample_latent", "init_weights", "LATENT_DISTRIBUTIONS"]

LATENT_DISTRIBUTIONS = ("normal", "uniform", "truncated_normal", "sphere")


def _pair(name: str, size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])




def _check_attention_width(name: str, width: int, channels: int) -> None:
    """Refuse, naming the width argument, a width that gives ``SelfAttention2d`` more channels than it takes."""
    limit = 8 * _MAX_HEAD_DIM
    if channels > limit:
        raise ValueError(f"{name}={width} gives the self-attention block {channels} channels, more than the {limit} "
                         f"it takes: use {name} <= {limit * width // channels} with attention=True")


def sample_latent(n: int, dim: int, distribution: str = "normal", *, generator: torch.Generator | None = None,
                  device=None, dtype: torch.dtype | None = None, truncation: float = 2.0) -> torch.Tensor:
    """``(n, dim)`` latent vectors.

    ``distribution``:
      ``"normal"``            N(0, 1) per coordinate;
      ``"uniform"``           U(-1, 1) per coordinate;
      ``"truncated_normal"``  N(0, 1) conditioned on |z| <= ``truncation`` (the
                              truncation trick, Brock et al. 2019), drawn by inverse CDF;
      ``"sphere"``            uniform on the sphere of radius sqrt(dim) (normalised normal).
    ``generator`` (a ``torch.Generator`` on ``device``) makes the draw reproducible.
    The draw is made in float32 (float64 for float64) and cast to ``dtype``, so
    a half-precision draw is the float32 one rounded, not a coarser, biased one.
    """
    n = check_int("n", n, 0)
    dim = check_int("dim", dim, 1)
    if distribution not in LATENT_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(LATENT_DISTRIBUTIONS)}; got {distribution!r}")
    dtype = dtype or torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}")
    if distribution == "truncated_normal" and not truncation > 0:
        raise ValueError(f"truncation must be > 0, got {truncation!r}")
    kw = dict(generator=generator, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if distribution == "normal":
        z = torch.randn(n, dim, **kw)
    elif distribution == "uniform":
        z = torch.rand(n, dim, **kw) * 2 - 1
    elif distribution == "truncated_normal":
        lo = 0.5 * (1 + math.erf(-truncation / math.sqrt(2)))  # Phi(-t)
        u = lo + (1 - 2 * lo) * torch.rand(n, dim, **kw)       # U[Phi(-t), Phi(t))
        z = (math.sqrt(2) * torch.erfinv(2 * u - 1)).clamp_(-truncation, truncation)
    else:
        z = torch.randn(n, dim, **kw)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(dim)
    return z.to(dtype)


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """DCGAN / CycleGAN initialisation: conv and linear weights ~ N(0, gain), biases 0,
    norm-layer scales ~ N(1, gain).  A parametrized weight (spectral norm) has its
    stored ``original`` initialised.  Returns ``module``."""
    check_number("gain", gain, 0)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight")
                            else m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return module


class Generator(nn.Module):
    """z ``(B, latent_dim)`` -> images ``(B, channels, H, W)`` in [-1, 1].

    ``image_size``: int or (H, W).  ``n_up``: number of stride-2 upsamplings
    (default: enough to go from about 4 pixels to the image size).  Channels
    are ``ngf * 2**k`` (at most ``ngf * 8``), halving at each upsampling.
    ``attention=True`` inserts a ``SelfAttention2d`` before the last upsampling.
    """

    def __init__(self, latent_dim: int = 100, image_size=64, channels: int = 3, ngf: int = 64, *,
                 n_up: int | None = None, attention: bool = False):
        super().__init__()
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.image_size = _pair("image_size", image_size)
        self.channels = check_int("channels", channels, 1)
        ngf = check_int("ngf", ngf, 1)
        h, w = self.image_size
        if n_up is None:
            n_up = max(0, math.ceil(math.log2(max(h, w))) - 2)
        n_up = check_int("n_up", n_up, 0)
        self.n_up = n_up
        self.base = (math.ceil(h / 2 ** n_up), math.ceil(w / 2 ** n_up))
        ch = [ngf * min(2 ** (n_up - i), 8) for i in range(n_up + 1)]
        if attention:
            _check_attention_width("ngf", ngf, ch[max(n_up - 1, 0)])
        self.fc = nn.Linear(self.latent_dim, ch[0] * self.base[0] * self.base[1], bias=False)
        self.fc_norm = nn.BatchNorm2d(ch[0])
        layers: list[nn.Module] = []
        for i in range(n_up):
            if attention and i == n_up - 1:
                layers.append(SelfAttention2d(ch[i]))
            layers += [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(ch[i + 1]), nn.ReLU(True)]
        if attention and n_up == 0:
            layers.append(SelfAttention2d(ch[0]))
        layers += [nn.Conv2d(ch[-1], self.channels, 3, 1, 1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point:
            raise ValueError(f"z must be a floating-point tensor, got {type(z).__name__}")
        if z.dim() == 4 and z.shape[2:] == (1, 1):
            z = z.flatten(1)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        x = self.fc(z).view(z.shape[0], self.fc_norm.num_features, *self.base)
        x = self.body(torch.relu(self.fc_norm(x)))
        h, w = self.image_size
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        return x[:, :, top:top + h, left:left + w]


class Discriminator(nn.Module):
    """images ``(B, channels, H, W)`` -> one logit per sample ``(B,)``.

    ``n_down`` stride-2 convolutions (default: halve while the smaller side
    stays >= 4), channels ``ndf * 2**k`` (at most ``ndf * 8``), leaky ReLU 0.2,
    then global sum pooling and a linear layer.  ``features(x)`` returns the
    pooled features ``(B, feature_dim)``.  ``attention=True`` inserts a
    ``SelfAttention2d`` after the first downsampling (or the stem when n_down = 0).
    """

    def __init__(self, image_size=64, channels: int = 3, ndf: int = 64, *, n_down: int | None = None,
                 attention: bool = False):
        super().__init__()
        self.image_size = _pair("image_size", image_size)
        self.channels = check_int("channels", channels, 1)
        ndf = check_int("ndf", ndf, 1)
        side = min(self.image_size)
        if n_down is None:
            n_down = 0
            while side // 2 ** (n_down + 1) >= 4:
                n_down += 1
        n_down = check_int("n_down", n_down, 0)
        if side // 2 ** n_down < 1:
            raise ValueError(f"n_down={n_down} halves image_size {self.image_size} below one pixel")
        self.n_down = n_down
        ch = [ndf * min(2 ** i, 8) for i in range(n_down + 1)]
        if attention:
            _check_attention_width("ndf", ndf, ch[min(n_down, 1)])
        layers: list[nn.Module] = [nn.Conv2d(self.channels, ch[0], 3, 1, 1), nn.LeakyReLU(0.2, True)]
        for i in range(n_down):
            layers += [nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1), nn.LeakyReLU(0.2, True)]
            if attention and i == 0:
                layers.append(SelfAttention2d(ch[1]))
        if attention and n_down == 0:
            layers.append(SelfAttention2d(ch[0]))
        self.body = nn.Sequential(*layers)
        self.feature_dim = ch[-1]
        self.head = nn.Linear(self.feature_dim, 1)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"x must have shape (B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}), "
                             f"got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.body(x).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)
