"""Batched augmentation with tensor ops on whatever device the batch is on (no PIL,
no torchvision): random crop with zero padding and horizontal flip."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``padding``-pixel translation (crop of the zero-padded image back to its size)
    and a horizontal flip with probability 1/2, independently per sample.

    Works on any dtype (uint8 or float) and layout; one gather for the whole batch."""
    n, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        # Offsets are drawn on the CPU generator so results do not depend on the device.
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])  # [n, h]
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])  # [n, w]
        x = xp[torch.arange(n, device=dev)[:, None, None, None],
               torch.arange(c, device=dev)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(dev)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x
