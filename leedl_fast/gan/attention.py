"""``SelfAttention2d``: the self-attention block of SAGAN (Zhang et al. 2019), on ``leedl_fast.ops.attention``.

For a feature map x of shape (B, C, H, W) and the N = H*W positions,

    q = W_q x,  k = W_k x   (1x1 convolutions to C/8 channels)
    v = W_v x               (1x1 convolution to C channels)
    o_j = sum_i softmax_i(q_j . k_i) v_i          (no 1/sqrt(d) scaling, as in SAGAN)
    out = gamma * o + x,    gamma a scalar parameter that starts at 0

so a freshly built block is the identity and the network learns how much
non-local evidence to mix in.  Usable in generators and discriminators (see
``Generator(attention=True)`` / ``Discriminator(attention=True)``).

Feeding the fused attention op: it needs q, k and v with one head dimension D
in 16..256, while SAGAN's q/k have C/8 channels and v has C.  So

* q and k are zero-padded to D: the padded coordinates add 0 to every q.k,
  so the scores, and hence the output, are unchanged;
* v's C channels are split into G = ceil(C / 256) equal groups, each
  zero-padded to D, and the groups become G heads that share the same q/k
  (the padded output columns are dropped);
* D = the next power of two >= max(16, C/8, C/G) (a tile-friendly size);
* ``scale=1.0`` is passed explicitly, since SAGAN does not scale the scores.

C can be anything from 1 to 2048 (C/8 is rounded down, at least 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int

__all__ = ["SelfAttention2d"]

_MAX_HEAD_DIM = 256


class SelfAttention2d(nn.Module):
    """``SelfAttention2d(channels)``: (B, C, H, W) -> (B, C, H, W), ``out = gamma * attn(x) + x``.

    Parameters: ``query``, ``key`` (Conv2d C -> max(1, C // 8), 1x1), ``value``
    (Conv2d C -> C, 1x1) and ``gamma`` (scalar, initialised to 0).
    """

    def __init__(self, channels: int, qk_channels: int | None = None):
        super().__init__()
        channels = check_int("channels", channels, 1)
        if channels > 8 * _MAX_HEAD_DIM:
            raise ValueError(f"channels must be <= {8 * _MAX_HEAD_DIM} (q/k get channels/8 <= 256 dims), got {channels}")
        qk = max(1, channels // 8) if qk_channels is None else qk_channels
        qk = check_int("qk_channels", qk, 1, _MAX_HEAD_DIM)
        self.channels = channels
        self.qk_channels = qk
        self.query = nn.Conv2d(channels, qk, 1)
        self.key = nn.Conv2d(channels, qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))
        self.groups = math.ceil(channels / _MAX_HEAD_DIM)
        self.group_channels = math.ceil(channels / self.groups)
        need = max(16, qk, self.group_channels)
        self.head_dim = 1 << (need - 1).bit_length()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, qk_channels={self.qk_channels}, heads={self.groups}, head_dim={self.head_dim}"

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output o (B, C, H, W), before ``gamma * o + x``."""
        from ..ops.attention import attention

        b, c, h, w = x.shape
        n, d, g, gc = h * w, self.head_dim, self.groups, self.group_channels
        q = F.pad(self.query(x).flatten(2).transpose(1, 2), (0, d - self.qk_channels))  # (B, N, D)
        k = F.pad(self.key(x).flatten(2).transpose(1, 2), (0, d - self.qk_channels))    # (B, N, D)
        v = F.pad(self.value(x).flatten(2).transpose(1, 2), (0, g * gc - c))            # (B, N, G*gc)
        v = F.pad(v.view(b, n, g, gc), (0, d - gc)).transpose(1, 2)                    # (B, G, N, D)
        q = q.unsqueeze(1).expand(b, g, n, d).contiguous()
        k = k.unsqueeze(1).expand(b, g, n, d).contiguous()
        o = attention(q, k, v.contiguous(), scale=1.0)                                 # (B, G, N, D)
        o = o[..., :gc].transpose(1, 2).reshape(b, n, g * gc)[..., :c]                  # (B, N, C)
        return o.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] * x.shape[3] == 0:
            return x.clone()
        return self.gamma.to(x.dtype) * self.attend(x) + x
