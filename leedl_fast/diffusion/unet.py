"""A small U-Net noise predictor for diffusion models on small images.

The DDPM architecture (Ho et al. 2020, appendix B; Nichol & Dhariwal 2021) at toy
scale, with the conventions of diffusers' ``UNet2DModel`` defaults:

* timestep embedding: sinusoidal with the cosine half first and frequency shift 0
  (``flip_sin_to_cos=True, freq_shift=0``): for i < d/2,
  ``emb[i] = cos(t w_i)``, ``emb[d/2 + i] = sin(t w_i)``, ``w_i = 10000^(-i / (d/2))``;
  then Linear -> SiLU -> Linear to 4 * base_channels;
* optional class conditioning: an ``nn.Embedding`` added to the time embedding;
* residual blocks GroupNorm -> SiLU -> 3x3 conv, the time embedding added
  per channel, GroupNorm -> SiLU -> dropout -> 3x3 conv, 1x1 conv on the skip when
  the width changes;
* self-attention blocks (GroupNorm, 1x1 q/k/v, multi-head attention over the
  H*W positions through ``leedl_fast.ops.attention``, 1x1 output projection,
  residual) at the resolutions flagged in ``attention_levels`` and in the middle;
* stride-2 conv downsampling, nearest-neighbour upsampling + 3x3 conv, skip
  connections concatenated on the way up, zero-initialised output conv.

``forward(x, t, class_labels=None)`` takes x (B, C, H, W), t (B,) integer or float
timesteps (or a scalar), and returns a prediction of x's shape.  H and W must be
divisible by 2 ** (len(channel_mults) - 1).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_int
from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, attention

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoidal features, cosine half first (diffusers' flip_sin_to_cos=True,
    downscale_freq_shift=0).  An odd ``dim`` gets a zero last column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions of a feature map."""

    def __init__(self, channels: int, groups: int, head_dim: int):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.heads, self.head_dim = channels // head_dim, head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))       # (B, heads, HW, head_dim)
        o = attention(q, k, v)                                           # (B, heads, HW, head_dim)
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Noise predictor epsilon_theta(x_t, t[, y]) for small images (see the module docstring).

    Args:
        in_channels / out_channels: image channels (out defaults to in).
        base_channels: width of the first level; level i has base_channels * channel_mults[i].
        channel_mults: one entry per resolution (each after the first halves H and W).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: per level, whether blocks there are followed by self-attention
            (default: every level but the first).  The middle always has attention.
        head_dim: channels per attention head (16..256 for the fused kernel).
        num_classes: with an int, ``class_labels`` (B,) in [0, num_classes) are embedded and added
            to the time embedding.
        groups: GroupNorm groups.  dropout: inside the residual blocks.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 32,
                 channel_mults=(1, 2), num_res_blocks: int = 1, attention_levels=None, head_dim: int = 32,
                 num_classes: int | None = None, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        head_dim = check_int("head_dim", head_dim, MIN_HEAD_DIM, MAX_HEAD_DIM)
        num_classes = check_int("num_classes", num_classes, 1, optional=True)
        out_channels = in_channels if out_channels is None else out_channels
        n_levels = len(channel_mults)
        attention_levels = tuple(i > 0 for i in range(n_levels)) if attention_levels is None else tuple(attention_levels)
        if len(attention_levels) != n_levels:
            raise ValueError("attention_levels needs one entry per channel_mults entry")
        self.base_channels, self.num_classes = base_channels, num_classes
        self.downscale = 2 ** (n_levels - 1)
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [base_channels]
        ch = base_channels
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.down.append(nn.ModuleList([ResBlock(ch, out, emb_dim, groups, dropout)]
                                               + ([AttentionBlock(out, groups, head_dim)] if attention_levels[i] else [])))
                ch = out
                skips.append(ch)
            if i < n_levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim, groups, dropout)
        self.mid_attn = AttentionBlock(ch, groups, head_dim)
        self.mid2 = ResBlock(ch, ch, emb_dim, groups, dropout)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), out, emb_dim, groups, dropout)]
                                             + ([AttentionBlock(out, groups, head_dim)] if attention_levels[i] else [])))
                ch = out
            if i > 0:
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))  # after nearest-neighbour upsampling
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _check_labels(self, y, b: int) -> None:
        """(B,) integer labels in [0, num_classes): the range is checked on the CPU (on CUDA that would wait
        for the device; the embedding asserts there)."""
        if (not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype.is_complex
                or y.dtype == torch.bool or y.shape != (b,)):
            raise ValueError(f"class_labels must be an integer tensor of shape ({b},), got "
                             f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        if y.device.type == "cpu" and b and not torch.compiler.is_compiling():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"class_labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[-1] % self.downscale or x.shape[-2] % self.downscale:
            raise ValueError(f"H and W must be multiples of {self.downscale}, got {tuple(x.shape[-2:])}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a number or have shape ({b},) (one timestep per sample), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.class_emb is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: this UNet was built with num_classes")
            self._check_labels(class_labels, b)
            emb = emb + self.class_emb(class_labels.long())
        elif class_labels is not None:
            raise ValueError("class_labels given but the UNet has no num_classes")

        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            if isinstance(block, nn.Conv2d):
                h = block(h)
            else:
                h = block[0](h, emb)
                for attn in block[1:]:
                    h = attn(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block in self.up:
            if isinstance(block, nn.Conv2d):
                h = block(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            else:
                h = block[0](torch.cat([h, hs.pop()], dim=1), emb)
                for attn in block[1:]:
                    h = attn(h)
        return self.conv_out(F.silu(self.norm_out(h)))
