"""Conditional GANs: class, vector or text conditions fed to a DCGAN-style G and a projection D.

* ``ConditionalGenerator``: the condition is turned into a vector c (a learned
  class embedding, the given vector, or a ``TextEncoder`` reading of a token
  sequence) and concatenated to z (Mirza & Osindero 2014).
* ``ProjectionDiscriminator``: ``D(x, y) = w . phi(x) + b + <V c, phi(x)>``
  with phi(x) the pooled features of a ``Discriminator`` (Miyato & Koyama 2018,
  "cGANs with projection discriminator"); for classes, ``V c`` is a learned
  embedding of the label.  D scores (sample, condition) pairs, so it is
  trained with real-but-mismatched pairs as extra negatives (Reed et al. 2016,
  GAN-CLS), see ``mismatched_condition`` and ``leedl_fast.gan.trainer``.
* ``TextEncoder``: token and learned position embeddings, a
  ``leedl_fast.nn.TransformerEncoder`` and masked mean pooling.

A condition is given as
  class   integer tensor ``(B,)`` with labels in [0, num_classes);
  vector  ``float tensor (B, cond_dim)``;
  text    integer tensor ``(B, L)`` of token ids, or ``(tokens, key_padding_mask)``
          with ``key_padding_mask`` bool (B, L), True at padding (default:
          ``tokens == padding_idx``).
Labels and token ids may have any integer dtype (they are cast to int64 for the embeddings).
A condition whose batch or shape does not fit raises ValueError naming ``condition``.
G and D each own their condition encoder (pass two ``TextEncoder``s, not one
shared instance, unless you mean both optimisers to update it).
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int
from .dcgan import Discriminator, Generator

__all__ = ["TextEncoder", "ConditionalGenerator", "ProjectionDiscriminator", "mismatched_condition",
           "condition_batch_size"]


def _is_int_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.dtype.is_floating_point and not t.dtype.is_complex \
        and t.dtype != torch.bool


class TextEncoder(nn.Module):
    """tokens ``(B, L)`` -> ``(B, out_dim)``: embeddings + ``leedl_fast.nn.TransformerEncoder`` + masked mean.

    ``forward(tokens, key_padding_mask=None)``; ``key_padding_mask`` (bool, True
    = padding) defaults to ``tokens == padding_idx``.  A row that is all padding
    encodes to the projection of the zero vector.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 128, max_len: int = 64, out_dim: int | None = None,
                 padding_idx: int = 0, dropout: float = 0.0):
        super().__init__()
        from ..nn.transformer import TransformerEncoder, TransformerEncoderLayer

        self.vocab_size = check_int("vocab_size", vocab_size, 1)
        self.max_len = check_int("max_len", max_len, 1)
        if not 0 <= padding_idx < vocab_size:
            raise ValueError(f"padding_idx must be in [0, {vocab_size}), got {padding_idx}")
        self.padding_idx = padding_idx
        self.out_dim = d_model if out_dim is None else check_int("out_dim", out_dim, 1)
        self.token = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.position = nn.Embedding(max_len, d_model)
        layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
        self.encoder = TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.proj = nn.Linear(d_model, self.out_dim)

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not _is_int_tensor(tokens) or tokens.dim() != 2:
            raise ValueError(f"tokens must be an integer tensor of shape (B, L), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        b, length = tokens.shape
        if not 1 <= length <= self.max_len:
            raise ValueError(f"tokens has length {length}; this encoder takes 1..{self.max_len}")
        tokens = tokens.long()  # nn.Embedding takes int64/int32 only
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens must be in [0, {self.vocab_size})")
        if key_padding_mask is None:
            key_padding_mask = tokens == self.padding_idx
        elif key_padding_mask.dtype != torch.bool or key_padding_mask.shape != tokens.shape:
            raise ValueError(f"key_padding_mask must be a bool tensor of shape {tuple(tokens.shape)}, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        pos = torch.arange(length, device=tokens.device)
        h = self.token(tokens) + self.position(pos)[None]
        h = self.encoder(h, src_key_padding_mask=key_padding_mask)
        keep = (~key_padding_mask).unsqueeze(-1).to(h.dtype)
        h = torch.nan_to_num(h) * keep  # padded rows may be anything; they are excluded
        pooled = h.sum(1) / keep.sum(1).clamp_min(1.0)
        return self.proj(pooled)


def condition_batch_size(condition) -> int:
    """The batch size of a class, vector or text condition (tuple: its tokens')."""
    c = condition[0] if isinstance(condition, (tuple, list)) else condition
    if not isinstance(c, torch.Tensor) or c.dim() == 0:
        raise ValueError(f"condition must be a tensor with a batch dimension, got {type(c).__name__}")
    return c.shape[0]


class _ConditionEncoder(nn.Module):
    """The condition -> vector map shared by G and D (one instance each)."""

    def __init__(self, num_classes, cond_dim, text_encoder, embed_dim):
        super().__init__()
        given = [a is not None for a in (num_classes, cond_dim, text_encoder)]
        if sum(given) != 1:
            raise ValueError("exactly one of num_classes, cond_dim and text_encoder must be given")
        self.embedding = None
        self.text_encoder = None
        if num_classes is not None:
            self.kind = "class"
            self.num_classes = check_int("num_classes", num_classes, 1)
            self.dim = check_int("embed_dim", embed_dim, 1)
            self.embedding = nn.Embedding(self.num_classes, self.dim)
        elif cond_dim is not None:
            self.kind = "vector"
            self.dim = check_int("cond_dim", cond_dim, 1)
        else:
            if not isinstance(text_encoder, nn.Module) or not hasattr(text_encoder, "out_dim"):
                raise ValueError("text_encoder must be an nn.Module with an out_dim attribute (e.g. TextEncoder)")
            self.kind = "text"
            self.text_encoder = text_encoder
            self.dim = int(text_encoder.out_dim)

    def forward(self, condition, batch: int) -> torch.Tensor:
        if self.kind == "class":
            if not _is_int_tensor(condition) or condition.shape != (batch,):
                raise ValueError(f"condition must be an integer label tensor of shape ({batch},), got "
                                 + (f"{condition.dtype} {tuple(condition.shape)}" if isinstance(condition, torch.Tensor)
                                    else type(condition).__name__))
            condition = condition.long()  # nn.Embedding takes int64/int32 only
            if batch and (int(condition.min()) < 0 or int(condition.max()) >= self.num_classes):
                raise ValueError(f"condition labels must be in [0, {self.num_classes})")
            return self.embedding(condition)
        if self.kind == "vector":
            if (not isinstance(condition, torch.Tensor) or not condition.dtype.is_floating_point
                    or condition.shape != (batch, self.dim)):
                raise ValueError(f"condition must be a float tensor of shape ({batch}, {self.dim}), got "
                                 + (f"{condition.dtype} {tuple(condition.shape)}" if isinstance(condition, torch.Tensor)
                                    else type(condition).__name__))
            return condition
        tokens, mask = (condition if isinstance(condition, (tuple, list)) and len(condition) == 2 else (condition, None))
        if not _is_int_tensor(tokens) or tokens.dim() != 2 or tokens.shape[0] != batch:
            raise ValueError(f"condition must be token ids of shape ({batch}, L) or a (tokens, key_padding_mask) pair, got "
                             + (f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                                else type(tokens).__name__))
        return self.text_encoder(tokens, mask)


class ConditionalGenerator(nn.Module):
    """``G(z (B, latent_dim), condition) -> (B, channels, H, W)``: a ``Generator`` on ``[z, c]``.

    Exactly one of ``num_classes`` (with ``embed_dim``), ``cond_dim`` and
    ``text_encoder`` picks the kind of condition.  Other arguments as ``Generator``.
    """

    def __init__(self, latent_dim: int = 100, image_size=64, channels: int = 3, ngf: int = 64, *,
                 num_classes: int | None = None, cond_dim: int | None = None, text_encoder: nn.Module | None = None,
                 embed_dim: int = 32, n_up: int | None = None, attention: bool = False):
        super().__init__()
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.condition = _ConditionEncoder(num_classes, cond_dim, text_encoder, embed_dim)
        self.net = Generator(self.latent_dim + self.condition.dim, image_size, channels, ngf, n_up=n_up,
                             attention=attention)
        self.image_size = self.net.image_size
        self.channels = self.net.channels

    def forward(self, z: torch.Tensor, condition) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        c = self.condition(condition, z.shape[0])
        return self.net(torch.cat([z, c.to(z.dtype)], dim=1))


class ProjectionDiscriminator(Discriminator):
    """``D(x (B, C, H, W), condition) -> (B,)`` logits: ``head(phi(x)) + <V c, phi(x)>`` (Miyato & Koyama 2018).

    For classes ``V c`` is ``nn.Embedding(num_classes, feature_dim)``; for
    vector and text conditions it is a bias-free linear map of c.
    """

    def __init__(self, image_size=64, channels: int = 3, ndf: int = 64, *, num_classes: int | None = None,
                 cond_dim: int | None = None, text_encoder: nn.Module | None = None, n_down: int | None = None,
                 attention: bool = False):
        super().__init__(image_size, channels, ndf, n_down=n_down, attention=attention)
        embed_dim = self.feature_dim
        self.condition = _ConditionEncoder(num_classes, cond_dim, text_encoder, embed_dim)
        self.project = None if self.condition.kind == "class" else nn.Linear(self.condition.dim, self.feature_dim,
                                                                              bias=False)

    def forward(self, x: torch.Tensor, condition) -> torch.Tensor:
        self._check_input(x)
        c = self.condition(condition, x.shape[0])  # a refused condition leaves the body (and its spectral norms) unrun
        h = self.features(x)
        if self.project is not None:
            c = self.project(c.to(h.dtype))
        return self.head(h).squeeze(1) + (c.to(h.dtype) * h).sum(1)


def mismatched_condition(condition, num_classes: int | None = None, *, generator: torch.Generator | None = None):
    """Conditions that do not belong to their samples, for real-but-mismatched negatives.

    Class labels (with ``num_classes``): ``(y + s) % num_classes`` with s drawn
    uniformly from 1..num_classes-1 per sample, so every label changes.
    Anything else (vectors, tokens, ``(tokens, mask)``): the batch rolled by a
    random shift in 1..B-1 (needs B >= 2; a row equal to its partner's stays
    matched, which random data makes rare).
    """
    if num_classes is not None:
        if not _is_int_tensor(condition) or condition.dim() != 1:
            raise ValueError("condition must be a 1-D integer label tensor when num_classes is given")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 to mismatch labels, got {num_classes}")
        gen_device = condition.device if generator is None else generator.device
        shift = torch.randint(1, num_classes, condition.shape, generator=generator, device=gen_device)
        return (condition + shift.to(condition.device)) % num_classes
    b = condition_batch_size(condition)
    if b < 2:
        raise ValueError(f"condition needs a batch of at least 2 to be rolled into mismatched pairs, got {b}")
    shift = int(torch.randint(1, b, (), generator=generator))
    if isinstance(condition, (tuple, list)):
        return type(condition)(torch.roll(c, shift, 0) if isinstance(c, torch.Tensor) else c for c in condition)
    return torch.roll(condition, shift, 0)
