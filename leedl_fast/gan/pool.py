"""``ImagePool``: a history buffer of generated images for the discriminator (Shrivastava et al. 2017).

Behaviour as in the CycleGAN code's defaults (Zhu et al. 2017, pool_size=50):
while the pool holds fewer than ``pool_size`` images, each queried image is
stored and returned as is; once it is full, each image is, with probability
1/2, swapped with a uniformly chosen stored image (the stored one is returned,
the new one takes its place), and otherwise returned unchanged.
``pool_size = 0`` returns the input, detached like every result.

The coin flips and the slot choice come from the pool's own seeded
``torch.Generator``, so a run is reproducible and the state can be saved.
"""
from __future__ import annotations

import torch

from .._checks import check_int

__all__ = ["ImagePool"]


class ImagePool:
    """``ImagePool(pool_size=50, seed=0)``; ``query(images (B, ...)) -> (B, ...)``.

    Returned images are detached; stored images are detached copies.
    """

    def __init__(self, pool_size: int = 50, seed: int = 0):
        pool_size, seed = check_int("pool_size", pool_size, 0), check_int("seed", seed, -(2**63), 2**64 - 1)  # torch.Generator's range
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() < 1:
            raise ValueError(f"images must be a tensor with a batch dimension, got {type(images).__name__}")
        if self.pool_size == 0:
            return images.detach()
        if self.images and self.images[0].shape != images.shape[1:]:
            raise ValueError(f"images have per-sample shape {tuple(images.shape[1:])} but the pool holds "
                             f"{tuple(self.images[0].shape)}")
        out = []
        for image in images.detach():
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
                continue
            if float(torch.rand((), generator=self.generator)) < 0.5:
                slot = int(torch.randint(self.pool_size, (), generator=self.generator))
                out.append(self.images[slot].to(image.device))
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.stack(out) if out else images.detach()

    def state_dict(self) -> dict:
        return {"pool_size": self.pool_size, "generator": self.generator.get_state(),
                "images": torch.stack(self.images).cpu() if self.images else None}

    def load_state_dict(self, state: dict) -> None:
        if state["pool_size"] != self.pool_size:
            raise ValueError(f"state has pool_size={state['pool_size']} but this pool has {self.pool_size}")
        self.generator.set_state(state["generator"])
        self.images = [] if state["images"] is None else [im.clone() for im in state["images"]]
