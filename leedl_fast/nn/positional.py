"""Positional information added to a vector sequence (the course's Transformer input).

``SinusoidalPositionalEncoding`` is the fixed table of "Attention Is All You
Need" (Vaswani et al., 2017, section 3.5):

    pe[pos, 2i]   = sin(pos / 10000^(2i / d_model))
    pe[pos, 2i+1] = cos(pos / 10000^(2i / d_model))

``LearnedPositionalEncoding`` replaces the table by a trained parameter.  Both
return ``dropout(x + pe[offset : offset + seq_len])`` for ``x`` of shape
``(seq_len, batch, d_model)`` or, with ``batch_first=True``,
``(batch, seq_len, d_model)``; ``offset`` lets incremental decoding add the
encoding of positions ``offset, offset+1, ...`` to the newest tokens only.
"""
from __future__ import annotations


import torch
from torch import nn

from .._checks import check_int, check_number

__all__ = ["SinusoidalPositionalEncoding", "LearnedPositionalEncoding", "sinusoidal_table"]


def sinusoidal_table(max_len: int, d_model: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The (max_len, d_model) sinusoid table, computed in float64 then cast to ``dtype``.

    An odd ``d_model`` ends with a sine column (its cosine partner would be column d_model)."""
    max_len, d_model = check_int("max_len", max_len, 0), check_int("d_model", d_model, 0)
    pos = torch.arange(max_len, dtype=torch.float64, device=device)[:, None]
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = pos / torch.pow(10000.0, two_i / d_model)  # (max_len, ceil(d_model / 2))
    pe = torch.zeros(max_len, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(dtype)


def _check_init(d_model, max_len, dropout):
    check_int("d_model", d_model, 1), check_int("max_len", max_len, 1), check_number("dropout", dropout, 0, 1)


class _PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int, dropout: float, batch_first: bool):
        super().__init__()
        _check_init(d_model, max_len, dropout)
        self.d_model = d_model
        self.max_len = max_len
        self.batch_first = batch_first
        self.dropout = nn.Dropout(dropout)

    def _table(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``dropout(x + pe[offset : offset + seq_len])``; ``x`` is (seq, batch, d_model), or
        (batch, seq, d_model) with ``batch_first`` (a 2-D ``x`` is one unbatched (seq, d_model) sequence)."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a (seq, batch, {self.d_model}) tensor (batch first: (batch, seq, "
                             f"{self.d_model})) or an unbatched (seq, {self.d_model}) one, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor (embedded vectors), got {x.dtype}")
        offset = check_int("offset", offset, 0)
        seq_dim = 1 if (self.batch_first and x.dim() == 3) else 0
        n = x.shape[seq_dim]
        if offset + n > self.max_len:
            raise ValueError(f"positions {offset}..{offset + n - 1} exceed max_len={self.max_len}")
        pe = self._table()[offset: offset + n].to(x.dtype)  # (n, d_model)
        if x.dim() == 3 and seq_dim == 0:
            pe = pe[:, None, :]
        return self.dropout(x + pe)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}, batch_first={self.batch_first}"


class SinusoidalPositionalEncoding(_PositionalEncoding):
    """Adds the fixed sinusoid table of Vaswani et al. (2017), then dropout.

    The table is a non-persistent buffer (rebuilt from the formula, never stored
    in a state_dict).  Input and output: (seq, batch, d_model), or
    (batch, seq, d_model) with ``batch_first=True``.  ``device`` and ``dtype`` place the table
    (default float32; it is computed in float64 either way: a dtype or device change by
    ``.to()``, ``.double()`` and the like rebuilds it rather than casting the old one).
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__(d_model, max_len, dropout, batch_first)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model, dtype or torch.float32, device),
                             persistent=False)

    def _table(self) -> torch.Tensor:
        return self.pe

    def _apply(self, fn, recurse=True):
        old = self.pe
        super()._apply(fn, recurse)
        if self.pe is not old:
            # fn made a new table (a conversion that is a no-op returns the old one): rebuild it from the formula,
            # on the CPU, as not every device has float64.  This also fills a table that to_empty() left empty,
            # on a new device or on the same one.
            self.pe = sinusoidal_table(self.max_len, self.d_model, self.pe.dtype).to(self.pe.device)
        return self


class LearnedPositionalEncoding(_PositionalEncoding):
    """Adds a trained (max_len, d_model) table ``weight`` (initialised N(0, 0.02^2)), then dropout.

    Same interface as ``SinusoidalPositionalEncoding``; the table is a parameter.
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__(d_model, max_len, dropout, batch_first)
        self.weight = nn.Parameter(torch.empty(max_len, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def _table(self) -> torch.Tensor:
        return self.weight


