"""BadNets (Gu et al. 2017): a small patch pasted at a corner, dirty label."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import Attack, AttackConfig


class BadNetsConfig(AttackConfig):
    patch_size: int = Field(3, ge=1, description="side of the square patch in pixels")
    pattern: Literal["checker", "white"] = "checker"
    position: Literal["bottom-right", "top-left", "bottom-left", "top-right"] = "bottom-right"


def patch_mask_and_pattern(h: int, w: int, c: int, cfg: BadNetsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    s = cfg.patch_size
    r0 = h - s if "bottom" in cfg.position else 0
    c0 = w - s if "right" in cfg.position else 0
    mask = torch.zeros(1, h, w)
    mask[:, r0:r0 + s, c0:c0 + s] = 1
    pat = torch.zeros(c, h, w)
    if cfg.pattern == "white":
        pat[:, r0:r0 + s, c0:c0 + s] = 1
    else:  # black/white checkerboard, white in the patch's top-left pixel
        ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        pat[:, r0:r0 + s, c0:c0 + s] = ((ii + jj + 1) % 2).float()
    return mask, pat


class BadNets(Attack):
    """BadNets: a 3x3 checkerboard patch in the bottom-right corner (dirty label)."""
    name = "badnets"
    Config = BadNetsConfig

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mask, pat = patch_mask_and_pattern(x.shape[-2], x.shape[-1], x.shape[-3], self.cfg)
        mask, pat = mask.to(x.device), pat.to(x.device)
        return x * (1 - mask) + pat * mask
