"""``leedl-fast train transformer``: a small Transformer learns to reverse digit strings.

The task is generated in code: a source is a string of 2 to 12 random digits, its
target the same digits reversed (``"30417" -> "71403"``).  The model is the
course's encoder-decoder (``leedl_fast.nn.Transformer``, 2 + 2 layers,
d_model 64) with a sinusoidal positional encoding on both sides; it is trained
with teacher forcing and evaluated by greedy decoding with the key/value cache
(``Transformer.generate``) on held-out strings that never occur in the
training set.  Exact-match accuracy (the whole output string right) passes 95%
within the default 1500 steps, a couple of minutes on two CPU cores.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.heads import Seq2SeqHead
from ..nn.positional import SinusoidalPositionalEncoding
from ..nn.transformer import Transformer
from ..training import torch_threads

__all__ = ["ReverseDigits", "ReverseTransformer", "TransformerRecipe", "RECIPES", "encode", "decode"]

PAD, BOS, EOS = 10, 11, 12
VOCAB = 13
MIN_LEN, MAX_LEN = 2, 12


def encode(digits: str, length: int = MAX_LEN) -> torch.Tensor:
    """A digit string as a (length,) source tensor padded with PAD."""
    ids = [int(c) for c in digits] + [PAD] * (length - len(digits))
    return torch.tensor(ids, dtype=torch.long)


def decode(ids) -> str:
    """Token ids up to the first EOS (or PAD) as a digit string."""
    out = []
    for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        if t in (EOS, PAD):
            break
        out.append(str(t) if t < 10 else "?")
    return "".join(out)


def _random_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n,) lengths in [MIN_LEN, MAX_LEN] and (n, MAX_LEN) digits (positions past the length are unused)."""
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=n)
    return lengths, rng.integers(0, 10, size=(n, MAX_LEN))


def _random_strings(rng: np.random.Generator, n: int) -> list[str]:
    lengths, digits = _random_digits(rng, n)
    return ["".join(map(str, row[:k])) for row, k in zip(digits.tolist(), lengths.tolist())]


class ReverseDigits(torch.utils.data.Dataset):
    """``n`` examples ``(src, tgt)``: src (MAX_LEN,) digits padded with PAD; tgt (MAX_LEN + 2,) = BOS, the digits
    reversed, EOS, PAD...  Built from ``seed`` alone."""

    def __init__(self, n: int, seed: int = 0):
        lengths, digits = _random_digits(np.random.default_rng(seed), n)
        pos = np.arange(MAX_LEN)[None, :]
        valid = pos < lengths[:, None]                                        # (n, MAX_LEN)
        src = np.where(valid, digits, PAD)
        # target position t + 1 holds source digit length - 1 - t
        rev = np.take_along_axis(digits, np.clip(lengths[:, None] - 1 - pos, 0, MAX_LEN - 1), axis=1)
        tgt = np.full((n, MAX_LEN + 2), PAD)
        tgt[:, 0] = BOS
        tgt[:, 1:MAX_LEN + 1] = np.where(valid, rev, PAD)
        tgt[np.arange(n), lengths + 1] = EOS
        self.src = torch.from_numpy(src).long()
        self.tgt = torch.from_numpy(tgt).long()
        self.lengths = lengths

    @property
    def strings(self) -> list[str]:
        return [decode(row) for row in self.src]

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i):
        return self.src[i], self.tgt[i]


def held_out(train_strings, n: int, seed: int) -> list[str]:
    """``n`` random strings that are not in ``train_strings``."""
    seen = set(train_strings)
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        out += [s for s in _random_strings(rng, n) if s not in seen][: n - len(out)]
    return out


class ReverseTransformer(nn.Module):
    """Source embedding + ``leedl_fast.nn.Transformer`` (batch first) + ``Seq2SeqHead`` for the target side."""

    def __init__(self, d_model: int = 64, nhead: int = 4, layers: int = 2, dim_feedforward: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.src_embedding = nn.Embedding(VOCAB, d_model, padding_idx=PAD)
        nn.init.normal_(self.src_embedding.weight, std=d_model ** -0.5)
        self.src_positional = SinusoidalPositionalEncoding(d_model, 64, dropout, batch_first=True)
        self.transformer = Transformer(d_model, nhead, layers, layers, dim_feedforward, dropout, batch_first=True)
        self.head = Seq2SeqHead(VOCAB, d_model, max_len=64, dropout=dropout, padding_idx=PAD, batch_first=True)

    def embed_source(self, src: torch.Tensor) -> torch.Tensor:
        return self.src_positional(self.src_embedding(src) * math.sqrt(self.d_model))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (batch, T, VOCAB) for the next token at each target position."""
        out = self.transformer(self.embed_source(src), self.head.embed(tgt_in), src_key_padding_mask=src == PAD,
                               memory_key_padding_mask=src == PAD, tgt_is_causal=True)
        return self.head(out)

    @torch.no_grad()
    def translate(self, src: torch.Tensor, max_len: int = MAX_LEN + 1) -> torch.Tensor:
        """Greedy decoding with the key/value cache: (batch, <= max_len) ids, ending in EOS."""
        return self.transformer.generate(self.embed_source(src), BOS, max_len, embed=self.head.embed,
                                         head=self.head, src_key_padding_mask=src == PAD, end=EOS)


def exact_match(model: ReverseTransformer, strings: list[str], device, batch: int = 500) -> tuple[float, list]:
    """Fraction of ``strings`` whose greedy translation is exactly the reversed string, and the outputs."""
    outs = []
    for i in range(0, len(strings), batch):
        src = torch.stack([encode(s) for s in strings[i: i + batch]]).to(device)
        outs += [decode(row) for row in model.translate(src).cpu()]
    correct = sum(o == s[::-1] for o, s in zip(outs, strings))
    return correct / max(len(strings), 1), outs


def _one_cpu_thread(device):
    """One intra-op thread for this tiny model on the CPU, restored afterwards.

    Its matmuls are a few microseconds each, so waking a second OpenMP thread costs more than it saves; on a
    busy 2-core machine two threads made a step 30x slower (2.5 s against 70 ms, measured).  Restored on exit so
    other demos in the same process keep their thread count."""
    return torch_threads(1 if torch.device(device).type == "cpu" else None)


class TransformerRecipe:
    """Reverse digit strings with a small encoder-decoder Transformer (see the module docstring)."""

    name = "transformer"
    defaults = {"steps": 1500, "batch_size": 64, "lr": 1e-3}
    sample_suffix = ".txt"  # sample() writes text
    warmup = 100
    # --steps sets the learning-rate schedule and the data set's size: a resume with another value warns.
    args_that_change_results = ("steps",)
    eval_size = 1000

    def build(self, args, device) -> dict[str, nn.Module]:
        return {"model": ReverseTransformer().to(device)}

    def optimizers(self, models, args) -> dict[str, torch.optim.Optimizer]:
        return {"model": torch.optim.AdamW(models["model"].parameters(), lr=args.lr, betas=(0.9, 0.98),
                                           weight_decay=0.01)}

    def dataset(self, args) -> torch.utils.data.Dataset:
        return ReverseDigits(max(args.steps, 1) * args.batch_size, seed=args.seed)

    def _lr(self, step: int, args) -> float:
        """Linear warm-up, then cosine decay to a tenth of ``args.lr``."""
        s = step + 1
        if s <= self.warmup:
            return args.lr * s / self.warmup
        t = min(1.0, (s - self.warmup) / max(1, args.steps - self.warmup))
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    def train_step(self, models, optimizers, batch, step, args) -> dict[str, float]:
        model, opt = models["model"], optimizers["model"]
        src, tgt = batch
        device = next(getattr(model, "module", model).parameters()).device
        src, tgt = src.to(device), tgt.to(device)
        for g in opt.param_groups:
            g["lr"] = self._lr(step, args)
        with _one_cpu_thread(device):
            logits = model(src, tgt[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, 1:].reshape(-1), ignore_index=PAD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return {"loss": float(loss.detach())}

    def _eval_strings(self, args) -> list[str]:
        train = ReverseDigits(max(args.steps, 1) * args.batch_size, seed=args.seed).strings
        return held_out(train, self.eval_size, seed=args.seed + 1_000_003)

    def finish(self, models, args, out_dir: pathlib.Path) -> dict[str, float]:
        model = getattr(models["model"], "module", models["model"])
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        strings = self._eval_strings(args)
        with _one_cpu_thread(device):
            acc, outs = exact_match(model, strings, device)
        print(f"exact match on {len(strings)} held-out strings: {acc:.1%}")
        for s, o in list(zip(strings, outs))[:6]:
            print(f"  {s:>12} -> {o:<12} {'ok' if o == s[::-1] else 'WRONG (want ' + s[::-1] + ')'}")
        model.train(was_training)
        return {"exact_match": acc}

    def sample(self, models, args, out_path: pathlib.Path) -> None:
        """Write translations of a few random strings, one ``source -> output`` line each, to ``out_path``."""
        model = getattr(models["model"], "module", models["model"])
        model.eval()
        device = next(model.parameters()).device
        strings = _random_strings(np.random.default_rng(args.seed), 16)
        with _one_cpu_thread(device):
            _, outs = exact_match(model, strings, device)
        lines = [f"{s} -> {o}" for s, o in zip(strings, outs)]
        pathlib.Path(out_path).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d) -> None:
        pass


RECIPES = {"transformer": TransformerRecipe}
