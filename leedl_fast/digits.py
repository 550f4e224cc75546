"""The demo data: scikit-learn's bundled 8x8 digits, a small digit classifier, and PNG grids.

Shared by the training demos (``leedl-fast train diffusion | gan | cyclegan``): the digits
are the data, and a classifier trained on them in the same run is the judge of whether
generated samples look like the digit that was asked for.
"""
from __future__ import annotations

import math
import pathlib

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["load_digits", "save_grid", "DigitClassifier"]


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) in [-1, 1], labels (N,)) of sklearn's digits; ``split`` "train" (80%), "test" or "all"."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "all":
        return x, y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return x[idx], y[idx]


def save_grid(images: torch.Tensor, path: pathlib.Path, nrow: int, *, scale: int = 4, pad: int = 1) -> pathlib.Path:
    """Write ``images`` (N, 1 or 3, H, W) in [-1, 1] as a PNG grid with ``nrow`` images per row."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if c == 1:
        plt.imsave(path, grid[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    else:
        plt.imsave(path, grid.permute(1, 2, 0).numpy())
    return path


class DigitClassifier(nn.Module):
    """A small CNN for 8x8 digits: (B, 1, 8, 8) in [-1, 1] -> (B, 10) logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 16, 10))

    def forward(self, x):
        return self.net(x)

    @classmethod
    def trained(cls, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 15, seed: int = 0) -> "DigitClassifier":
        """Trained on (x, y) with Adam, small random shifts as augmentation; returned in eval mode."""
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = cls()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 64):
                idx = perm[i:i + 64]
                xb = x[idx]
                dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
                xb = torch.roll(xb, (dy, dx), (2, 3)) if (dy or dx) else xb
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self(x).argmax(1) == y).float().mean())
