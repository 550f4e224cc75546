"""Output heads for the three task shapes of the course's sequence models.

* ``TokenClassificationHead``: one label per input vector (N in, N labels out), e.g. part-of-speech tagging
  or frame-wise phoneme classification.
* ``SequenceClassificationHead``: one label per sequence (N in, 1 label out), e.g. sentiment analysis or
  speaker recognition, by mean pooling over the non-padded positions or by reading a [CLS] position.
* ``Seq2SeqHead``: the machine decides the output length (sequence to sequence, e.g. translation or speech
  recognition): the decoder-side token embedding with positional encoding, and the projection from decoder
  outputs to vocabulary logits.  Its ``embed`` and ``forward`` are the ``embed`` and ``head`` arguments of
  ``Transformer.generate``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_int
from .positional import SinusoidalPositionalEncoding

__all__ = ["TokenClassificationHead", "SequenceClassificationHead", "Seq2SeqHead"]


class TokenClassificationHead(nn.Module):
    """Per-position logits: (..., N, d_model) -> (..., N, num_labels), any layout (a dropout and a linear layer
    applied to the last dimension)."""

    def __init__(self, d_model: int, num_labels: int, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_labels", num_labels, 1)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, num_labels, device=device, dtype=dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(self.dropout(hidden))


class SequenceClassificationHead(nn.Module):
    """One label per sequence: (seq, batch, d_model) -> (batch, num_labels) (``batch_first``: (batch, seq, d_model)).

    ``pooling="mean"`` averages the positions that ``key_padding_mask`` (batch, seq; True = padding) leaves in
    (every position without a mask); a sequence with none left (all padding, or length 0) pools to zeros.
    ``pooling="cls"`` reads position ``cls_index`` (prepend a learned [CLS] vector to the input for that).
    Then dropout and a linear layer.
    """

    def __init__(self, d_model: int, num_labels: int, pooling: str = "mean", cls_index: int = 0,
                 dropout: float = 0.0, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_labels", num_labels, 1)
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        cls_index = check_int("cls_index", cls_index)
        self.pooling = pooling
        self.cls_index = cls_index
        self.batch_first = batch_first
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, num_labels, device=device, dtype=dtype)

    def pool(self, hidden: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """The (batch, d_model) summary of each sequence."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"hidden must be a 3-D tensor, got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
        h = hidden if self.batch_first else hidden.transpose(0, 1)  # (B, N, E)
        if self.pooling == "cls":
            if not -h.shape[1] <= self.cls_index < h.shape[1]:
                raise ValueError(f"cls_index={self.cls_index} is out of range for sequences of length {h.shape[1]}")
            return h[:, self.cls_index]
        if key_padding_mask is None:
            return h.mean(dim=1) if h.shape[1] else h.sum(dim=1)  # length 0: zeros, as with an all-padding mask
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(h.shape[:2]):
            raise ValueError(f"key_padding_mask must be a bool (batch, seq) = {tuple(h.shape[:2])} tensor, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        keep = (~key_padding_mask).to(h.dtype).unsqueeze(-1)  # (B, N, 1)
        # A sequence that is all padding pools to zeros rather than 0/0.
        return (h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)

    def forward(self, hidden: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.proj(self.dropout(self.pool(hidden, key_padding_mask)))


class Seq2SeqHead(nn.Module):
    """Decoder-side token embedding and output projection of a sequence-to-sequence model.

    ``embed(ids, offset=0)``: ids (batch, n) at positions ``offset..offset+n-1`` ->
    ``token_embedding(ids) * sqrt(d_model)`` plus the sinusoidal positional encoding (Vaswani et al., 2017,
    section 3.4), laid out (batch, n, d_model) if ``batch_first`` else (n, batch, d_model).
    ``forward(hidden)``: decoder outputs (..., d_model) -> logits (..., vocab_size); with
    ``tie_weights=True`` the projection shares the embedding matrix (plus its own bias).

    ``model.generate(src, bos_id, max_len, embed=head.embed, head=head)`` decodes greedily.
    """

    def __init__(self, vocab_size: int, d_model: int, max_len: int = 5000, dropout: float = 0.0,
                 padding_idx: int | None = None, tie_weights: bool = True, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        check_int("vocab_size", vocab_size, 1)
        check_int("d_model", d_model, 1)
        padding_idx = check_int("padding_idx", padding_idx, -vocab_size, vocab_size, hi_open=True, optional=True)
        self.batch_first = batch_first
        self.d_model = d_model
        self.token_embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx, device=device, dtype=dtype)
        nn.init.normal_(self.token_embedding.weight, std=d_model ** -0.5)
        if padding_idx is not None:
            with torch.no_grad():
                self.token_embedding.weight[padding_idx].zero_()
        self.positional = SinusoidalPositionalEncoding(d_model, max_len, dropout, batch_first, device=device,
                                                       dtype=dtype)
        self.tie_weights = tie_weights
        if tie_weights:
            self.bias = nn.Parameter(torch.zeros(vocab_size, device=device, dtype=dtype))
        else:
            self.proj = nn.Linear(d_model, vocab_size, device=device, dtype=dtype)

    def embed(self, ids: Tensor, offset: int = 0) -> Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"ids must be a (batch, n) integer tensor, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        x = self.token_embedding(ids) * math.sqrt(self.d_model)  # (B, n, E)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.positional(x, offset=offset)

    def forward(self, hidden: Tensor) -> Tensor:
        if self.tie_weights:
            return nn.functional.linear(hidden, self.token_embedding.weight, self.bias)
        return self.proj(hidden)
